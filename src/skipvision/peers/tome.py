"""ToMe (Token Merging, Bolya et al., ICLR 2023; official code: facebookresearch/ToMe @ af95e4b, ``tome/merge.py``
``bipartite_soft_matching`` :18-97, ``merge_wavg`` :210-224, ``merge_source`` :227-238; ``tome/patch/timm.py``
``ToMeBlock.forward`` :34-56, ``ToMeAttention.forward`` :66-96; read in docs/peers/tome.md).

``tome(budget)``: ToMe where its host puts it, inside the vision tower. Every CLIP encoder layer up to and including
the feature layer (LLaVA-1.5: the one whose output is ``hidden_states[-2]``) runs, as ``ToMeBlock`` does:

* attention with proportional attention, ``log(size_j)`` added to every logit toward key ``j``
  (``timm.py:85-86``), through the layer's own HF attention as an additive mask;
* the residual add, then one round of bipartite soft matching on this layer's keys averaged over heads
  (``timm.py:96``): A = even positions, B = odd positions, CLS protected and kept first, at most half of the
  patches per round;
* the size-weighted merge (``merge_wavg``), sizes carried across layers, then the MLP.

The language model gets the feature layer's tokens without CLS, in ToMe's own order ([unmerged A, B] per round;
raster order is not restored, as ToMe never restores it). Layers after the feature layer are left as they are
(their output is not used). ToMe's ``r`` is a count per layer; a budget of tokens is reached exactly by an
explicit per-layer list (ToMe's list form of ``r``, ``utils.py:80-105``) that spreads the reduction evenly.

``tome_after_projector(budget)``: ToMe's bipartite soft matching and size-weighted merge applied in rounds to the
projector's output, as token-merging baselines for VLMs do; not ToMe's host placement (no attention between rounds,
so no proportional attention; the metric is the projected tokens themselves; no CLS to protect).

Departures, with reasons: sizes are kept in at least float32 (ToMe keeps them in the activations' dtype; bf16
counts are exact only up to 256, and in fp32/fp64 this changes nothing); the schedule is an explicit list (ToMe
has no target-count API); layers after the feature layer are not patched (their output is discarded).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import SkipVisionConfig
from ..mixing import mix_into, unmix
from ..tower_reduction import TowerReduction, TowerRun, register_reduction
from .base import before_projector

Merge = Callable[..., torch.Tensor]


def _keep(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> Merge:
    """One ToMe round (``merge.py:18-80``, no distillation token): ``merge(x, mode)`` maps ``(n, T, c)`` to
    ``(n, T - r, c)`` in the order [unmerged A tokens, every B token], A = even positions, B = odd ones; the r A
    tokens whose best cosine match in B is strongest are reduced (``scatter_reduce`` with ``mode``) into it."""
    r = min(r, (metric.shape[1] - int(class_token)) // 2)  # at most half of the unprotected tokens (:43-44)
    if r <= 0:
        return _keep
    with torch.no_grad():  # the matching is a discrete choice; gradient flows through the merged values only
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:  # CLS is A[0]: it never becomes a source
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:  # ascending, so CLS stays first (:66-68)
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge.py:210-224``: each group's size-weighted mean and its summed size (``size`` None: all ones)."""
    if size is None:
        # token counts: at least float32, exact where bf16 is not (ToMe keeps x's dtype)
        size = torch.ones_like(x[..., 0, None], dtype=torch.promote_types(x.dtype, torch.float32))
    total = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return (total / size).to(x.dtype), size


