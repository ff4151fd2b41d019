"""FasterVLM (Zhang et al., 2024; official code: Theia-4869/FasterVLM, ``llava_arch.py`` ``encode_images`` and
``clip_encoder.py`` ``feature_select``): before the projector, keep the ``keep`` patch tokens with the largest
[CLS] attention in the vision tower's feature layer (LLaVA-1.5: the penultimate layer, whose output the features
are), averaged over heads, in raster order; drop the rest. The language model gets exactly ``keep`` tokens per
image. Needs a tower with a CLS token (CLIP). The official code on LLaVA-NeXT keeps ``keep`` tokens of every crop;
here the reduction runs on one-pass towers (LLaVA-1.5) and is refused by name elsewhere.

The score is the CLS row of the layer's softmax attention with the CLS column dropped, not renormalised, as the
official code reads ``attentions[-2][:, :, 0, 1:]``; it is recomputed from the layer's q/k projections for the one
query (no eager attention needed). Summing or averaging over heads ranks alike.
"""

from __future__ import annotations

import torch

from ..config import SkipVisionConfig
from ..selection import cls_attention_scores, selection_strategy
from ..tower_reduction import TowerReduction, TowerRun, register_reduction
from .base import before_projector


class FasterVLMReduction(TowerReduction):
    name = "fastervlm"
    needs_cls = True
    attention_layers = (0,)  # the feature layer's own attention

    def reduce(self, run: TowerRun, config: SkipVisionConfig) -> torch.Tensor:
        attention = run.layers[run.feature_layer].self_attn
        scores = cls_attention_scores(attention, run.attention_inputs[run.feature_layer])  # (n, P): heads summed
        patches = run.features[:, 1:]
        kept = scores.topk(config.num_retained, dim=-1).indices.sort(dim=-1).values  # raster order
        return patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))

    def overhead_flops(self, hidden: int, tokens: int, heads: int, config: SkipVisionConfig) -> int:
        """The CLS query and every key of the feature layer, and the CLS row of logits."""
        return selection_strategy("cls_attention").overhead_flops(hidden, tokens)


register_reduction(FasterVLMReduction())


def fastervlm(keep: int) -> SkipVisionConfig:
    """``keep`` tokens per image, chosen by the feature layer's CLS attention before the projector."""
    return before_projector("fastervlm", keep, 0)
