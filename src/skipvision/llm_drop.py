"""Dropping visual tokens inside the language model (FastV, PyramidDrop, SparseVLM): after decoder layer ``l`` the
visual tokens least attended by each sample's query token(s) leave the sequence, so every later layer runs on fewer
tokens (attention, FFN and its cache entries).

A schedule is ``((layer, keep), ...)``: after ``layer``, keep the fraction ``keep`` of the sample's visual tokens
(of all it had, not of those left). The *rule* (``SkipVisionConfig.llm_drop_rule``, ``drop_schedule.DROP_RULES``)
says how: FastV's ranks by layer ``l``'s own attention on its input and keeps true positions; PyramidDrop's ranks by
the next layer's attention on layer ``l``'s output (its input norm and q/k), counts with ``int``, averages the
queries before every answer in training, and renumbers the positions after each drop; SparseVLM's (batch 1,
inference) ranks by the attention of text raters picked from the input embeddings, and *recycles* part of what it
drops: DPC-KNN clusters of the best-scored dropped tokens join the sequence after the kept visual tokens as new
tokens (slots whose full-coordinate index is :data:`RECYCLED`; they count as visual tokens at the next drop and
vanish at the end, like any dropped token). The tokens are removed for real: the layers after a drop get gathered
hidden states, rotary embeddings (recomputed when positions are renumbered), positions and masks, and the last layer
scatters its output back into the full sequence, where a dropped token keeps the hidden state it had when it left
(its logits are nobody's: it is an image placeholder). The KV cache of a layer holds only the tokens that layer saw
(recycled ones included); decode steps gather each layer's mask columns to match and shift their positions by what
the layer's stage dropped (:class:`DropCacheState`).

The attention score is computed from the layer's own projections and rotary embedding, so it needs no eager
attention anywhere; it costs one query (SparseVLM: one per rater) and the keys of one layer per drop (the FLOPs model
counts one query).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .cache_rows import RowStateCacheMixin
from .drop_schedule import (
    kept_count,
    ranks_with_next_layer,
    recycled_counts,
    recycles,
    renumbers_positions,
    stage_counts,
)
from .masks import answer_start, compact_slots
from .mixing import mix_into, unmix

#: forward kwarg carrying the prefill's :class:`DropPlan` down the decoder stack
DROP_PLAN_KWARG = "skip_vision_drop_plan"
STATE_ATTR = "skip_vision_drop_state"
#: the full-coordinate index of a recycled slot (a token made by the drop, not one of the prompt's)
RECYCLED = -1


@dataclass
class DropPlan:
    """One prefill's dropping: the schedule, which tokens are visual, each sample's query token, and (filled as
    the layers run) the full-coordinate index of each layer's input tokens (:data:`RECYCLED` for a recycled slot)."""

    schedule: tuple[tuple[int, float], ...]
    visual: torch.Tensor  # (batch, L) bool
    query_index: torch.Tensor  # (batch, Q) long: the tokens whose attention ranks the visual tokens
    num_layers: int
    padding: torch.Tensor | None = None  # (batch, L) bool: padding columns, which no query attends
    query_valid: torch.Tensor | None = None  # (batch, Q) bool: which of a sample's Q query slots are real
    rule: str = "fastv"
    layers: nn.ModuleList | None = None  # the decoder layers (a rule that ranks with the next layer reads them)
    rotary: nn.Module | None = None  # the text model's rotary embedding (a rule that renumbers positions)
    index: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, n) long
    valid: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, n) bool
    positions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, n) renumbered position ids
    full_hidden: torch.Tensor | None = None  # (batch, L, d): every token's latest hidden state
    raters: torch.Tensor | None = None  # (R,) long: SparseVLM's text raters (full coordinates), set by layer 0

    @property
    def stages(self) -> dict[int, float]:
        return dict(self.schedule)

    def input_tokens(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(index, valid)`` of the tokens layer ``layer_idx`` sees, or None before the first drop."""
        start = _latest_start(self.index, layer_idx)
        return None if start is None else (self.index[start], self.valid[start])


def _latest_start(starts: dict[int, Any], layer_idx: int) -> int | None:
    """The last layer at or before ``layer_idx`` where a reduced token set starts (None: before the first drop)."""
    return max((start for start in starts if start <= layer_idx), default=None)


def query_indices(
    attention_mask: torch.Tensor | None, labels: torch.Tensor | None, shape: torch.Size, every_answer: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index (batch, Q), valid (batch, Q))``: each sample's query tokens. Without ``labels``, its last non-padding
    token; with them, the token before its first supervised label (``every_answer``: before each answer span, every
    turn of a multi-turn record, as PyramidDrop trains). A sample without any label keeps its last token."""
    batch, length = shape
    positions = torch.arange(length).expand(batch, length)
    if attention_mask is not None:
        positions = positions.to(attention_mask.device)
        last = torch.where(attention_mask.bool(), positions, -1).amax(1)
    else:
        last = torch.full((batch,), length - 1)
    last = last.clamp_min(0)
    if labels is None:
        return last[:, None], torch.ones(batch, 1, dtype=torch.bool, device=last.device)
    labels = labels.to(last.device)
    if not every_answer:
        first = answer_start(labels)
        first = torch.where(first < length, first - 1, last).clamp_min(0)
        return first[:, None], torch.ones(batch, 1, dtype=torch.bool, device=last.device)
    before = torch.zeros(batch, length, dtype=torch.bool, device=last.device)
    before[:, :-1] = (labels[:, :-1] == -100) & (labels[:, 1:] != -100)
    before[~before.any(1), :] = False
    before[torch.arange(batch, device=last.device), last] |= ~before.any(1)  # no answer: the last token
    width = int(before.sum(1).max())
    order = (~before).long().argsort(dim=1, stable=True)[:, :width]  # each sample's query positions first
    return order, torch.arange(width, device=last.device)[None] < before.sum(1, keepdim=True)


def query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: Any,
    query: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(batch, n)``: the attention of the tokens ``query (batch, Q)`` over every token of ``hidden`` (the input
    ``layer`` normalises) under ``layer``'s projections, softmax over each query's row in ``dtype``, averaged over
    heads and then over the valid queries; keys after a query, or not in ``key_valid`` (padding), get zero.
    Recomputed from the layer's projections and its module's ``apply_rotary_pos_emb`` (Llama-style attention;
    q_norm/k_norm applied when present)."""
    attn = layer.self_attn
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise TypeError(f"{type(attn).__name__}'s module has no apply_rotary_pos_emb; in-LLM dropping cannot score it")
    batch, n, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    rows = torch.arange(batch, device=hidden.device)[:, None]
    head_dim, queries = attn.head_dim, query.shape[1]
    q = attn.q_proj(normed[rows, query]).view(batch, queries, -1, head_dim)
    k = attn.k_proj(normed).view(batch, n, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (batch, heads, tokens, head_dim)
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    q, _ = rope(q, q, cos[rows, query], sin[rows, query])
    _, k = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).to(dtype) * head_dim**-0.5  # (batch, heads, Q, n)
    blocked = torch.arange(n, device=hidden.device)[None, None, :] > query[:, :, None]  # (batch, Q, n)
    if key_valid is not None:
        blocked = blocked | ~key_valid[:, None, :]
    probs = scores.masked_fill(blocked[:, None], float("-inf")).softmax(-1).mean(1)  # (batch, Q, n)
    if query_valid is None:
        return probs.mean(1)
    weights = query_valid.to(probs.dtype)
    return (probs * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True)


def _gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` gathered along ``dim`` (its sequence axis) at per-sample ``index (batch, n)``; a batch axis of size 1
    is broadcast."""
    batch = index.shape[0]
    if dim == t.ndim - 1:  # position ids: (batch, L) or (k, batch, L)
        idx = index.expand(*t.shape[:-2], batch, index.shape[1]) if t.ndim > 2 else index
        return t.expand(*t.shape[:-2], batch, t.shape[-1]).gather(-1, idx)
    t = t.expand(batch, *t.shape[1:])
    idx = index.view(batch, -1, *([1] * (t.ndim - 2))).expand(batch, index.shape[1], *t.shape[2:])
    return t.gather(1, idx)


def _blocked(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min, dtype=mask.dtype)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(True if mask.dtype == torch.bool else 0, dtype=mask.dtype)


def _prefill_mask(mask: Any, index: torch.Tensor, valid: torch.Tensor, recycled: bool = False) -> Any:
    """The layer's 4-D mask restricted to the kept tokens (rows and columns); invalid slots are blocked as keys.
    ``recycled``: the slots may be :data:`RECYCLED`, which have no row or column in the full mask."""
    if mask is None:
        if bool(valid.all()):
            return None  # kept tokens stay in order: plain causal attention is still right
        rows = index[:, :, None] >= index[:, None, :]
        return (rows & valid[:, None, :])[:, None]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise TypeError("in-LLM dropping needs eager or SDPA attention (a 4-D mask or none)")
    batch, n = index.shape
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    columns = index.clamp_min(0) if recycled else index
    gathered = mask.gather(2, columns[:, None, :, None].expand(batch, heads, n, mask.shape[3]))
    gathered = gathered.gather(3, columns[:, None, None, :].expand(batch, heads, n, n))
    if recycled:
        # a recycled slot is an unpadded token of the stage: it sees, and is seen, causally in slot order (the
        # official code runs the new sequence under a plain causal mask)
        new = index < 0
        causal = torch.ones(n, n, dtype=torch.bool, device=index.device).tril()
        slot_order = torch.where(causal, _visible(mask).to(mask.device), _blocked(mask).to(mask.device))
        gathered = torch.where((new[:, :, None] | new[:, None, :])[:, None], slot_order, gathered)
    return torch.where(valid[:, None, None, :], gathered, _blocked(mask).to(mask.device))


def select_kept(plan: DropPlan, scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, keep: float):
    """New ``(index, valid)`` after a drop: every non-visual token, plus each sample's top visual tokens (padding
    leaves too: no query attends it)."""
    visual = plan.visual.gather(1, index) & valid
    total = plan.visual.sum(1)
    keep_counts = torch.tensor([kept_count(int(v), keep, plan.rule) for v in total.tolist()], device=index.device)
    ranked = torch.where(visual, scores, float("-inf"))
    # rank of each visual token by score within its sample (0 = most attended)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    stays = valid & (~visual | (rank < keep_counts[:, None]))
    if plan.padding is not None:
        stays = stays & ~plan.padding.gather(1, index)
    # kept tokens first, in sequence order; shorter samples fill the tail with invalid slots
    slots, new_valid = compact_slots(stays)
    return index.gather(1, slots), new_valid, slots


def run_layer(layer: nn.Module, layer_idx: int, forward, hidden: torch.Tensor, kwargs: dict, plan: DropPlan):
    """One decoder layer of a prefill under ``plan``: gather inputs, run, score and drop, scatter back at the end."""
    current = plan.input_tokens(layer_idx)
    if current is not None:
        index, valid = current
        kwargs = _reduced_kwargs(kwargs, hidden, index, valid, plan, layer_idx)
    elif layer_idx == 0 and recycles(plan.rule):
        plan.raters = text_raters(hidden, plan.visual)  # from the input embeddings, once (official: before layer 0)
    out = forward(hidden, **kwargs)
    keep = plan.stages.get(layer_idx)
    # a recycled slot has no row in the full sequence: it is left out when scattering back
    scatter = _scatter_real if recycles(plan.rule) else _scatter_valid
    if keep is not None:
        batch, length = plan.visual.shape
        if current is None:
            index = torch.arange(length, device=hidden.device).expand(batch, length)
            valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        full = out.new_zeros(batch, length, out.shape[-1]) if plan.full_hidden is None else plan.full_hidden
        plan.full_hidden = scatter(full, out, index, valid)
        if recycles(plan.rule):
            index, valid, out = recycle_drop(plan, layer, hidden, out, kwargs["position_embeddings"], index, keep)
        else:
            index, valid, out = _rank_and_drop(plan, layer, layer_idx, hidden, out, kwargs, index, valid, keep)
        plan.index[layer_idx + 1], plan.valid[layer_idx + 1] = index, valid
        if renumbers_positions(plan.rule):  # the kept tokens' positions are 0, 1, ... in order
            plan.positions[layer_idx + 1] = (valid.long().cumsum(1) - 1).clamp_min(0)
    if layer_idx == plan.num_layers - 1 and plan.full_hidden is not None:
        out = scatter(plan.full_hidden, out, index, valid)
    return out


def _rank_and_drop(
    plan: DropPlan,
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    out: torch.Tensor,
    kwargs: dict,
    index: torch.Tensor,
    valid: torch.Tensor,
    keep: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FastV's and PyramidDrop's drop after layer ``layer_idx``: ``(index, valid, out)`` of the kept tokens."""
    query = (index[:, None, :] == plan.query_index[:, :, None]).long().argmax(2)  # (batch, Q) slots
    # FastV ranks with this layer's attention on its input; PyramidDrop with the next layer's on its output
    ranker, ranked = (plan.layers[layer_idx + 1], out) if ranks_with_next_layer(plan.rule) else (layer, hidden)
    with torch.no_grad():
        keys = valid if plan.padding is None else valid & ~plan.padding.gather(1, index)
        scores = query_attention(ranker, ranked.detach(), kwargs["position_embeddings"], query, keys, plan.query_valid)
    index, valid, slots = select_kept(plan, scores, index, valid, keep)
    return index, valid, _gather_seq(out, slots, 1)


def _reduced_kwargs(
    kwargs: dict, hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, plan: DropPlan, layer_idx: int
) -> dict:
    """A layer's kwargs for the tokens it sees after a drop: rotary embeddings and position ids gathered (true
    positions) or recomputed (renumbered ones), the mask restricted to the kept tokens."""
    kwargs = dict(kwargs)
    if renumbers_positions(plan.rule):
        positions = plan.positions[_latest_start(plan.positions, layer_idx)]
        kwargs["position_embeddings"] = plan.rotary(hidden, positions)
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = positions
    else:
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_gather_seq(cos, index, 1), _gather_seq(sin, index, 1))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], index, kwargs["position_ids"].ndim - 1)
    kwargs["attention_mask"] = _prefill_mask(kwargs.get("attention_mask"), index, valid, recycles(plan.rule))
    return kwargs


def _scatter_valid(full: torch.Tensor, part: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``full`` with rows ``index`` replaced by ``part`` where ``valid`` (out of place, differentiable)."""
    idx = index[:, :, None].expand(-1, -1, full.shape[-1])
    current = full.gather(1, idx)
    return full.scatter(1, idx, torch.where(valid[:, :, None], part, current))


def _scatter_real(full: torch.Tensor, part: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`_scatter_valid` where ``index`` may hold :data:`RECYCLED` slots: they go to a spare row, dropped."""
    length = full.shape[1]
    spare = torch.cat([full, full[:, :1]], dim=1)
    return _scatter_valid(spare, part, torch.where(index < 0, length, index), valid)[:, :length]


# --- SparseVLM: text raters, ranking, token recycling (official: Gumpest/SparseVLMs, v1.5) ----------------------
def _image_span(visual: torch.Tensor) -> tuple[int, int]:
    """``(start, end)`` of the one image's visual tokens of a batch-1 prompt (full coordinates)."""
    where = visual[0].nonzero()[:, 0]
    return int(where[0]), int(where[-1]) + 1


def text_raters(embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (modelling_sparse_llama.py:198-204), full-coordinate indices: of the tokens after the
    image, those whose relevance ``mean_v softmax_t(V T^T)`` (raw input embeddings, softmax over the text) is above
    the mean. Computed in at least fp32 (the official code: the model's dtype)."""
    start, end = _image_span(visual)
    work = embeds[0].detach().to(torch.promote_types(embeds.dtype, torch.float32))
    relevance = (work[start:end] @ work[end:].T).softmax(-1).mean(0)
    raters = (relevance > relevance.mean()).nonzero()[:, 0]
    if raters.numel() == 0:
        # the official code would rank by the mean over no rows (NaN scores)
        raise ValueError(
            "llm_drop_rule='sparsevlm' found no text rater: it needs text after the image whose relevance to it "
            "differs between tokens (two or more tokens after the image)"
        )
    return raters + end


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """``(clusters, d)``: DPC-KNN clusters of ``x (N, d)``, each the mean of its members (utils.py:179-239, after
    TCFormer). Distances ``|x_i - x_j| / sqrt(d)``; density ``exp(-mean d^2)`` over the ``clusters`` nearest (self
    included); ``delta_i`` the distance to the nearest denser token (the largest distance if none); centers the top
    ``rho * delta``, in that order; every token joins its nearest center, a center itself. Distances and densities in
    at least fp32, the mean in ``x``'s dtype with the official ``1 / (count + 1e-6)`` weights. The official density
    noise (``torch.rand * 1e-6``, which makes runs differ) is left out: ties keep their index order."""
    n, d = x.shape
    work = x.to(torch.promote_types(x.dtype, torch.float32))[None]
    dist = torch.cdist(work, work, compute_mode="donot_use_mm_for_euclid_dist")[0] / d**0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: token j is denser than token i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centers = (delta * density).topk(clusters).indices
    assign = dist[centers].argmin(0)
    assign[centers] = torch.arange(clusters, device=x.device)
    total = x.new_zeros(clusters, 1).index_add_(0, assign, x.new_ones(n, 1)) + 1e-6
    return x.new_zeros(clusters, d).index_add_(0, assign, x * (x.new_ones(n, 1) / total[assign]))


def recycle(dropped: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """SparseVLM's token recycling (modelling_sparse_llama.py:277-290): the dropped tokens' hidden states
    ``(N, d)`` (in sequence order) with their scores; the best-scored ``int(0.3 N) + 1``, in score order, clustered
    into ``int(n / 10) + 1`` tokens by :func:`dpc_knn_merge`."""
    recycled, clusters = recycled_counts(dropped.shape[0])
    return dpc_knn_merge(dropped[scores.topk(recycled).indices], clusters)


def recycle_drop(
    plan: DropPlan,
    layer: nn.Module,
    hidden: torch.Tensor,
    out: torch.Tensor,
    rope: Any,
    index: torch.Tensor,
    keep: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseVLM v1.5 after a pruning layer (modelling_sparse_llama.py:221-307, score.py:23-46), batch 1:
    ``(index, valid, out)`` of ``[prefix, kept visual (in order), recycled clusters, text]``. The visual tokens
    present (recycled ones included) are scored by the text raters' attention in ``layer`` on its input ``hidden``
    (head mean, rater mean; at least fp32), the top ``min(count, present - 1)`` kept; the dropped ones' *output*
    hidden states are recycled."""
    length, n = plan.visual.shape[1], index.shape[1]
    start, end = _image_span(plan.visual)
    stop = n - (length - end)  # text is never dropped: it is the stage's last ``length - end`` slots
    with torch.no_grad():
        raters = plan.raters[None] - length + n
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        scores = query_attention(layer, hidden.detach(), rope, raters, dtype=dtype)[0, start:stop]
    kept, _ = stage_counts(stop - start, end - start, keep, plan.rule)
    stays = torch.zeros_like(scores, dtype=torch.bool)
    stays[scores.topk(kept).indices] = True
    visual = torch.arange(start, stop, device=index.device)
    merged = recycle(out[0, visual[~stays]], scores[~stays]).to(out.dtype)[None]
    new = index.new_full((1, merged.shape[1]), RECYCLED)
    out = torch.cat([out[:, :start], out[:, visual[stays]], merged, out[:, stop:]], dim=1)
    index = torch.cat([index[:, :start], index[:, visual[stays]], new, index[:, stop:]], dim=1)
    return index, torch.ones_like(index, dtype=torch.bool), out


def check_recycling_prefill(visual: torch.Tensor, mask: torch.Tensor | None, labels: Any, training: bool) -> None:
    """What SparseVLM's official code runs: inference, one sample, no padding, one image (one run of visual tokens).
    Anything else is refused here, before the prefill."""
    if training or labels is not None:
        raise NotImplementedError(
            "llm_drop_rule='sparsevlm' is training-free: the official code has no training path (a pruning layer "
            "in training runs nothing, modelling_sparse_llama.py:224-225), and its top-k and clustering are not "
            "differentiable; call it in eval mode without labels"
        )
    if visual.shape[0] != 1:
        raise NotImplementedError(
            f"llm_drop_rule='sparsevlm' runs batch 1 only, as the official code (one image offset, one rater set "
            f"and one renumbering per forward; score.py:42 indexes sample 0); got a batch of {visual.shape[0]}: "
            "run the samples one at a time"
        )
    if mask is not None and not bool(mask.all()):
        raise NotImplementedError(
            "llm_drop_rule='sparsevlm' runs unpadded prompts only (batch 1, as its official code)"
        )
    start, end = _image_span(visual)
    if int(visual[0].sum()) != end - start:
        raise NotImplementedError(
            "llm_drop_rule='sparsevlm' takes one image per prompt, as the official code (one run of visual tokens, "
            "then the text its raters come from)"
        )


# --- decoding from a cache whose later layers hold fewer prompt tokens ----------------------------------------------
@dataclass
class DropCacheState:
    """Which prompt columns each reduced layer's cache holds: ``index[l] (batch, n_l)`` (:data:`RECYCLED` for a
    recycled token), ``valid[l]``."""

    prompt_length: int
    index: dict[int, torch.Tensor]
    valid: dict[int, torch.Tensor]
    all_valid: dict[int, bool]  # computed once, so decode steps need no device sync (rows selected later keep it)
    #: renumbered positions: layer -> (batch,) how far a new token's position moves down there (the prompt tokens
    #: the layer's stage no longer holds), and the rotary embedding to recompute them with
    position_shift: dict[int, torch.Tensor] = field(default_factory=dict)
    rotary: nn.Module | None = None

    @property
    def batch_size(self) -> int:
        return next(iter(self.index.values())).shape[0]

    def select_rows(self, rows: torch.Tensor) -> DropCacheState:
        return replace(
            self,
            index={k: v[rows.to(v.device)] for k, v in self.index.items()},
            valid={k: v[rows.to(v.device)] for k, v in self.valid.items()},
            position_shift={k: v[rows.to(v.device)] for k, v in self.position_shift.items()},
        )

    def decode_positions(self, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Renumbered positions: the layer's new tokens continue from its stage's own prompt length."""
        start = _latest_start(self.position_shift, layer_idx)
        position_ids = kwargs.get("position_ids")
        if start is None or not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
            return
        positions = position_ids - self.position_shift[start][:, None].to(position_ids.device)
        kwargs["position_ids"] = positions
        kwargs["position_embeddings"] = self.rotary(hidden, positions)

    def decode_mask(self, layer_idx: int, mask: Any, query_length: int, cached: int) -> Any:
        """Layer ``layer_idx``'s mask for ``query_length`` new tokens over its own cache (``cached`` entries before
        them): the prompt columns it kept gathered, its invalid slots blocked."""
        start = _latest_start(self.index, layer_idx)
        if start is None:
            return mask
        index, valid = self.index[start], self.valid[start]
        batch, n = index.shape
        if mask is None:
            if self.all_valid[start]:
                return None
            generated = cached - n + query_length
            cols = torch.arange(generated, device=valid.device)
            rows = torch.arange(query_length, device=valid.device) + (cached - n)
            causal = (cols[None, :] <= rows[:, None]).expand(batch, 1, query_length, generated)
            return torch.cat([valid[:, None, None, :].expand(batch, 1, query_length, n), causal], dim=-1)
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise TypeError("in-LLM dropping needs eager or SDPA attention (a 4-D mask or none)")
        mask = mask.expand(batch, *mask.shape[1:])
        heads, q = mask.shape[1], mask.shape[2]
        columns = index.clamp_min(0)[:, None, None, :].expand(batch, heads, q, n)
        prompt = mask[..., : self.prompt_length].gather(3, columns)
        # a recycled slot stands for prompt tokens (of a sample without padding): new tokens see it
        prompt = torch.where((index < 0)[:, None, None, :], _visible(mask).to(mask.device), prompt)
        prompt = torch.where(valid[:, None, None, :], prompt, _blocked(mask).to(mask.device))
        return torch.cat([prompt, mask[..., self.prompt_length :]], dim=-1)


class DropLayerMixin:
    """Mixed into a decoder layer (on top of the Skip-FFN layer) of a model with a drop schedule: a prefill that
    carries a :class:`DropPlan` runs the layer on its kept tokens (and drops after it, at a stage end); a decode
    step over a cache that holds fewer prompt tokens in this layer gets the mask of the columns it kept."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = kwargs.pop(DROP_PLAN_KWARG, None)
        layer_idx = self.self_attn.layer_idx
        if plan is not None:
            return run_layer(self, layer_idx, super().forward, hidden_states, kwargs, plan)
        cache = kwargs.get("past_key_values")
        state = cache_state(cache)
        if state is not None:
            cached = int(cache.layers[layer_idx].get_seq_length()) if layer_idx < len(cache.layers) else 0
            kwargs["attention_mask"] = state.decode_mask(
                layer_idx, kwargs.get("attention_mask"), hidden_states.shape[1], cached
            )
            state.decode_positions(layer_idx, hidden_states, kwargs)
        return super().forward(hidden_states, *args, **kwargs)


def enable_llm_drop(layers: nn.ModuleList, schedule: tuple[tuple[int, float], ...]) -> None:
    """Mix :class:`DropLayerMixin` into every layer when there is a schedule, take it off when there is none. Call it
    after the Skip-FFN swap (``enable_skip_ffn``), which it sits on top of."""
    for layer in layers:
        unmix(layer, DropLayerMixin)
        if schedule:
            mix_into(layer, DropLayerMixin)


class DropCacheMixin(RowStateCacheMixin):
    """Mixed into the cache of a prefill that dropped tokens: beam reordering moves the bookkeeping too; cropping
    (assisted decoding) is refused, since the layers hold different prompt lengths."""

    state_attr = STATE_ATTR

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a cache whose later layers dropped visual tokens (llm_drop) cannot be cropped: assisted and "
            "prompt-lookup decoding are not supported with in-LLM dropping"
        )


def check_cache(cache: Any) -> None:
    """In-LLM dropping writes fewer entries into later layers: only plain dynamic cache layers keep that apart."""
    if cache is None:
        return
    if not isinstance(cache, Cache):
        raise TypeError(f"in-LLM dropping needs a transformers Cache, got {type(cache).__name__}")
    for layer_idx, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"in-LLM dropping (llm_drop) needs the default dynamic cache; layer {layer_idx} is "
                f"{type(layer).__name__} (static, sliding and quantized layers index by position)"
            )


def attach_state(cache: Cache, plan: DropPlan) -> None:
    """Record on ``cache`` which prompt columns each reduced layer holds (after the prefill under ``plan``)."""
    all_valid = {start: bool(valid.all()) for start, valid in plan.valid.items()}
    shift = {}
    if renumbers_positions(plan.rule):
        prompt = plan.visual.shape[1] if plan.padding is None else (~plan.padding).sum(1)
        shift = {start: prompt - valid.sum(1) for start, valid in plan.valid.items()}
    state = DropCacheState(plan.visual.shape[1], dict(plan.index), dict(plan.valid), all_valid, shift, plan.rotary)
    setattr(cache, STATE_ATTR, state)
    mix_into(cache, DropCacheMixin)


def cache_state(cache: Any) -> DropCacheState | None:
    return getattr(cache, STATE_ATTR, None)
