"""Dropping visual tokens inside the language model (FastV, PyramidDrop): after decoder layer ``l`` the visual tokens
least attended by each sample's last instruction token leave the sequence, so every later layer runs on fewer
tokens (attention, FFN and its cache entries).

A schedule is ``((layer, keep), ...)``: after ``layer``, keep the fraction ``keep`` of the sample's visual tokens
(of all it had, not of those left), ranked by the attention of the query token over them in that layer, averaged
over heads. The tokens are removed for real: the layers after a drop get gathered hidden states, rotary embeddings,
positions and masks (true positions are kept, nothing is renumbered), and the last layer scatters its output back
into the full sequence, where a dropped token keeps the hidden state it had when it left (its logits are nobody's:
it is an image placeholder). The KV cache of a layer holds only the tokens that layer saw; decode steps gather each
layer's mask columns to match (:class:`DropCacheState`).

The attention score is computed from the layer's own projections and rotary embedding, so it needs no eager
attention anywhere; it costs one query and the keys of one layer per drop (counted in the FLOPs model).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .cache_rows import RowStateCacheMixin
from .drop_schedule import kept_count
from .masks import answer_start, compact_slots
from .mixing import mix_into, unmix

#: forward kwarg carrying the prefill's :class:`DropPlan` down the decoder stack
DROP_PLAN_KWARG = "skip_vision_drop_plan"
STATE_ATTR = "skip_vision_drop_state"


@dataclass
class DropPlan:
    """One prefill's dropping: the schedule, which tokens are visual, each sample's query token, and (filled as
    the layers run) the full-coordinate index of each layer's input tokens."""

    schedule: tuple[tuple[int, float], ...]
    visual: torch.Tensor  # (batch, L) bool
    query_index: torch.Tensor  # (batch,) long: the token whose attention ranks the visual tokens
    num_layers: int
    padding: torch.Tensor | None = None  # (batch, L) bool: padding columns, which no query attends
    index: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, n) long
    valid: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, n) bool
    full_hidden: torch.Tensor | None = None  # (batch, L, d): every token's latest hidden state

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


