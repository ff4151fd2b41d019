"""Split visual tokens into retained tokens R and skip candidates C.

A selection is a small strategy object: it says whether it needs a CLS token or the image's token grid, how it
scores the eligible tokens (from the input of one vision attention module, or from the grid), and what that costs.
Families capture that input; the config names the strategy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn


class _TowerFree:
    """A selection that takes nothing from the tower: no attention scores, no extra FLOPs."""

    def tower_free_scores(
        self, eligible: int, grid: tuple[int, int, int] | None, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """Scores ``(eligible,)`` that rank an image's eligible tokens without the tower (None: raster order)."""
        return None

    def scores(self, attention: nn.Module | None, hidden_states: torch.Tensor | None) -> None:
        return None

    def overhead_flops(self, vision_hidden: int, vision_tokens: int) -> int:
        return 0


@dataclass(frozen=True)
class PositionSelection(_TowerFree):
    """The first N_r eligible tokens in raster order; needs nothing from the tower."""

    name: str = "position"
    needs_cls: bool = False
    needs_grid: bool = False


@dataclass(frozen=True)
class ClsAttentionSelection:
    """The N_r eligible tokens with the largest CLS attention (VisionZip "dominant" tokens), in raster order."""

    name: str = "cls_attention"
    needs_cls: bool = True
    needs_grid: bool = False

    def tower_free_scores(
        self, eligible: int, grid: tuple[int, int, int] | None, device: torch.device | str | None = None
    ) -> None:
        return None  # ranked by the tower's CLS attention, which the family captures

    def scores(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return cls_attention_scores(attention, hidden_states)

    def overhead_flops(self, vision_hidden: int, vision_tokens: int) -> int:
        """The CLS query, every key, and the CLS row of the logits, per tower pass."""
        h = vision_hidden
        return 2 * h * h + 2 * vision_tokens * h * h + 2 * vision_tokens * h


@dataclass(frozen=True)
class GridSelection(_TowerFree):
    """A regular sub-grid of the image's token grid, coarsest first (see :func:`grid_scores`).

    The default for towers without CLS. It needs nothing from the tower, so the tokens to skip are known before
    the tower runs; every region of the image keeps tokens (a score ranking can leave whole regions with none);
    and the retained tokens form a lower-resolution view of the image, which is what a dynamic-resolution model
    (Qwen-VL) is trained on anyway.
    """

    name: str = "grid"
    needs_cls: bool = False
    needs_grid: bool = True

    def tower_free_scores(
        self, eligible: int, grid: tuple[int, int, int] | None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        # without a stated grid: a square one if the count is a square, else one row
        return grid_scores(grid or square_grid(eligible) or (1, 1, eligible), device)


@dataclass(frozen=True)
class RandomSelection(_TowerFree):
    """A fixed pseudo-random subset of N_r eligible tokens (the same for every image of the same size): the floor
    the peer comparison measures the other selections against."""

    name: str = "random"
    needs_cls: bool = False
    needs_grid: bool = False

    def tower_free_scores(
        self, eligible: int, grid: tuple[int, int, int] | None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return random_scores(eligible, device)


def random_scores(tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Scores ``(tokens,)`` of :class:`RandomSelection`, seeded by the token count (reproducible)."""
    generator = torch.Generator().manual_seed(tokens)
    return torch.rand(tokens, generator=generator).to(device)


Selection = PositionSelection | ClsAttentionSelection | GridSelection | RandomSelection

SELECTIONS: dict[str, Selection] = {
    s.name: s for s in (ClsAttentionSelection(), GridSelection(), PositionSelection(), RandomSelection())
}


@functools.lru_cache(maxsize=256)
def _grid_scores(grid: tuple[int, int, int], device: torch.device | str | None) -> torch.Tensor:
    t, h, w = grid

    def level(n: int) -> torch.Tensor:
        index = torch.arange(n, device=device)
        return torch.where(index == 0, 64, (index & -index).float().log2().long())

    spatial = torch.minimum(level(h)[:, None], level(w)[None, :]).flatten().float()
    order = torch.arange(h * w, device=device, dtype=torch.float32)
    score = spatial * (h * w) - order  # coarser level first, then raster order: all distinct
    return score.repeat(t)


def square_grid(tokens: int) -> tuple[int, int, int] | None:
    """``(1, s, s)`` when ``tokens`` is a perfect square ``s * s``, else None (no known grid)."""
    side = math.isqrt(tokens)
    return (1, side, side) if side * side == tokens else None


def grid_scores(grid: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Scores ``(t * h * w,)`` over a ``(t, h, w)`` token grid in raster order whose top-k is a regular sub-grid.

    A token's level is how coarse a grid it lies on: every 2**k-th row and column (``k`` = the smaller 2-adic
    valuation of its row and column, row and column 0 counting as any). Keeping a quarter of an even grid keeps
    exactly every 2nd row and column, a sixteenth every 4th; other counts fill the next finer grid in raster
    order. Each frame of a video gets the same pattern.
    """
    return _grid_scores(tuple(int(n) for n in grid), device).clone()  # cached: the same grids recur


def selection_strategy(name: str) -> Selection:
    try:
        return SELECTIONS[name]
    except KeyError:
        raise ValueError(f"unknown selection {name!r}; choose one of {tuple(SELECTIONS)}") from None


def cls_attention_scores(attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention of a CLIP-style attention module, summed over heads.

    ``hidden_states`` is the module's input (after its pre-norm), shape ``(n, 1 + P, width)`` with CLS first.
    Returns ``(n, P)``. Only the CLS query is projected: this is a small extra cost next to the tower, and it
    works whatever attention backend the tower runs (SDPA and flash kernels do not return weights).
    """
    for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale"):
        if not hasattr(attention, name):
            raise TypeError(
                f"selection='cls_attention' needs a CLIP-style attention module with {name!r}; "
                f"{type(attention).__name__} has none. Use selection='position'."
            )
    n, tokens, _ = hidden_states.shape
    query = attention.q_proj(hidden_states[:, :1]).view(n, 1, attention.num_heads, attention.head_dim)
    keys = attention.k_proj(hidden_states).view(n, tokens, attention.num_heads, attention.head_dim)
    logits = torch.einsum("nqhd,nkhd->nhqk", query.float(), keys.float()) * attention.scale
    weights = logits.softmax(dim=-1)[:, :, 0, 1:]  # (n, heads, P): drop the CLS column
    return weights.sum(dim=1)
