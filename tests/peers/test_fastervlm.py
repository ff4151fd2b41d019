"""FasterVLM (peers/fastervlm.py) against a reference written from the official code (Theia-4869/FasterVLM,
``clip_encoder.py`` feature_select and ``llava_arch.py`` encode_images): the top-T patches by the feature layer's
eager [CLS] attention averaged over heads, in raster order, projected."""

from __future__ import annotations

import pytest
import torch
from conftest import pair
from peer_checks import check_cached_decoding, one_image_prompt, reference_logits

import skipvision
from skipvision.peers import fastervlm


def official_fastervlm(vanilla, pixels: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept patch indices (n, T), projected tokens (n, T, d))``: eager attentions[-2][:, :, 0, 1:], head mean,
    top-T, kept in raster order, the projector on hidden_states[-2][:, 1:]."""
    tower = vanilla.model.vision_tower
    tower.config._attn_implementation = "eager"  # the attention probabilities (HF's eager softmax runs in fp32)
    try:
        attentions = tower(pixels, output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = "sdpa"
    score = attentions[-2][:, :, 0, 1:].mean(dim=1)
    kept = score.topk(keep, dim=-1).indices.sort(dim=-1).values
    features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    selected = features.gather(1, kept.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return kept, vanilla.model.multi_modal_projector(selected)


@pytest.mark.parametrize("keep", [1, 16, 40])
def test_fastervlm_equals_the_official_algorithm(keep):
    cfg = fastervlm(keep)
    vanilla, model = pair(cfg, dtype=torch.float64, vision_layers=4)
    ids = one_image_prompt(skipvision.num_image_tokens(cfg))
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept, reference = official_fastervlm(vanilla, pixels, keep)
    tokens = model.encode_images(pixels)
    assert tokens.shape == (1, keep, reference.shape[-1])
    assert (tokens - reference).abs().max() <= 1e-10
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert (logits - reference_logits(vanilla, ids, reference[0])).abs().max() <= 1e-10
    check_cached_decoding(model, ids, pixels)


def test_fastervlm_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="num_retained"):
        skipvision.SkipVisionConfig(0.5, 0, tower_reduction="fastervlm", skip_layers=(), skip_kv_cache=False)
    # a tower without CLS-dropping features (CLIP with vision_feature_select_strategy="full")
    vanilla, _ = pair(skipvision.vanilla_config())
    vanilla.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="CLS"):
        skipvision.convert(vanilla, fastervlm(8))
