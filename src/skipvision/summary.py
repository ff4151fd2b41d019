"""Adaptive summary tokens: attention pooling with a tiny learned scorer (method.md 3.4)."""

from __future__ import annotations

import torch
from torch import nn


class SummaryScorer(nn.Module):
    """``LayerNorm(d) -> Linear(d, 1)``, softmax over a group of tokens, weighted sum of the group.

    One instance is shared by sigma_R and sigma_S, as in the paper's code.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.score = nn.Linear(hidden_size, 1)

    def reset_parameters(self, std: float = 0.02) -> None:
        """The paper's initialisation: HF ``_init_weights`` for a Linear and a LayerNorm."""
        nn.init.normal_(self.score.weight, mean=0.0, std=std)
        nn.init.zeros_(self.score.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooling weights ``(n, k)`` for ``tokens (n, k, d)``: non-negative, summing to 1."""
        return self.score(self.norm(tokens)).squeeze(-1).float().softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summary token ``(n, 1, d)``: a convex combination of ``tokens (n, k, d)``."""
        return (self.weights(tokens).to(tokens.dtype).unsqueeze(-1) * tokens).sum(dim=1, keepdim=True)