def merge_source(merge: Merge, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """``merge.py:227-238``: ``(n, T_now, T_0)`` 0/1 map from the current tokens to the original ones."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


def _removable(patches: int, rounds: int) -> int:
    """Most patches ``rounds`` ToMe rounds can remove (each at most ``floor(patches / 2)``)."""
    left = patches
    for _ in range(rounds):
        left -= left // 2
    return patches - left


def smallest_reachable(patches: int, rounds: int) -> int:
    """The fewest patch tokens ``rounds`` ToMe rounds leave of ``patches`` (each round at most halves)."""
    return patches - _removable(patches, rounds)


def tome_schedule(patches: int, budget: int, rounds: int) -> list[int]:
    """Per-layer r (ToMe's list form) taking ``patches`` to exactly ``budget`` in ``rounds`` rounds: the reduction
    spread evenly, more in a layer only where the later ones could not absorb the rest (each round at most halves)."""
    lowest = smallest_reachable(patches, rounds)
    if not lowest <= budget <= patches:
        raise ValueError(
            f"ToMe cannot take {patches} patch tokens to {budget} in the {rounds} layer(s) up to the feature layer "
            f"(each round at most halves): the smallest reachable count is {lowest}"
        )
    schedule, left = [], patches - budget
    for layer in range(rounds):
        cap = patches // 2
        r = min(cap, math.ceil(left / (rounds - layer)))
        if left - r > _removable(patches - r, rounds - layer - 1):
            r = min(cap, left)
        schedule.append(r)
        patches, left = patches - r, left - r
    return schedule


# --- in the tower ----------------------------------------------------------------------------------------------


@dataclass
class ToMeState:
    """One tower run's ToMe state (ToMe's ``_tome_info``, reset per forward, ``timm.py:106-111``). Sizes and sources
    are kept per layer input (``sizes[i]``: what layer i receives), so a recomputed layer (gradient checkpointing)
    reads what it read the first time."""

    budget: int
    rounds: int
    trace_source: bool = False
    schedule: list[int] = field(default_factory=list)
    sizes: dict[int, torch.Tensor | None] = field(default_factory=dict)
    sources: dict[int, torch.Tensor | None] = field(default_factory=dict)


class ToMeLayerMixin:
    """``ToMeBlock.forward`` (``timm.py:34-56``) for an HF ``CLIPEncoderLayer``: attention with proportional
    attention, residual, one ToMe round on this layer's keys, the MLP."""

    _tome_index: int  # the layer's index (a class attribute of the mixed class)
    _tome_state: ToMeState

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        state, index = self._tome_state, self._tome_index
        if index == 0:  # the first layer sees the patches: the schedule follows the tower's real token count
            state.schedule = tome_schedule(hidden_states.shape[1] - 1, state.budget, state.rounds)
            state.sizes[0], state.sources[0] = None, None
        size = state.sizes[index]
        if size is not None:  # proportional attention: + log(size_j) on every logit toward key j (timm.py:85-86)
            log_size = size.log()[:, None, None, :, 0].to(hidden_states.dtype)
            attention_mask = log_size if attention_mask is None else attention_mask + log_size
        keys: list[torch.Tensor] = []
        # ToMe's metric is the attention's own keys (timm.py:96): read k_proj's output instead of computing it again
        hook = self.self_attn.k_proj.register_forward_hook(lambda _m, _a, out: keys.append(out))
        try:
            residual = hidden_states
            normed = self.layer_norm1(hidden_states)
            attended, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, **kwargs)
        finally:
            hook.remove()
        x = residual + attended
        source = state.sources[index]
        r = state.schedule[index]
        if r > 0:
            n, t, _ = keys[-1].shape
            metric = keys[-1].view(n, t, self.self_attn.num_heads, -1).mean(dim=2)  # keys averaged over heads
            merge = bipartite_soft_matching(metric, r, class_token=True)
            if state.trace_source:
                source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size)
        state.sizes[index + 1], state.sources[index + 1] = size, source
        return x + self.mlp(self.layer_norm2(x))


class ToMeReduction(TowerReduction):
    """ToMe inside the vision tower: layers ``0..feature_layer`` merge, the features are the merged tokens."""

    name = "tome"
    needs_cls = True  # CLS is protected and dropped from the features

    @contextlib.contextmanager
    def tower_context(
        self, layers: nn.ModuleList, feature_layer: int, config: SkipVisionConfig, trace_source: bool = False
    ) -> Iterator[ToMeState]:
        """Swap layers ``0..feature_layer`` to ToMe layers for one run; yields the run's :class:`ToMeState`."""
        implementation = getattr(layers[0].self_attn.config, "_attn_implementation", None) or ""
        if "flash" in implementation:
            raise ValueError(
                "ToMe's proportional attention adds log(size) to the attention logits, which flash attention "
                "cannot take; load the vision tower with attn_implementation='sdpa' or 'eager'"
            )
        budget = config.num_retained + config.num_skipped
        state = ToMeState(budget, feature_layer + 1, trace_source)
        patched = layers[: feature_layer + 1]
        try:
            for index, layer in enumerate(patched):
                mix_into(layer, ToMeLayerMixin, _tome_index=index)
                layer._tome_state = state
            yield state
        finally:  # the tower is HF's again, whatever happened inside
            for layer in patched:
                unmix(layer, ToMeLayerMixin)
                layer.__dict__.pop("_tome_state", None)

    def reduce(self, run: TowerRun, config: SkipVisionConfig) -> torch.Tensor:
        return run.features[:, 1:]  # CLS stays first (the class-token sort), as HF's "default" drops it


register_reduction(ToMeReduction())


def tome(budget: int) -> SkipVisionConfig:
    """ToMe in the vision tower: ``budget`` merged patch tokens per image at the feature layer (all retained)."""
    return before_projector("tome", budget, 0)


# --- after the projector ---------------------------------------------------------------------------------------


def after_projector_rounds(tokens: int, budget: int) -> list[int]:
    """r of each round taking ``tokens`` to ``budget``: as many as ToMe's cap allows (half) until the budget."""
    rounds = []
    while tokens > budget:
        rounds.append(min(tokens // 2, tokens - budget))
        tokens -= rounds[-1]
    return rounds


class ToMeAfterProjector(TowerReduction):
    """ToMe's matching and size-weighted merge in rounds on the projected tokens (a VLM baseline's placement)."""

    name = "tome_after_projector"
    needs_cls = False  # the projected tokens have no CLS (or keep it as a token among the others, "full")
    after_projector = True

    def reduce(self, run: TowerRun, config: SkipVisionConfig) -> torch.Tensor:
        x, size = run.projected, None
        for r in after_projector_rounds(x.shape[1], config.num_retained + config.num_skipped):
            x, size = merge_wavg(bipartite_soft_matching(x, r, class_token=False), x, size)
        return x


register_reduction(ToMeAfterProjector())


def tome_after_projector(budget: int) -> SkipVisionConfig:
    """ToMe's bipartite soft matching and size-weighted merge applied in rounds to the projector's output, down to
    ``budget`` tokens per image, as token-merging baselines for VLMs do; not ToMe's host placement."""
    return before_projector("tome_after_projector", budget, 0)
