"""SparseVLM (Zhang et al., ICML 2025; arXiv 2410.04417), as its official code does it in version v1.5 (the main
branch's default, ``USE_VERSION`` unset; github.com/Gumpest/SparseVLMs, tag ``v1.5``, main @ ``26a5f48``), inside
the language model through ``SkipVisionConfig.llm_drop`` with ``llm_drop_rule="sparsevlm"``
(``skipvision.llm_drop``). Notes on the official code, with v1 and v2.0: docs/peers/sparsevlm.md.

Followed (``M`` = ``llava/model/language_model/modelling_sparse_llama.py``, ``S`` = ``.../score.py``, ``U`` =
``.../utils.py``, all at main @ 26a5f48):

- text raters, once per prefill from the language model's input embeddings (``M:198-204``): of the tokens after the
  image, those whose ``mean_v softmax_t(V T^T)`` is above the mean;
- pruning after decoder layers 2, 6 and 15 of 32 (``M:70``); each runs on the current sequence and caches all of it
  (``M:229-237``), and its *output* loses tokens (``M:271-320``);
- scores: the pruning layer's attention probabilities, head mean, rater rows, visual columns, rater mean
  (``S:23-33``); the top ``min(count, present - 1)`` kept, in their order (``S:39-42``), with the counts of
  ``S:11-20`` for ``RETAIN_TOKN`` (64: 66 / 30 / 17 of 576);
- recycling (``M:277-305``): the best-scored ``int(0.3 * dropped) + 1`` dropped tokens (the layer's output hidden
  states) are clustered by DPC-KNN into ``int(n / 10) + 1`` tokens (``U:179-239``, plain means), placed after the
  kept visual tokens and counted as visual tokens from then on;
- positions renumbered ``0 .. L'-1`` after each pruning (``M:302, 314``: the leading ids of a prefill), and a decoded
  token's position in each layer is that layer's cache length (``M:653-655``); each layer's cache holds the sequence
  it ran on.

Departures, each with its reason:

- the layers are scaled to the model's depth (``round((l + 1) * num_layers / 32) - 1``, then made increasing): the
  official code keeps ``[2, 6, 15]`` whatever the depth, which a model of fewer layers cannot run;
- the counts are fractions of the official 576 tokens (``round(fraction * N)`` for an image of N tokens): they give
  the official counts back exactly at 576 and scale with other towers; budgets between the four official ones
  interpolate linearly between the two nearest rows, budgets outside scale the nearest row (64 or 192) in proportion
  (capped at every token): the official code has those four rows only (any other ``RETAIN_TOKN`` is a KeyError);
- scores, raters and DPC-KNN distances are computed in at least fp32 (the official code: in the model's fp16, where
  close scores tie), and the scores come from the raters' rows recomputed from the layer's projections rather than
  a full attention matrix (the same numbers: the official code uses those rows only);
- the DPC-KNN density noise (``torch.rand * 1e-6``, ``U:191-192``) is left out, so runs are deterministic (it breaks
  density ties only, and in fp16 it is below the density's resolution);
- a prompt without a text rater (fewer than two tokens after the image) is refused: the official code would rank by
  NaN scores.

Refused, as the official code has no rule for them: batches of more than one sample, padding, more than one image,
training forwards (labels or ``model.training``: a pruning layer in training runs nothing there, ``M:224-225``), and
M-RoPE models. v1 (rank-based counts) and v2.0 (SparseVLM+) are not offered.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SkipVisionConfig, vanilla_config

OFFICIAL_LAYERS = (2, 6, 15)  # M:70, 0-indexed decoder layers of Vicuna-7B
OFFICIAL_DEPTH = 32
OFFICIAL_VISUAL = 576  # LLaVA-1.5's visual tokens per image
#: S:11-20 (v1.5, ``USE_VERSION`` unset): visual tokens kept at the three pruning layers, per ``RETAIN_TOKN``
OFFICIAL_KEPT = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


def pruning_layers(num_layers: int) -> tuple[int, ...]:
    """The official pruning layers (2, 6, 15 of 32) scaled to ``num_layers``: the same share of layers runs before
    each pruning, at least one layer per stage, and a layer after the last."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < len(OFFICIAL_LAYERS) + 1:
        raise ValueError(f"SparseVLM prunes after three layers, with one after: num_layers >= 4, got {num_layers!r}")
    layers: list[int] = []
    for layer in OFFICIAL_LAYERS:
        scaled = round((layer + 1) * num_layers / OFFICIAL_DEPTH) - 1
        layers.append(max(scaled, layers[-1] + 1 if layers else 0))
    for i in range(len(layers) - 1, -1, -1):  # room at the end: the last pruning leaves a layer to run after it
        layers[i] = min(layers[i], num_layers - 1 - (len(layers) - i))
    return tuple(layers)


def kept_per_layer(budget: float) -> tuple[float, ...]:
    """Visual tokens kept at the three pruning layers, of 576, for a ``RETAIN_TOKN`` budget: the official row at 64,
    96, 128 and 192; linear between the two nearest rows in between; the nearest row scaled in proportion outside
    (capped at 576)."""
    rows = sorted(OFFICIAL_KEPT)
    if budget in OFFICIAL_KEPT:
        return tuple(float(k) for k in OFFICIAL_KEPT[budget])
    if budget < rows[0] or budget > rows[-1]:
        edge = rows[0] if budget < rows[0] else rows[-1]
        return tuple(min(float(OFFICIAL_VISUAL), k * budget / edge) for k in OFFICIAL_KEPT[edge])
    low = max(r for r in rows if r < budget)
    high = min(r for r in rows if r > budget)
    t = (budget - low) / (high - low)
    return tuple(a + t * (b - a) for a, b in zip(OFFICIAL_KEPT[low], OFFICIAL_KEPT[high]))


def sparsevlm(tokens: int, num_layers: int, visual: int = OFFICIAL_VISUAL) -> SkipVisionConfig:
    """SparseVLM v1.5 at the budget of ``tokens`` visual tokens per image (the official ``RETAIN_TOKN``: 64, 96,
    128 or 192 on LLaVA-1.5's 576), for a ``num_layers``-layer language model whose images have ``visual`` tokens:
    the budget is read as ``tokens * 576 / visual`` of 576 (so ``sparsevlm(64, 32)`` is the official 64 setting),
    and the kept counts become fractions of the image's tokens."""
    if isinstance(visual, bool) or not isinstance(visual, int) or visual < 1:
        raise ValueError(f"visual is the image's token count, a positive int; got {visual!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not 0 < tokens < visual:
        raise ValueError(f"SparseVLM's budget must be between 0 and the image's {visual} tokens, got {tokens!r}")
    kept = kept_per_layer(tokens * OFFICIAL_VISUAL / visual)
    schedule = tuple((layer, k / OFFICIAL_VISUAL) for layer, k in zip(pruning_layers(num_layers), kept))
    return replace(vanilla_config(), llm_drop=schedule, llm_drop_rule="sparsevlm")
