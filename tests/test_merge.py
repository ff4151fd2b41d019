"""The one-shot bipartite merge (``merge.py``; method.md 3.3, 8.9)."""

from __future__ import annotations

import pytest
import torch

from skipvision import bipartite_merge


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
