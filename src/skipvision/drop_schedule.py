"""A drop schedule (FastV, PyramidDrop, SparseVLM): ``((layer, keep), ...)``, after decoder layer ``layer`` keep the
fraction ``keep`` of each sample's visual tokens. Its checks and its token counts, torch-free: ``config.py`` checks a
schedule with them, the FLOPs model counts with them and ``llm_drop.py`` (the mechanism) drops by them."""

from __future__ import annotations

from typing import Any


def check_schedule(schedule: Any, num_layers: int | None = None) -> tuple[tuple[int, float], ...]:
    """The schedule as a tuple of ``(layer, keep)`` pairs, checked: layers increasing and before the last layer,
    fractions in (0, 1] and non-increasing."""
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ValueError(f"llm_drop must be a list of (layer, keep_fraction) pairs, got {schedule!r}")
    pairs = []
    for entry in schedule:
        if not hasattr(entry, "__len__") or len(entry) != 2:
            raise ValueError(f"llm_drop entries are (layer, keep_fraction) pairs, got {entry!r}")
        layer, keep = entry
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"llm_drop layer must be a non-negative int, got {layer!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(f"llm_drop keep fraction must be in (0, 1], got {keep!r}")
        pairs.append((layer, float(keep)))
    for (l0, k0), (l1, k1) in zip(pairs, pairs[1:]):
        if l1 <= l0 or k1 > k0:
            raise ValueError(
                f"llm_drop stages must have increasing layers and non-increasing keep fractions, got {pairs}"
            )
    if num_layers is not None and pairs and pairs[-1][0] >= num_layers - 1:
        raise ValueError(
            f"llm_drop layer {pairs[-1][0]} leaves no later layer to save: the language model has {num_layers} "
            f"layers, so drops go after layers 0..{num_layers - 2}"
        )
    return tuple(pairs)


#: how a schedule drops (``SkipVisionConfig.llm_drop_rule``):
#: ``fastv``: rank by layer ``l``'s own attention on its input, keep ``round(keep * N)`` (at least 1), true positions;
#: ``pyramid_drop``: the official PyramidDrop: rank by layer ``l + 1``'s attention (its input norm and q/k) on layer
#: ``l``'s output, keep ``int(keep * N)`` (may be 0), average the queries before every answer in training, and
#: renumber the positions after each drop; ``pyramid_drop_true_positions``: the same with true positions kept (a
#: departure from the official code, for M-RoPE families, whose 3-D positions the official code has no rule for);
#: ``sparsevlm``: the official SparseVLM v1.5 (batch 1, inference): rank by the mean attention of the text raters
#: (picked once from the input embeddings) in layer ``l`` on its input, keep the top ``round(keep * N)`` but at most
#: all present visual tokens but one, recycle the best-scored 30 % of the dropped ones into DPC-KNN clusters placed
#: after the kept visual tokens (new tokens: they count as visual tokens from then on), renumber the positions
DROP_RULES = ("fastv", "pyramid_drop", "pyramid_drop_true_positions", "sparsevlm")

#: SparseVLM's token recycling (modelling_sparse_llama.py:282-286): the top ``int(RECYCLE_SHARE * dropped) + 1`` of
#: the dropped tokens by score are clustered into ``int(recycled / CLUSTER_DIVISOR) + 1`` tokens
RECYCLE_SHARE = 0.3
CLUSTER_DIVISOR = 10


def check_rule(rule: Any) -> str:
    if rule not in DROP_RULES:
        raise ValueError(f"unknown llm_drop_rule {rule!r}; choose one of {DROP_RULES}")
    return rule


def ranks_with_next_layer(rule: str) -> bool:
    return rule.startswith("pyramid_drop")


def renumbers_positions(rule: str) -> bool:
    return rule in ("pyramid_drop", "sparsevlm")


def recycles(rule: str) -> bool:
    """Whether a drop adds new (recycled) tokens to the sequence: SparseVLM's clusters of dropped tokens."""
    return rule == "sparsevlm"


def kept_count(visual: int, keep: float, rule: str = "fastv") -> int:
    """Visual tokens a sample with ``visual`` of them keeps at fraction ``keep``: FastV rounds (at least 1 if any),
    PyramidDrop truncates (``int``, as its official code), SparseVLM rounds (its official counts are fractions of 576
    here, which rounding gives back exactly; :func:`stage_counts` caps them by the tokens present)."""
    if ranks_with_next_layer(rule):
        return min(visual, int(keep * visual))
    if recycles(rule):
        return min(visual, round(keep * visual))
    return min(visual, max(1 if visual else 0, round(keep * visual)))


def recycled_counts(dropped: int) -> tuple[int, int]:
    """``(recycled, clusters)`` of SparseVLM's recycling of ``dropped`` tokens (modelling_sparse_llama.py:282-286):
    the best-scored ``int(0.3 * dropped) + 1`` are clustered into ``int(recycled / 10) + 1``; none without drops."""
    if dropped <= 0:
        return 0, 0
    recycled = int(dropped * RECYCLE_SHARE) + 1
    return recycled, int(recycled / CLUSTER_DIVISOR) + 1


def stage_counts(present: int, visual: int, keep: float, rule: str = "fastv") -> tuple[int, int]:
    """``(kept, added)`` at a drop for a sample with ``visual`` visual tokens, ``present`` of them (recycled ones
    included) in the dropping layer's input: the tokens kept, and the recycled tokens added after them. SparseVLM
    keeps ``min(count, present - 1)`` (score.py:41: its top-k always drops one at least) and always recycles."""
    kept = kept_count(visual, keep, rule)
    if not recycles(rule):
        return kept, 0
    if present == 0:  # score.py:43-45: nothing to rank, nothing dropped
        return 0, 0
    kept = min(kept, present - 1)
    return kept, recycled_counts(present - kept)[1]


def visual_per_layer(
    visual: int, schedule: tuple[tuple[int, float], ...], num_layers: int, rule: str = "fastv"
) -> list[int]:
    """Visual tokens in each layer's input for a sample with ``visual`` of them (the FLOPs model's count); a dropping
    layer runs on what it had, the next on what it kept plus what it recycled (SparseVLM's clusters)."""
    counts, present = [], visual
    stages = dict(schedule)
    for layer in range(num_layers):
        counts.append(present)
        if layer in stages:
            present = sum(stage_counts(present, visual, stages[layer], rule))
    return counts


def check_without_skipping(
    schedule: tuple[tuple[int, float], ...], skips: bool, skip_kv_cache: bool, skip_layers: Any
) -> None:
    """A schedule removes visual tokens inside the language model: it cannot run beside skipped tokens."""
    if schedule and (skips or skip_kv_cache):
        raise ValueError(
            "llm_drop removes visual tokens inside the language model and cannot be combined with skipped "
            "tokens: set skip_layers=() (or num_retained=None) and skip_kv_cache=False; got "
            f"skip_layers={skip_layers}, skip_kv_cache={skip_kv_cache}"
        )
