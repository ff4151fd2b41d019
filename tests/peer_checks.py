"""What every peer method's equivalence test checks, against a reference written from the official code's math
(fp64, the tiny LLaVA of conftest.py, batch 1): the language model's logits when the image placeholders hold the
reference's tokens, and that prefill plus cached decoding equals decoding by full forwards."""

from __future__ import annotations

import torch
from conftest import BOS_ID, IMAGE_TOKEN_ID, VOCAB
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
