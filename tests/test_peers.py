"""Peer methods before the language model (skipvision.peers): the full budget is the vanilla model, the token
count per image is the budget, and the analytic FLOPs match FlopCounterMode."""

from __future__ import annotations

import pytest
from conftest import IMAGE_TOKEN_ID, pair, prompts

import skipvision
from skipvision import flops as F
from skipvision.harness import measure
from skipvision.peers import token_drop, tome, visionzip
from skipvision.skip_kv import skip_kv_state


def _visual_tokens(model) -> int:
    return skipvision.vision_facts(model.config).fixed_visual_tokens


@pytest.mark.parametrize("peer", ["visionzip", "tome", "drop-random", "drop-position"])
def test_full_budget_is_the_vanilla_model(peer):
    vanilla, _ = pair(skipvision.vanilla_config())
    v = _visual_tokens(vanilla)
    cfg = {
        "visionzip": visionzip(v, 0),
        "tome": tome(v),
        "drop-random": token_drop(v, "random"),
        "drop-position": token_drop(v, "position"),
    }[peer]
    _, model = pair(cfg)
    ids, mask, pixels = prompts([1, 2], v, [3, 1], [2, 4])
    ref = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (out - ref)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize(
    "cfg",
    [visionzip(6, 4), tome(10), token_drop(10, "random"), token_drop(10, "position")],
    ids=["visionzip", "tome", "drop-random", "drop-position"],
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
    vision = sum(F.vision_flops(shape, 1).values()) + F.skip_vision_overhead(shape, cfg, 1)
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
