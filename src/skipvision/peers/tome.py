"""ToMe before the language model: every visual token of an image merged down to ``budget`` tokens with the
one-shot bipartite merge (Bolya et al., 2023, applied once to the projector's output, as token-merging baselines for
VLMs do)."""

from __future__ import annotations

from ..config import SkipVisionConfig
from .base import before_llm


def tome(budget: int) -> SkipVisionConfig:
    """``budget`` merged tokens per image, all running full decoder blocks and kept in the cache."""
    return before_llm(0, budget, "position", "tome")
