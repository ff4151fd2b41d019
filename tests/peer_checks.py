"""What every peer method's equivalence test checks, against a reference written from the official code's math
(fp64, the tiny LLaVA of conftest.py, batch 1): the language model's logits when the image placeholders hold the
reference's tokens, and that prefill plus cached decoding equals decoding by full forwards."""

from __future__ import annotations

import torch
from conftest import BOS_ID, IMAGE_TOKEN_ID, VOCAB, pair
from transformers import LlavaForConditionalGeneration


def one_image_prompt(tokens_per_image: int, prefix: int = 3, suffix: int = 5, seed: int = 0) -> torch.Tensor:
    """``(1, L)`` ids: BOS, text, one image's placeholders, text."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(5, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    return torch.tensor([[BOS_ID, *text(prefix), *([IMAGE_TOKEN_ID] * tokens_per_image), *text(suffix)]])


def reference_logits(vanilla: LlavaForConditionalGeneration, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the HF model whose image placeholders hold ``tokens (n, d)`` (the reference's projected tokens)."""
    embeds = vanilla.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN_ID).unsqueeze(-1), tokens.to(embeds.dtype))
    return LlavaForConditionalGeneration.forward(vanilla, inputs_embeds=embeds, use_cache=False).logits


def check_cached_decoding(model, ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int = 4) -> None:
    """Greedy ``generate`` (prefill, then cached decode steps) equals greedy decoding by full forwards."""
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, do_sample=False)
    sequence = ids
    for _ in range(new_tokens):
        logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, sequence)


#: methods whose settings cannot land near every budget on the tiny model, and why
COARSE = {
    # each tower layer's bipartite matching at most halves the tokens; tiny's one merging layer stops at 72 of 144
    "tome": "ToMe in the tower",
    # PruMerge+'s spatially uniform extra tokens come from a stride grid: its token counts are a discrete set
    "prumerge_plus": "PruMerge+",
}


def check_tower_reduction_flops(cfg) -> None:
    """A tower reduction's own matmuls (``overhead_flops``, which flops.py adds for tower reductions) are what it
    runs: the image's measured FLOPs are the tower's, the projector's on the kept tokens, and those."""
    import skipvision
    from skipvision import flops
    from skipvision.harness import measure
    from skipvision.tower_reduction import tower_reduction

    _, model = pair(cfg, vision_layers=4)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    measured, _ = measure.measured_flops(lambda: model.encode_images(pixels))
    shape = skipvision.family_of(model).model_shape(model.config)
    v, heads = shape.vision, model.config.vision_config.num_attention_heads
    own = tower_reduction(cfg.tower_reduction).overhead_flops(v.hidden, v.tokens, heads, cfg)
    projector = flops.projector_flops(v, shape.text.hidden, cfg.num_image_tokens)
    assert measured == flops.tower_pass_flops(v) + projector + own
