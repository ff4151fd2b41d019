"""Merge (method.md 8.9), summary (8.8) and config properties."""

from __future__ import annotations

import pytest
import torch

import skipvision
from skipvision import ImageLayout, SkipVisionConfig, SummaryScorer, bipartite_merge, num_image_tokens
from skipvision.config import VisionFacts


def reference_merge(x: torch.Tensor, num_out: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Loop implementation of method.md 3.3 for one sample; returns outputs and each output's group."""
    n = x.shape[0]
    r = n - num_out
    u = x / x.norm(dim=-1, keepdim=True)
    g = u @ u.T
    g.fill_diagonal_(0)
    order = sorted(range(n), key=lambda i: (-g[i].sum().item(), i))
    sources, dests = order[:r], order[r:]
    groups = [[d] for d in dests]
    for a in sources:
        best = max(range(len(dests)), key=lambda j: (g[a, dests[j]].item(), -j))
        groups[best].append(a)
    return torch.stack([x[grp].mean(0) for grp in groups]), groups


def test_merge_matches_loop_reference_and_conserves_mass():
    torch.manual_seed(0)
    x = torch.randn(3, 30, 8, dtype=torch.float64)
    out = bipartite_merge(x, 11)
    assert out.shape == (3, 11, 8)
    for b in range(3):
        ref, groups = reference_merge(x[b], 11)
        assert torch.allclose(out[b], ref, atol=1e-12)
        assert sorted(i for grp in groups for i in grp) == list(range(30))  # each input in exactly one output
        sizes = torch.tensor([len(grp) for grp in groups], dtype=x.dtype)
        assert torch.allclose((sizes[:, None] * out[b]).sum(0), x[b].sum(0), atol=1e-10)


def test_merge_identity_independence_and_identical_groups():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 4)
    assert bipartite_merge(x, 12) is x
    alone = bipartite_merge(x[1:], 5)
    assert torch.allclose(bipartite_merge(x, 5)[1:], alone)
    # groups of identical tokens: every output equals the token of its group
    a, b = torch.eye(4)[0], torch.eye(4)[1]
    identical = torch.stack([a] * 5 + [b] * 3).unsqueeze(0)
    out = bipartite_merge(identical, 4)[0]
    assert all(torch.equal(o, a) or torch.equal(o, b) for o in out)
    with pytest.raises(ValueError, match="cannot merge 12 tokens into 0"):
        bipartite_merge(x, 0)


def test_merge_output_follows_redundancy_rank():
    torch.manual_seed(2)
    x = torch.randn(1, 20, 6, dtype=torch.float64)
    u = x[0] / x[0].norm(dim=-1, keepdim=True)
    g = u @ u.T
    g.fill_diagonal_(0)
    kept = g.sum(-1).argsort(descending=True, stable=True)[8:]
    _, groups = reference_merge(x[0], 12)
    assert [grp[0] for grp in groups] == kept.tolist()


def test_merge_gradients_flow_through_values():
    x = torch.randn(1, 10, 4, requires_grad=True)
    bipartite_merge(x, 4).sum().backward()
    assert x.grad.abs().sum() > 0


def test_summary_properties():
    torch.manual_seed(0)
    scorer = SummaryScorer(8)
    with torch.no_grad():
        scorer.score.weight.normal_(0, 1.0)
    z = torch.randn(2, 7, 8)
    w = scorer.weights(z)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(2))
    sigma = scorer(z)
    assert sigma.shape == (2, 1, 8)
    assert torch.allclose(sigma[:, 0], (w.unsqueeze(-1) * z).sum(1), atol=1e-6)  # a convex combination
    perm = torch.randperm(7)
    assert torch.allclose(scorer(z[:, perm]), sigma, atol=1e-6)  # permutation invariant
    same = torch.randn(1, 1, 8).expand(1, 5, 8)
    assert torch.allclose(scorer(same), same[:, :1], atol=1e-6)
    scorer.reset_parameters()
    with torch.no_grad():
        scorer.score.weight.zero_()
    assert torch.allclose(scorer(z), z.mean(1, keepdim=True), atol=1e-6)  # zero weight: the mean


def test_summary_scorer_receives_gradients():
    scorer = SummaryScorer(8)
    z = torch.randn(2, 5, 8)
    (scorer(z) * torch.randn(2, 1, 8)).sum().backward()
    assert scorer.score.weight.grad.abs().sum() > 0 and scorer.norm.weight.grad.abs().sum() > 0


