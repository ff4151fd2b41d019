"""VisionZip (Yang et al., CVPR 2025; official code: dvlab-research/VisionZip @ 3151f6d, read in
docs/peers/visionzip.md): ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward`` :42-85, the key metric of
``visionzip/utils.py`` ``CLIPAttention_forward`` :22-24,89 saved by ``CLIP_EncoderLayer_forward`` :122-124 for
``layers[-2]`` only (``utils.py:191``), ``visionzip/main.py:5-7`` (``dominant`` counts CLS) and
``visionzip/llava_arch.py:31-35`` (the projector runs on the reduced tokens).

Before the projector, on the feature layer (LLaVA-1.5: the layer whose output is ``hidden_states[-2]``; its
attention and keys are the ones the official code reads, ``clip_encoder.py:43-45``):

* dominant: CLS plus the ``dominant - 1`` patches with the largest CLS attention (the layer's softmax, CLS row,
  CLS column dropped, summed over heads, :51-53), gathered in ascending position order, CLS first (:56-57);
* contextual: the remaining ``M`` tokens (ascending) are matched by the cosine of the layer's keys averaged over
  heads (k_proj bias included, unscaled; :60-64); the targets are the rest's entries ``0, s, 2s, ...`` with
  ``s = max(1, M // contextual)``, the first ``contextual`` of them (:67-68); every other remaining token joins its
  most similar target (argmax, :72-74); a target's value is ``target + mean(assigned)`` (0 if none; :75-80),
  computed on the feature layer's hidden states, before the projector;
* output ``[CLS, dominant patches, contextual tokens in target order]`` (:83), all projected and fed to the language
  model (CLS included). R = the ``dominant`` tokens, S = the ``contextual`` ones.

Departures, with reasons:

* the CLS attention and the keys are recomputed from the layer's captured attention input (the CLS query and one
  ``k_proj``; the attention logits in float32), instead of read from an eager run in the tower's dtype and saved by
  a patched ``CLIPAttention.forward``: this works with any attention backend (SDPA and flash return no weights)
  without patching transformers' classes; the keys are the same values, and the scores only rank, where float32
  ranks at least as finely as the official fp16. The cost is one k_proj per image (:meth:`overhead_flops`);
* the layer is the model's feature layer (``vision_feature_layer``), where the official code hard-codes
  ``hidden_states[-2]`` / ``attentions[-2]`` / ``layers[-2]``: the same layer on LLaVA-1.5;
* ``contextual=0`` gives the dominant tokens only (the official code divides by zero, :67); the compare harness
  asks for it at the smallest budgets;
* LLaVA-NeXT's anyres layout (``llava_arch.py:91-128``) is not reproduced: the reduction runs where the family
  implements ``reduced_image_tokens`` (LLaVA-1.5's one tower pass per image) and is refused by name elsewhere;
* the largest budget is ``P`` tokens (the config's check), one less than VisionZip's ``1 + P`` with CLS.
"""

from __future__ import annotations

import torch

