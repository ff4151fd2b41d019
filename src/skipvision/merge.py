"""One-shot bipartite token merge (ToMe-style), as in Skip-Vision's official code (method.md 3.3)."""

from __future__ import annotations

import torch


def bipartite_merge(tokens: torch.Tensor, num_out: int) -> torch.Tensor:
    """Merge ``tokens (n, N, d)`` down to ``(n, num_out, d)``.

    The ``N - num_out`` most redundant tokens (largest total cosine similarity to all others) are sources; each is
    averaged into its most similar remaining token (plain mean, destination counted once). Outputs follow the
    descending-redundancy order of the kept tokens. Indices carry no gradient; the averaged values do.
    """
    n, total, dim = tokens.shape
    if not 0 < num_out <= total:
        raise ValueError(f"cannot merge {total} tokens into {num_out}")
    num_sources = total - num_out
    if num_sources == 0:
        return tokens
    with torch.no_grad():
        unit = tokens.float()
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = unit @ unit.transpose(1, 2)
        similarity.diagonal(dim1=1, dim2=2).zero_()
        order = similarity.sum(-1).argsort(dim=-1, descending=True, stable=True)
        sources, destinations = order[:, :num_sources], order[:, num_sources:]
        source_rows = similarity.gather(1, sources.unsqueeze(-1).expand(-1, -1, total))
        assignment = source_rows.gather(2, destinations.unsqueeze(1).expand(-1, num_sources, -1)).argmax(-1)
    pick = lambda idx: tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, dim))  # noqa: E731
    index = assignment.unsqueeze(-1).expand(-1, -1, dim)
    merged = pick(destinations).scatter_add(1, index, pick(sources))
    counts = torch.ones(n, num_out, 1, dtype=tokens.dtype, device=tokens.device)
    counts = counts.scatter_add(1, assignment.unsqueeze(-1), torch.ones_like(sources, dtype=tokens.dtype).unsqueeze(-1))
    return merged / counts