def test_config_validation_and_round_trip():
    cfg = SkipVisionConfig(num_retained=100, num_skipped=156, skip_layers=[3, 1])
    assert cfg.skip_layers == (1, 3)
    assert num_image_tokens(cfg) == 258 and cfg.skipped_span == (101, 257)
    assert SkipVisionConfig.from_dict(cfg.to_dict()) == cfg
    plain = SkipVisionConfig(num_retained=4, num_skipped=6, summary_tokens=False)
    assert num_image_tokens(plain) == 10 and plain.skipped_span == (4, 10)
    bad = [
        (dict(num_retained=-1, num_skipped=3), "num_retained must be a non-negative int"),
        (dict(num_retained=2, num_skipped=3, selection="diagonal"), "unknown selection"),
        (dict(num_retained=2, num_skipped=3, merge="avg"), "unknown merge"),
        (dict(num_retained=2, num_skipped=0), "summary_tokens=True pools over R and over S"),
        (dict(num_retained=2, num_skipped=3, skip_layers=(1, 1)), "duplicates"),
        (dict(num_retained=2, num_skipped=3, skip_layers=(-1,)), "non-negative layer indices"),
        (dict(num_retained=0, num_skipped=0, summary_tokens=False), "at least 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            SkipVisionConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown SkipVisionConfig option"):
        SkipVisionConfig.from_dict({"num_retained": 1, "num_skipped": 1, "ratio": 2})
    with pytest.raises(ValueError, match="larger than the 576 visual tokens"):
        SkipVisionConfig(num_retained=500, num_skipped=100).check_against(VisionFacts(576, 576, True, 32))
    # a variable-size (anyres) family: N_r is bounded by the base image, N_s by nothing
    SkipVisionConfig(num_retained=576, num_skipped=2000).check_against(VisionFacts(576, None, True, 32))
    with pytest.raises(ValueError, match="larger than the 576 tokens the model can retain per image"):
        SkipVisionConfig(num_retained=600, num_skipped=10).check_against(VisionFacts(576, None, True, 32))
    with pytest.raises(ValueError, match="num_retained=None keeps every visual token"):
        SkipVisionConfig(num_retained=None, num_skipped=3)
    with pytest.raises(ValueError, match="skip_layers must be a list"):
        SkipVisionConfig(num_retained=2, num_skipped=3, skip_layers=3)


def test_image_layout_per_image_count():
    cfg = SkipVisionConfig(num_retained=4, num_skipped=6)
    assert cfg.image_layout(20) == ImageLayout(4, 6, True)  # 16 candidates merged to 6
    assert cfg.image_layout(8) == ImageLayout(4, 4, True)  # 4 candidates, fewer than N_s: all skipped, unmerged
    assert cfg.image_layout(4) == ImageLayout(4, 0, False)  # nothing to skip: R alone, no summaries
    assert cfg.image_layout(20).total == 12 and cfg.image_layout(8).skipped_span == (5, 9)
    native = skipvision.vanilla_config().image_layout(37)
    assert native.native and native.total == 37 and native.skipped == 0


def test_in_place_and_fractional_configs():
    cfg = SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection="grid")
    layout = cfg.image_layout(36)
    assert (layout.retained, layout.skipped, layout.total, layout.in_place) == (9, 27, 36, True)
    assert SkipVisionConfig(0.25, 4, selection="grid").image_layout(32).total == 8 + 4 + 2
    assert SkipVisionConfig(0.01, 4).retained_count(10) == 1  # a fraction keeps at least one token
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        SkipVisionConfig(1.5, 4)
    with pytest.raises(ValueError, match="layout='inplace'"):
        SkipVisionConfig(0.25, 4, layout="inplace")  # merge / summary / num_skipped of the full layout
    with pytest.raises(ValueError, match="unknown layout"):
        SkipVisionConfig(0.25, 4, layout="sideways")
    with pytest.raises(ValueError, match="full_layout|depends on the image"):
        SkipVisionConfig(0.25, 4).full_layout()
    round_trip = SkipVisionConfig.from_dict(cfg.to_dict())
    assert round_trip == cfg


def test_grid_selection_keeps_a_regular_sub_grid():
    from skipvision.selection import grid_scores

    keep = grid_scores((1, 4, 8)).topk(8).indices.sort().values
    rows, cols = keep // 8, keep % 8
    assert set(rows.tolist()) == {0, 2} and set(cols.tolist()) == {0, 2, 4, 6}  # every 2nd row and column
    keep16 = grid_scores((1, 8, 8)).topk(4).indices.sort().values
    assert keep16.tolist() == [0, 4, 32, 36]  # a sixteenth: every 4th row and column
    video = grid_scores((2, 4, 4))
    assert torch.equal(video[:16], video[16:])  # each frame the same pattern


def test_in_place_flags_follow_the_selection():
    from skipvision.selection import random_scores
    from skipvision.sequence import in_place_flags

    def kept(selection, grid):
        cfg = SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection=selection)
        return (~in_place_flags([32], [grid], cfg, "cpu")).nonzero().squeeze(1).tolist()

    assert kept("grid", (1, 4, 8)) == [0, 2, 4, 6, 16, 18, 20, 22]
    assert kept("random", (1, 4, 8)) == random_scores(32).topk(8).indices.sort().values.tolist()
    assert kept("position", None) == list(range(8))


def test_in_place_config_is_the_valid_in_place_setting():
    cfg = skipvision.in_place_config(0.25)
    assert cfg == SkipVisionConfig(0.25, None, "grid", "none", summary_tokens=False, layout="inplace")
    assert skipvision.in_place_config(9, "random", skip_kv_cache=False).skip_kv_cache is False
