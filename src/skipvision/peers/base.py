"""What the peers before the language model share: a shortened image sequence whose tokens all run full decoder
blocks and stay in the cache."""

from __future__ import annotations

from ..config import SkipVisionConfig


def before_llm(num_retained: int, num_skipped: int, selection: str, merge: str) -> SkipVisionConfig:
    """``num_retained`` selected tokens plus ``num_skipped`` merged ones (or none: ``merge="drop"``) per image,
    with no Skip-FFN (``skip_layers=()``), no Skip KV-cache and no summary tokens."""
    return SkipVisionConfig(
        num_retained=num_retained,
        num_skipped=num_skipped,
        selection=selection,
        merge=merge,
        summary_tokens=False,
        skip_kv_cache=False,
        skip_layers=(),
    )


def before_projector(reduction: str, num_retained: int, num_skipped: int) -> SkipVisionConfig:
    """A peer method that reduces each image's tokens before the projector (``tower_reduction``): it hands the
    language model ``num_retained + num_skipped`` tokens, which all run full blocks and stay in the cache."""
    return SkipVisionConfig(
        num_retained=num_retained,
        num_skipped=num_skipped,
        selection="position",
        merge="none",
        summary_tokens=False,
        skip_kv_cache=False,
        skip_layers=(),
        tower_reduction=reduction,
    )
