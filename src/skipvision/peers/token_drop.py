"""Token dropping before the language model: keep ``budget`` tokens of each image and remove the rest. The floors
of the peer comparison: ``order="random"`` (a fixed pseudo-random subset) or ``order="position"`` (the first
``budget`` in raster order)."""

from __future__ import annotations

from ..config import SkipVisionConfig
from .base import before_llm

ORDERS = ("random", "position")


def token_drop(budget: int, order: str = "random") -> SkipVisionConfig:
    """``budget`` kept tokens per image, the others dropped; the kept ones run full blocks and stay cached."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    return before_llm(budget, 0, order, "drop")
