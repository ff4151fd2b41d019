"""LLaVA-PruMerge / PruMerge+ (peers/prumerge.py) against a reference written from the official code
(42Shawn/LLaVA-PruMerge @ 097c041, ``llava/model/multimodal_encoder/clip_encoder.py`` token_prune_merge_advanced
:85-171 and token_prune_merge_advanced_plus :174-281 with ``if_adaptive=False``; docs/peers/prumerge.md): the last
layer's hooked q/k, one-head attention scaled by the feature width, top-k by the CLS row (PruMerge+: plus the evenly
spaced positions), each kept token plus its 32 key neighbours weighted by attention (a per-token loop, as the
official), the extra token, projected."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import pair
from peer_checks import check_cached_decoding, check_tower_reduction_flops, one_image_prompt, reference_logits

import skipvision
from skipvision.peers import prumerge, prumerge_plus

# the module (the package's attribute ``prumerge`` is the function)
prumerge_module = importlib.import_module("skipvision.peers.prumerge")

PATCHES = 64  # the conftest tower: 32 x 32 pixels, patch 4


def _hooked_inputs(tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features hidden_states[-2][:, 1:], q, k)``: q/k are the q_proj / k_proj outputs of the last encoder layer,
    captured by forward hooks as the official code does for ``layers[23]`` (:27-32, :93-94)."""
    attention = tower.encoder.layers[-1].self_attn
    seen = {}
    handles = [
        attention.q_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("q", out)),
        attention.k_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("k", out)),
    ]
    try:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
    finally:
        for handle in handles:
            handle.remove()
    return hidden[:, 1:], seen["q"], seen["k"]