def query_indices(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Each sample's last instruction token: the one before its first supervised label when ``labels`` are given
    (training), else its last non-padding token."""
    batch, length = shape
    positions = torch.arange(length).expand(batch, length)
    if attention_mask is not None:
        positions = positions.to(attention_mask.device)
        last = torch.where(attention_mask.bool(), positions, -1).amax(1)
    else:
        last = torch.full((batch,), length - 1)
    if labels is not None:
        first = answer_start(labels).to(last.device)
        last = torch.where(first < length, first - 1, last)  # samples without labels keep their last token
    return last.clamp_min(0)


def last_query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: Any,
    query: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(batch, n)``: attention of token ``query[b]`` over every token of ``hidden`` (the layer's input) in this
    layer, averaged over heads; keys after the query, or not in ``key_valid`` (padding), get zero. Recomputed from
    the layer's projections and its module's ``apply_rotary_pos_emb`` (Llama-style attention; q_norm/k_norm applied
    when present)."""
    attn = layer.self_attn
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise TypeError(f"{type(attn).__name__}'s module has no apply_rotary_pos_emb; in-LLM dropping cannot score it")
    batch, n, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    rows = torch.arange(batch, device=hidden.device)
    head_dim = attn.head_dim
    q = attn.q_proj(normed[rows, query]).view(batch, 1, -1, head_dim)
    k = attn.k_proj(normed).view(batch, n, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (batch, heads, tokens, head_dim)
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    q, _ = rope(q, q, cos[rows, query][:, None], sin[rows, query][:, None])
    _, k = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * head_dim**-0.5  # (batch, heads, n)
    blocked = torch.arange(n, device=hidden.device)[None, :] > query[:, None]
    if key_valid is not None:
        blocked = blocked | ~key_valid
    scores = scores.masked_fill(blocked[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)


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


def _prefill_mask(mask: Any, index: torch.Tensor, valid: torch.Tensor) -> Any:
    """The layer's 4-D mask restricted to the kept tokens (rows and columns); invalid slots are blocked as keys."""
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
    gathered = mask.gather(2, index[:, None, :, None].expand(batch, heads, n, mask.shape[3]))
    gathered = gathered.gather(3, index[:, None, None, :].expand(batch, heads, n, n))
    return torch.where(valid[:, None, None, :], gathered, _blocked(mask).to(mask.device))


def select_kept(plan: DropPlan, scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, keep: float):
    """New ``(index, valid)`` after a drop: every non-visual token, plus each sample's top visual tokens (padding
    leaves too: no query attends it)."""
    visual = plan.visual.gather(1, index) & valid
    total = plan.visual.sum(1)
    keep_counts = torch.tensor([kept_count(int(v), keep) for v in total.tolist()], device=index.device)
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
        kwargs = dict(kwargs)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_gather_seq(cos, index, 1), _gather_seq(sin, index, 1))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], index, kwargs["position_ids"].ndim - 1)
        kwargs["attention_mask"] = _prefill_mask(kwargs.get("attention_mask"), index, valid)
    out = forward(hidden, **kwargs)
    keep = plan.stages.get(layer_idx)
    if keep is not None:
        batch, length = plan.visual.shape
        if current is None:
            index = torch.arange(length, device=hidden.device).expand(batch, length)
            valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        query = (index == plan.query_index[:, None]).long().argmax(1)
        with torch.no_grad():
            keys = valid if plan.padding is None else valid & ~plan.padding.gather(1, index)
            scores = last_query_attention(layer, hidden, kwargs["position_embeddings"], query, keys)
        full = out.new_zeros(batch, length, out.shape[-1]) if plan.full_hidden is None else plan.full_hidden
        plan.full_hidden = _scatter_valid(full, out, index, valid)
        index, valid, slots = select_kept(plan, scores, index, valid, keep)
        plan.index[layer_idx + 1], plan.valid[layer_idx + 1] = index, valid
        out = _gather_seq(out, slots, 1)
    if layer_idx == plan.num_layers - 1 and plan.full_hidden is not None:
        out = _scatter_valid(plan.full_hidden, out, index, valid)
    return out


def _scatter_valid(full: torch.Tensor, part: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``full`` with rows ``index`` replaced by ``part`` where ``valid`` (out of place, differentiable)."""
    idx = index[:, :, None].expand(-1, -1, full.shape[-1])
    current = full.gather(1, idx)
    return full.scatter(1, idx, torch.where(valid[:, :, None], part, current))


# --- decoding from a cache whose later layers hold fewer prompt tokens ----------------------------------------------
@dataclass
class DropCacheState:
    """Which prompt columns each reduced layer's cache holds: ``index[l] (batch, n_l)``, ``valid[l]``."""

    prompt_length: int
    index: dict[int, torch.Tensor]
    valid: dict[int, torch.Tensor]
    all_valid: dict[int, bool]  # computed once, so decode steps need no device sync (rows selected later keep it)

    @property
    def batch_size(self) -> int:
        return next(iter(self.index.values())).shape[0]

    def select_rows(self, rows: torch.Tensor) -> DropCacheState:
        return replace(
            self,
            index={k: v[rows.to(v.device)] for k, v in self.index.items()},
            valid={k: v[rows.to(v.device)] for k, v in self.valid.items()},
        )

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
        prompt = mask[..., : self.prompt_length].gather(3, index[:, None, None, :].expand(batch, heads, q, n))
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
    state = DropCacheState(plan.visual.shape[1], dict(plan.index), dict(plan.valid), all_valid)
    setattr(cache, STATE_ATTR, state)
    mix_into(cache, DropCacheMixin)


def cache_state(cache: Any) -> DropCacheState | None:
    return getattr(cache, STATE_ATTR, None)
