"""Token reductions inside or right after the vision tower, before the projector (the peer methods VisionZip,
LLaVA-PruMerge, ToMe in the tower), or on the projector's output (``after_projector``): *what* a method computes
lives in its own file in ``peers/`` as a :class:`TowerReduction`; *when* it runs is the family's business
(``Family.reduced_image_tokens``: run the tower, hand the reduction what it asks for, project what it returns). A
config names its reduction by ``SkipVisionConfig.tower_reduction``; the method's tokens then enter the language
model as they come, the first ``num_retained`` as R and the rest as S (no selection, no merge, no summary tokens).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class TowerRun:
    """One batch of tower passes, as a reduction sees it.

    ``hidden_states``: every layer's output, embeddings first (HF's ``hidden_states``), CLS included.
    ``feature_index``: the (non-negative) index of the features the projector would take (LLaVA-1.5: ``-2``).
    ``layers``: the tower's encoder layers; ``attention_inputs``: layer index -> the (layer-normed) input its
    self-attention received, for the layers the reduction asked for (:attr:`TowerReduction.attention_layers`).
    ``projected``: ``(n, tokens, text width)``, the model's own projected image features (HF's feature selection,
    then the projector), for a reduction that runs after the projector (:attr:`TowerReduction.after_projector`);
    None otherwise.
    """

    hidden_states: tuple[torch.Tensor, ...]
    feature_index: int
    layers: nn.ModuleList
    attention_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    projected: torch.Tensor | None = None

    @property
    def features(self) -> torch.Tensor:
        """``(n, tokens, width)``: the feature layer's hidden states, CLS first."""
        return self.hidden_states[self.feature_index]

    @property
    def feature_layer(self) -> int:
        """Index of the encoder layer whose output the features are."""
        return self.feature_index - 1


class TowerReduction:
    """A token reduction before the projector.

    ``needs_cls``: the method reads a CLS token (refused on towers without one). ``attention_layers``: offsets,
    from the feature layer, of the layers whose attention input the method reads (0: the feature layer's own,
    1: the next one). ``tower_context`` may patch the tower while it runs (ToMe merges inside every block).
    ``after_projector``: the method reduces the projected tokens (``TowerRun.projected``) instead, and ``reduce``
    returns tokens for the language model, which are not projected again (a baseline's placement after the
    projector, e.g. ``tome_after_projector``).
    """

    name: str
    needs_cls: bool = True
    attention_layers: tuple[int, ...] = ()
    after_projector: bool = False

    def overhead_flops(self, hidden: int, tokens: int, heads: int, config: Any) -> int:
        """Matmul FLOPs one tower pass of ``tokens`` (CLS included) adds beyond the tower and the projector, for the
        analytic FLOPs model (0 unless the method says; ToMe's matching is not modelled)."""
        return 0

    def tower_context(
        self, layers: nn.ModuleList, feature_layer: int, config: Any
    ) -> contextlib.AbstractContextManager:
        """A context the tower runs in (nothing by default)."""
        return contextlib.nullcontext()

    def reduce(self, run: TowerRun, config: Any) -> torch.Tensor:
        """``(n, num_retained + num_skipped, width)`` features for the projector, R first (with
        :attr:`after_projector`: the language model's tokens)."""
        raise NotImplementedError


REDUCTIONS: dict[str, TowerReduction] = {}


def register_reduction(reduction: TowerReduction) -> TowerReduction:
    """Add a reduction under its name (each peer module registers its own)."""
    REDUCTIONS[reduction.name] = reduction
    return reduction


def tower_reduction(name: str) -> TowerReduction:
    if name not in REDUCTIONS:
        raise ValueError(f"unknown tower_reduction {name!r}; known: {sorted(REDUCTIONS)}")
    return REDUCTIONS[name]


def capture_attention_inputs(
    layers: nn.ModuleList, indices: list[int]
) -> tuple[dict[int, torch.Tensor], contextlib.ExitStack]:
    """Hooks that record the input of ``layers[i].self_attn`` for each ``i`` (removed when the stack closes)."""
    seen: dict[int, torch.Tensor] = {}
    stack = contextlib.ExitStack()
    for index in indices:

        def hook(_module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            seen[index] = kwargs.get("hidden_states", args[0] if args else None)

        handle = layers[index].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        stack.callback(handle.remove)
    return seen, stack
