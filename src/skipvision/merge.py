"""One-shot bipartite token merge (ToMe-style), as in Skip-Vision's official code (method.md 3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergePlan:
    """Which tokens merge into which: ``destinations (n, num_out)`` are the kept tokens (their indices, in output
    order); ``sources (n, N - num_out)`` are averaged into output ``assignment (n, N - num_out)``."""

    sources: torch.Tensor
    destinations: torch.Tensor
    assignment: torch.Tensor

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """Merge ``tokens (n, N, d)`` (the planned tokens, or any per-token features aligned with them) to
        ``(n, num_out, d)``: each output is the plain mean of its destination and the sources assigned to it."""
        n, _, dim = tokens.shape
        num_out = self.destinations.shape[1]
        pick = lambda idx: tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, dim))  # noqa: E731
        index = self.assignment.unsqueeze(-1).expand(-1, -1, dim)
        merged = pick(self.destinations).scatter_add(1, index, pick(self.sources))
        counts = torch.ones(n, num_out, 1, dtype=tokens.dtype, device=tokens.device)
        ones = torch.ones_like(self.sources, dtype=tokens.dtype).unsqueeze(-1)
        counts = counts.scatter_add(1, self.assignment.unsqueeze(-1), ones)
        return merged / counts


def merge_plan(tokens: torch.Tensor, num_out: int) -> MergePlan:
    """Plan merging ``tokens (n, N, d)`` down to ``num_out``.

    The ``N - num_out`` most redundant tokens (largest total cosine similarity to all others) are sources; each goes
    to its most similar remaining token (destination). Outputs follow the descending-redundancy order of the kept
    tokens. Indices carry no gradient.
    """
    n, total, _ = tokens.shape
    if not 0 < num_out <= total:
        raise ValueError(f"cannot merge {total} tokens into {num_out}")
    num_sources = total - num_out
    with torch.no_grad():
        unit = tokens.float()
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = unit @ unit.transpose(1, 2)
        similarity.diagonal(dim1=1, dim2=2).zero_()
        order = similarity.sum(-1).argsort(dim=-1, descending=True, stable=True)
        if num_sources == 0:  # nothing merges: the tokens stay in their own order
            order = torch.arange(total, device=tokens.device).expand(n, total)
        sources, destinations = order[:, :num_sources], order[:, num_sources:]
        source_rows = similarity.gather(1, sources.unsqueeze(-1).expand(-1, -1, total))
        assignment = source_rows.gather(2, destinations.unsqueeze(1).expand(-1, num_sources, -1)).argmax(-1)
    return MergePlan(sources, destinations, assignment)


def bipartite_merge(tokens: torch.Tensor, num_out: int) -> torch.Tensor:
    """Merge ``tokens (n, N, d)`` down to ``(n, num_out, d)`` (plain mean, destination counted once); the averaged
    values carry gradient. Nothing to merge returns ``tokens`` itself."""
    if num_out == tokens.shape[1]:
        return tokens
    return merge_plan(tokens, num_out).apply(tokens)
