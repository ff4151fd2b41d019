"""VisionZip (Yang et al., 2024), before the language model: ``dominant`` tokens with the largest CLS attention
in the feature layer, plus ``contextual`` tokens merged from all the others.

Differences from the paper's code, stated: the contextual tokens come from Skip-Vision's one-shot bipartite merge
(the most redundant tokens averaged into their most similar kept token) rather than VisionZip's evenly spaced
targets matched by key similarity; both keep the budget exactly. Needs a tower with a CLS token (CLIP), as VisionZip
does.
"""

from __future__ import annotations

from ..config import SkipVisionConfig
from .base import before_llm


def visionzip(dominant: int, contextual: int) -> SkipVisionConfig:
    """``dominant + contextual`` tokens per image, all running full decoder blocks and kept in the cache."""
    return before_llm(dominant, contextual, "cls_attention", "tome")
