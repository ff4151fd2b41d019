"""VisionZip (peers/visionzip.py) against a reference written from the official code (dvlab-research/VisionZip @
3151f6d, ``visionzip/clip_encoder.py`` CLIPVisionTower_VisionZip.forward :42-85 and the key metric of
``visionzip/utils.py`` :22-24,89; docs/peers/visionzip.md): CLS plus the top ``dominant - 1`` patches by the
feature layer's CLS attention summed over heads, in ascending position; the rest matched to evenly spaced targets
by the cosine of that layer's keys averaged over heads; ``target + mean(assigned)``; projected with CLS."""

from __future__ import annotations

import pytest
import torch
from conftest import pair
from peer_checks import check_cached_decoding, check_tower_reduction_flops, one_image_prompt, reference_logits

import skipvision
from skipvision.peers import visionzip


def _tower_outputs(tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(attentions[-2] (eager, fp32 softmax: ranking only), hidden_states[-2], layers[-2]'s head-mean keys)``.

    The keys are the k_proj output of ``layers[-2]`` viewed as heads and averaged (``utils.py:23-24,89``; the
    official patches CLIPAttention to save them, here a hook on k_proj reads the same tensor)."""
    tower.config._attn_implementation = "eager"  # HF returns attention probabilities from the eager path only
    try:
        attentions = tower(pixels, output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = "sdpa"
    attention = tower.encoder.layers[-2].self_attn
    seen = {}
    handle = attention.k_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("k", out))
    try:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
    finally:
        handle.remove()
    n, tokens, _ = hidden.shape
    keys = seen["k"].view(n, tokens, attention.num_heads, attention.head_dim).transpose(1, 2)  # [B, H, T, hd]
    return attentions[-2], hidden, keys.mean(1)


def official_visionzip(vanilla, pixels: torch.Tensor, dominant: int, contextual: int) -> dict[str, torch.Tensor]:
    """The official forward, step by step (clip_encoder.py:51-83), on the HF tower; ``contextual=0`` stops after
    the dominant tokens (the official code divides by zero there)."""
    attn, hidden, metric = _tower_outputs(vanilla.model.vision_tower, pixels)
    b, t, c = hidden.shape
    topk = attn[:, :, 0, 1:].sum(dim=1).topk(dominant - 1, dim=1).indices + 1  # :51-53
    all_indices = torch.cat([torch.zeros(b, 1, dtype=topk.dtype), topk], dim=1)  # :54
    mask = torch.ones(b, t, dtype=torch.bool).scatter_(1, all_indices, False)  # :56
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(b, dominant, c)  # :57
    out = {"dominant_idx": all_indices.sort(dim=1).values, "kept": dominant_tokens}
    if contextual:
        rest = t - dominant
        metric_rest = metric[mask].view(b, rest, metric.shape[2])  # :60
        hidden_rest = hidden.masked_select(mask.unsqueeze(-1)).view(b, rest, c)  # :62
        unit = metric_rest / metric_rest.norm(dim=-1, keepdim=True)  # :64
        step = max(1, rest // contextual)  # :67
        targets = torch.arange(0, rest, step)[:contextual]  # :68
        others = ~torch.isin(torch.arange(rest), targets)
        similarity = torch.bmm(unit[:, others], unit[:, targets].transpose(1, 2))  # :71-72
        one_hot = torch.zeros(b, int(others.sum()), contextual, dtype=hidden.dtype)
        one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)  # :73-74
        counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # :75
        aggregated = torch.bmm(one_hot.transpose(1, 2), hidden_rest[:, others]) / counts  # :76-77
        out["kept"] = torch.cat([dominant_tokens, hidden_rest[:, targets] + aggregated], dim=1)  # :80,83
        out["target_idx"] = torch.nonzero(mask[0]).squeeze(1)[targets]
    out["tokens"] = vanilla.model.multi_modal_projector(out["kept"])  # llava_arch.py:31-35: CLS projected too
    return out


def _projector_input(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(what the projector received, model.encode_images)``: the reduction's pre-projector features."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        tokens = model.encode_images(pixels)
    finally:
        handle.remove()
    return seen[0], tokens


# the prompt seed: one whose greedy continuation holds neither EOS nor the image placeholder id (both in the tiny
# vocabulary), so that cached decoding runs its four steps on whole image spans
@pytest.mark.parametrize("dominant, contextual, prompt", [(1, 0, 2), (6, 4, 1), (30, 10, 1), (54, 10, 1), (2, 62, 1)])
def test_visionzip_equals_the_official_algorithm(dominant, contextual, prompt):
    cfg = visionzip(dominant, contextual)
    vanilla, model = pair(cfg, dtype=torch.float64, vision_layers=4)
    ids = one_image_prompt(skipvision.num_image_tokens(cfg), seed=prompt)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = official_visionzip(vanilla, pixels, dominant, contextual)
    features, tokens = _projector_input(model, pixels)
    assert features.shape == ref["kept"].shape == (1, dominant + contextual, features.shape[-1])
    # the dominant set: each dominant row is one hidden state, at the reference's positions (CLS first, ascending)
    hidden = vanilla.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][0]
    rows = (features[0, :dominant, None] == hidden[None]).all(-1).float().argmax(-1)
    assert torch.equal(rows, ref["dominant_idx"][0])
    # the contextual tokens: a different target or group gives a different sum, so equal values mean equal sets
    assert (features - ref["kept"]).abs().max() <= 1e-10
    assert (tokens - ref["tokens"]).abs().max() <= 1e-10
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert (logits - reference_logits(vanilla, ids, ref["tokens"][0])).abs().max() <= 1e-10
    check_cached_decoding(model, ids, pixels)


def test_visionzip_merged_value_is_target_plus_group_mean():
    """The official contextual value on a hand-made case: target + mean(assigned), not the group mean."""
    from skipvision.peers.visionzip import contextual_tokens

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    # M = 5, contextual = 2: step 2, targets are rest entries 0 and 2; entries 1, 3 go to 2 and 4 goes to 0
    merged = contextual_tokens(hidden, keys, 2)
    expected = torch.tensor([[[1.0 + 0.0, 0.0 + 4.0], [0.0 + 4.0, 2.0 + 0.0]]], dtype=torch.float64)
    assert torch.equal(merged, expected)


def test_visionzip_batches_images_independently():
    """Images batched through the tower are reduced each on its own (rankings and merges per image)."""
    _, model = pair(visionzip(30, 10), dtype=torch.float64, vision_layers=4)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together = model.encode_images(pixels)
    alone = torch.cat([model.encode_images(pixels[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max() <= 1e-10


@pytest.mark.parametrize("counts", [(1, 0), (6, 4), (30, 10)])
def test_visionzip_overhead_flops_are_what_it_runs(counts):
    """The reduction's own matmuls are what it runs (``peer_checks.check_tower_reduction_flops``)."""
    check_tower_reduction_flops(visionzip(*counts))


def test_visionzip_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="CLS token"):
        visionzip(0, 4)
    with pytest.raises(ValueError, match="contextual"):
        visionzip(4, -1)
    # a tower without CLS-dropping features (CLIP with vision_feature_select_strategy="full")
    vanilla, _ = pair(skipvision.vanilla_config())
    vanilla.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="CLS"):
        skipvision.convert(vanilla, visionzip(6, 4))