from ..config import SkipVisionConfig
from ..tower_reduction import TowerReduction, TowerRun, register_reduction
from .base import before_projector


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index (n, k)`` of ``x (n, T, d)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def attention_and_keys(attention: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CLS attention (n, P), head-mean keys (n, T, head_dim))`` of a CLIP attention module on its input
    ``(n, T, width)``, CLS first: the CLS row of the softmax with the CLS column dropped, summed over heads
    (``clip_encoder.py:51-52``), and the keys (k_proj, bias included, unscaled) averaged over heads
    (``utils.py:23-24,89``). One k_proj serves both; only the CLS query is projected."""
    n, tokens, _ = inputs.shape
    heads, dim = attention.num_heads, attention.head_dim
    keys = attention.k_proj(inputs).view(n, tokens, heads, dim)
    query = attention.q_proj(inputs[:, :1]).view(n, 1, heads, dim)
    # float32 logits: the scores only rank, and float32 ranks at least as finely as the official fp16 attention
    logits = torch.einsum("nqhd,nkhd->nhqk", query.float(), keys.float()) * attention.scale
    return logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1), keys.mean(dim=2)


def contextual_tokens(hidden: torch.Tensor, keys: torch.Tensor, contextual: int) -> torch.Tensor:
    """``(n, contextual, d)`` from the remaining tokens ``hidden (n, M, d)`` (ascending positions) and their keys
    ``(n, M, k)``: evenly spaced targets, each non-target to its most cosine-similar target, ``target +
    mean(assigned)`` (``clip_encoder.py:64-80``)."""
    n, m, _ = hidden.shape
    unit = keys / keys.norm(dim=-1, keepdim=True)  # no eps, as the official code (:64)
    step = max(1, m // contextual)
    targets = torch.arange(0, m, step, device=hidden.device)[:contextual]
    others = ~torch.isin(torch.arange(m, device=hidden.device), targets)
    similarity = unit[:, others] @ unit[:, targets].transpose(1, 2)  # (n, M - C, C)
    one_hot = torch.zeros(n, int(others.sum()), contextual, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    # the official value: the target plus the plain mean of its group (not the mean over target and group)
    return hidden[:, targets] + (one_hot.transpose(1, 2) @ hidden[:, others]) / counts


class VisionZipReduction(TowerReduction):
    name = "visionzip"
    needs_cls = True
    attention_layers = (0,)  # the feature layer's own attention and keys (clip_encoder.py:43-45)

    def reduce(self, run: TowerRun, config: SkipVisionConfig) -> torch.Tensor:
        dominant, contextual = config.num_retained, config.num_skipped
        hidden = run.features  # (n, 1 + P, d), CLS first
        attention = run.layers[run.feature_layer].self_attn
        inputs = run.attention_inputs[run.feature_layer]
        scores, keys = attention_and_keys(attention, inputs)
        top = scores.topk(dominant - 1, dim=-1).indices + 1
        keep = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        keep[:, 0] = True
        keep.scatter_(1, top, True)
        # a stable sort on the mask lists the rest, then the kept, each in ascending position (the official masks)
        order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices
        rest, kept = order[:, : hidden.shape[1] - dominant], order[:, hidden.shape[1] - dominant :]
        tokens = _gather(hidden, kept)
        if contextual == 0:
            return tokens
        merged = contextual_tokens(_gather(hidden, rest), _gather(keys, rest), contextual)
        return torch.cat([tokens, merged], dim=1)

    def overhead_flops(self, hidden: int, tokens: int, heads: int, config: SkipVisionConfig) -> int:
        """Matmul FLOPs one tower pass of ``tokens`` (CLS included) adds beyond the tower and the projector: the
        CLS query and the keys, the CLS logits, and with contextual tokens the cosines and the group sums."""
        total = 2 * hidden * hidden + 2 * tokens * hidden * hidden + 2 * tokens * hidden
        dominant, contextual = config.num_retained, config.num_skipped
        others = tokens - dominant - contextual  # the remaining tokens that are not targets
        if contextual:
            total += 2 * others * contextual * (hidden // heads) + 2 * contextual * others * hidden
        return total


register_reduction(VisionZipReduction())


def visionzip(dominant: int, contextual: int) -> SkipVisionConfig:
    """``dominant`` tokens (CLS and ``dominant - 1`` patches, as the official ``visionzip(model, dominant,
    contextual)`` counts them) plus ``contextual`` merged tokens per image, before the projector."""
    if isinstance(dominant, bool) or not isinstance(dominant, int) or dominant < 1:
        raise ValueError(f"visionzip: dominant counts the CLS token, so it is at least 1; got {dominant!r}")
    if isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0:
        raise ValueError(f"visionzip: contextual is a count of merged tokens (0 or more); got {contextual!r}")
    return before_projector("visionzip", dominant, contextual)
