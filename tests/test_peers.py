"""Peer methods before the language model (skipvision.peers): the full budget is the vanilla model, the token
count per image is the budget, and the analytic FLOPs match FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair, prompts

import skipvision
from skipvision import flops as F
from skipvision.harness import measure
from skipvision.peers import fastervlm, prumerge, token_drop, tome, tome_after_projector, visionzip
from skipvision.skip_kv import skip_kv_state


def _visual_tokens(model) -> int:
    return skipvision.vision_facts(model.config).fixed_visual_tokens


@pytest.mark.parametrize("peer", ["tome", "tome_after_projector", "drop-random", "drop-position"])
def test_full_budget_is_the_vanilla_model(peer):
    vanilla, _ = pair(skipvision.vanilla_config())
    v = _visual_tokens(vanilla)
    cfg = {
        "tome": tome(v),
        "tome_after_projector": tome_after_projector(v),
        "drop-random": token_drop(v, "random"),
        "drop-position": token_drop(v, "position"),
    }[peer]
    _, model = pair(cfg)
    ids, mask, pixels = prompts([1, 2], v, [3, 1], [2, 4])
    ref = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (out - ref)[mask.bool()].abs().max() <= 1e-5


def test_visionzip_largest_budget_drops_only_the_least_attended_patch():
    """VisionZip feeds CLS to the language model, so no budget is the vanilla model: at the largest (``dominant`` =
    the V visual tokens, no contextual ones) each image is CLS and every patch but the least attended one, in raster
    order -- the vanilla model with those tokens in its placeholders, on the same left-padded batch."""
    vanilla, _ = pair(skipvision.vanilla_config())
    v = _visual_tokens(vanilla)
    _, model = pair(visionzip(v, 0))
    ids, mask, pixels = prompts([1, 2], v, [3, 1], [2, 4])
    tower = vanilla.model.vision_tower
    tower.config._attn_implementation = "eager"  # HF returns attention probabilities from the eager path only
    try:
        run = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    hidden = run.hidden_states[-2]
    least = run.attentions[-2][:, :, 0, 1:].sum(dim=1).argmin(dim=-1) + 1
    keep = torch.ones(hidden.shape[:2], dtype=torch.bool)
    keep[torch.arange(len(least)), least] = False
    tokens = vanilla.model.multi_modal_projector(hidden[keep].view(len(least), v, -1))
    embeds = vanilla.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN_ID).unsqueeze(-1), tokens)
    ref = vanilla(inputs_embeds=embeds, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (out - ref)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize(
    "cfg",
    # in-tower ToMe (tome) is not here: its tower runs fewer tokens after each merge, which the FLOPs model does not
    # count yet, and 64 -> 10 needs three merging layers (this tower has one before its features)
    [
        visionzip(6, 4),
        fastervlm(10),
        prumerge(10),
        tome_after_projector(10),
        token_drop(10, "random"),
        token_drop(10, "position"),
    ],
    ids=["visionzip", "fastervlm", "prumerge", "tome_after_projector", "drop-random", "drop-position"],
)
def test_budget_tokens_run_full_blocks_and_flops_match(cfg):
    vanilla, model = pair(cfg)
    assert model.skip_vision_config.num_image_tokens == 10
    ids, mask, pixels = prompts([1, 1], 10, [3, 3], [5, 5])
    embeds, _ = model.embed_multimodal(ids, pixels)
    assert embeds.shape[1] == ids.shape[1]
    # every token runs the FFN (no Skip-FFN) and the cache keeps every token (no Skip KV-cache)
    rows = []
    layers = skipvision.family_of(model).decoder_layers(model)
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[:-1].numel())) for layer in layers
    ]
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    for h in hooks:
        h.remove()
    assert rows == [ids.numel()] * len(layers)
    assert skip_kv_state(out.past_key_values) is None
    # the analytic FLOPs of the shortened sequence are what FlopCounterMode counts
    total, _ = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels))
    shape = skipvision.family_of(model).model_shape(model.config)
    counts = F.sequence_counts(shape, int((ids[0] != IMAGE_TOKEN_ID).sum()), 1, cfg)
    lm = F.language_flops(shape, counts, logits=counts.attention_length, causal=False, skip_layers=cfg.skip_layers)
    vision = sum(F.vision_flops(shape, 1, cfg).values()) + F.skip_vision_overhead(shape, cfg, 1)
    assert abs(2 * (sum(lm.values()) + vision) / total - 1) <= 0.02
    # and fewer than vanilla's
    vanilla_counts = F.sequence_counts(shape, counts.text, 1, None)
    assert counts.attention_length < vanilla_counts.attention_length


def test_bad_peer_settings_raise():
    with pytest.raises(ValueError, match="num_skipped=0"):
        skipvision.SkipVisionConfig(4, 2, merge="drop")
    with pytest.raises(ValueError, match="unknown order"):
        token_drop(4, "diagonal")
    vanilla, _ = pair(skipvision.vanilla_config())
    with pytest.raises(ValueError, match="larger than"):
        skipvision.convert(vanilla, token_drop(_visual_tokens(vanilla) + 1))
    assert not isinstance(vanilla, skipvision.SkipVisionMixin)