def _complement_idx(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """complement_idx (:12-25) for ``idx (B, L)``: zero the kept entries of arange(dim), sort, drop L."""
    masked = torch.scatter(torch.arange(dim).expand(idx.shape[0], -1), -1, idx, 0)
    return torch.sort(masked, dim=-1).values[:, idx.shape[1] :]


def official_prumerge(vanilla, pixels: torch.Tensor, tokens: int, plus: bool) -> dict[str, torch.Tensor]:
    """The official function, non-adaptive, with ``reduction_ratio`` chosen so that the image gets ``tokens``."""
    x, q, k = _hooked_inputs(vanilla.model.vision_tower, pixels)
    b, n, c = x.shape
    attn = F.softmax((q @ k.transpose(-2, -1)) * c**-0.5, dim=-1)  # :109-110, in fp64 by hand
    cls_attn = attn[:, 0, 1:]  # :112
    ratio = ((tokens - 1) // 2 if plus else tokens - 1) / n
    idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True).indices  # :116 / :205
    if plus:  # :216-227, the literal 575 being N - 1 on CLIP-L/336
        step = int(1 / ratio)
        sequence = torch.arange(int(step / 2), n - 1, int(step))
        assert sequence.numel() == idx.shape[1]  # the official new_idx has room for exactly that
        idx = torch.cat([idx, sequence.expand(b, -1)], dim=1)
    keys = k[:, 1:]  # :119
    compl = _complement_idx(idx, n)  # :124
    kept_x, kept_a = x.gather(1, idx[..., None].expand(-1, -1, c)), cls_attn.gather(1, idx)  # :121-122
    kept_k = F.normalize(keys.gather(1, idx[..., None].expand(-1, -1, c)), p=2, dim=-1)  # :123, :129
    rest_x = x.gather(1, compl[..., None].expand(-1, -1, c))  # :125
    rest_k = F.normalize(keys.gather(1, compl[..., None].expand(-1, -1, c)), p=2, dim=-1)  # :126, :130
    rest_a = cls_attn.gather(1, compl)  # :127
    updated = torch.zeros_like(kept_x)
    for batch in range(b):  # :139-165, literally: row i against every other kept row and the pruned ones
        for i in range(idx.shape[1]):
            others_x = torch.cat([kept_x[batch, :i], kept_x[batch, i + 1 :], rest_x[batch]])
            others_a = torch.cat([kept_a[batch, :i], kept_a[batch, i + 1 :], rest_a[batch]])
            others_k = torch.cat([kept_k[batch, :i], kept_k[batch, i + 1 :], rest_k[batch]])
            cluster = torch.topk(others_k @ kept_k[batch, i], k=32, largest=True).indices  # :154-156
            weighted = torch.sum(others_x[cluster] * others_a[cluster].unsqueeze(-1), dim=0)  # :159-163, no norm
            updated[batch, i] = kept_x[batch, i] + weighted  # :164
    extra = torch.sum(rest_x * rest_a.unsqueeze(-1), dim=1, keepdim=True)  # :168
    kept = torch.cat([updated, extra], dim=1)  # :169
    return {"idx": idx, "kept": kept, "tokens": vanilla.model.multi_modal_projector(kept)}


@pytest.mark.parametrize(
    "plus, tokens",
    [(False, 1), (False, 9), (False, 41), (False, 64), (True, 9), (True, 17), (True, 33), (True, 63)],
    ids=["pm-1", "pm-9", "pm-41", "pm-64", "plus-9", "plus-17", "plus-33", "plus-63"],
)
def test_prumerge_equals_the_official_algorithm(plus, tokens, monkeypatch):
    cfg = prumerge_plus(tokens) if plus else prumerge(tokens)
    vanilla, model = pair(cfg, dtype=torch.float64, vision_layers=4)
    assert skipvision.num_image_tokens(cfg) == tokens
    # a prompt whose greedy continuation holds neither EOS nor the image placeholder id (both in the tiny
    # vocabulary), so that cached decoding runs its four steps on whole image spans
    ids = one_image_prompt(tokens, seed=1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = official_prumerge(vanilla, pixels, tokens, plus)
    # the kept indices the implementation merges around, in order (top-k largest first, then the sampled positions)
    merge, seen = prumerge_module.prumerge_merge, []
    monkeypatch.setattr(prumerge_module, "prumerge_merge", lambda *args: seen.append(args[3]) or merge(*args))
    features = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
    try:
        projected = model.encode_images(pixels)
    finally:
        hook.remove()
    assert torch.equal(seen[0], ref["idx"])
    if plus and tokens == 63:  # the official duplicate handling (sampled positions already kept) is exercised
        assert ref["idx"].unique().numel() < ref["idx"].numel()
    assert features[0].shape == ref["kept"].shape == (1, tokens, features[0].shape[-1])
    # the neighbour sets: a different set gives a different sum, so equal values mean equal sets
    assert (features[0] - ref["kept"]).abs().max() <= 1e-10
    assert (projected - ref["tokens"]).abs().max() <= 1e-10
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert (logits - reference_logits(vanilla, ids, ref["tokens"][0])).abs().max() <= 1e-10
    check_cached_decoding(model, ids, pixels)


def test_prumerge_plus_budgets_are_the_official_fixed_ratio_ones():
    from skipvision.peers.prumerge import plus_positions, prumerge_plus_budgets

    budgets = prumerge_plus_budgets(576)
    assert 65 in budgets and 145 in budgets and 64 not in budgets  # ratio 1/18: 32 + 32 + 1; 1/8: 72 + 72 + 1
    assert plus_positions(72, 576) == list(range(4, 575, 8))  # the official training path, reduction_ratio 1/8
    assert plus_positions(32, 576) == list(range(9, 575, 18))
    assert prumerge_plus_budgets(PATCHES) == [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 33, 43, 63]


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_batches_images_independently(plus):
    """Images batched through the tower are reduced each on its own (rankings and merges per image)."""
    _, model = pair(prumerge_plus(33) if plus else prumerge(41), dtype=torch.float64, vision_layers=4)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together = model.encode_images(pixels)
    alone = torch.cat([model.encode_images(pixels[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max() <= 1e-10


@pytest.mark.parametrize("counts", [(False, 1), (False, 9), (True, 33)])
def test_prumerge_overhead_flops_are_what_it_runs(counts):
    """The reduction's own matmuls are what it runs (``peer_checks.check_tower_reduction_flops``)."""
    check_tower_reduction_flops((prumerge_plus if counts[0] else prumerge)(counts[1]))


def test_prumerge_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="at least 1"):
        prumerge(0)
    with pytest.raises(ValueError, match="2k \\+ 1"):
        prumerge_plus(10)
    # a budget the official fixed-ratio path cannot give on this tower: refused when the tower runs
    _, model = pair(prumerge_plus(23), vision_layers=4)
    with pytest.raises(ValueError, match="prumerge\\+ with 23 tokens"):
        model.encode_images(torch.randn(1, 3, 32, 32))
    # features from the last layer leave no next layer to read q/k from
    vanilla, _ = pair(skipvision.vanilla_config(), vision_layers=4)
    vanilla.config.vision_feature_layer = -1
    model = skipvision.convert(vanilla, prumerge(9))
    with pytest.raises(ValueError, match="reads tower layers"):
        model.encode_images(torch.randn(1, 3, 32, 32))
    # towers without CLS-dropping features (CLIP with vision_feature_select_strategy="full")
    for cfg in (prumerge(9), prumerge_plus(9)):
        vanilla, _ = pair(skipvision.vanilla_config())
        vanilla.config.vision_feature_select_strategy = "full"
        with pytest.raises(ValueError, match="CLS"):
            skipvision.convert(vanilla, cfg)
