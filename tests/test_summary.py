"""The summary tokens (``summary.py``; method.md 3.4, 8.8)."""

from __future__ import annotations

import torch

from skipvision import SummaryScorer


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
