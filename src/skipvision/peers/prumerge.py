"""LLaVA-PruMerge and PruMerge+ (Shang et al., ICCV 2025; official code: 42Shawn/LLaVA-PruMerge @ 097c041,
``llava/model/multimodal_encoder/clip_encoder.py``: ``complement_idx`` :12-25, the q/k hooks :27-32,
``token_prune_merge_advanced`` :85-171, ``token_prune_merge_advanced_plus`` :174-281; read in docs/peers/prumerge.md).

Before the projector, on the features the projector would take (LLaVA-1.5: ``hidden_states[-2]`` without CLS,
``N`` patches of width ``C``):

* attention: ``softmax(q k^T * C**-0.5)`` with ``q``, ``k`` the outputs of the next layer's ``q_proj`` / ``k_proj``
  (all heads as one, bias included, unscaled; :93-94, :109-112). The official code hooks ``layers[23]``, the last
  of CLIP-L's 24, whose input is ``layer_norm1(hidden_states[-2])``: the layer after the feature layer
  (``attention_layers = (1,)``). ``a`` = the CLS row without the CLS column, not renormalised;
* kept tokens: the ``k`` patches with the largest ``a``, largest first (:116); PruMerge+ appends the evenly spaced
  positions ``int(s/2), int(s/2) + s, ... < N - 1`` with ``s = int(1/ratio)``, ``ratio = k/N``, without
  de-duplication (:216-227);
* merge: each kept row ``i`` (token ``t``) becomes ``x_t + sum_j a_j x_j`` over the 32 most key-cosine-similar of
  the other rows of ``[kept rows, pruned tokens]`` (other kept tokens included; no normalisation of the weights;
  original features; :139-165); the pruned tokens are ``complement_idx``'s (which, with duplicate kept indices,
  also drops one smallest true-complement index per duplicate);
* one extra token ``sum_{j pruned} a_j x_j`` (:168-169). Output: ``[kept rows in kept order, extra]``, projected.
  R = the kept rows, S = the extra token.

``prumerge(tokens)`` keeps ``tokens - 1`` patches and ``prumerge_plus(tokens)`` keeps ``(tokens - 1) / 2`` by
attention and as many by position, so that the image occupies exactly ``tokens`` placeholders.

Departures, with reasons:

* the fixed-ratio path (``if_adaptive=False``, the one the official code trains with, :114, :216) instead of the
  adaptive one its ``forward`` evaluates (:298-300). The adaptive count (the IQR outliers of ``a``, :34-47) differs
  per image, and an HF processor writes one fixed number of placeholders per image before the tower runs: no
  fixed count serves it (padding to a maximum would feed tokens the method does not make, truncating would drop
  ones it makes), so the adaptive path is not offered;
* the kept count is given directly: the official ``int(N * ratio)`` with ``ratio = k/N`` is ``k`` for every ``k``
  on 576 patches, but float rounding makes it ``k - 1`` for some ``k`` on other counts (196, 729);
* PruMerge+ takes only the budgets whose sampled positions number exactly ``k`` (the official ``new_idx`` has room
  for ``2k``, :219-226): :func:`prumerge_plus_budgets` lists them, and others are refused when the tower runs
  (the config's checks know the patch count but have no per-method hook);
* q/k come from the layer after the feature layer, where the official code hard-codes the last one (``layers[23]``):
  the same layer on LLaVA-1.5 (features ``hidden_states[-2]``), and elsewhere the keys stay those of the features'
  tokens; features from the last layer leave no next layer and are refused by the family;
* the positions stop below ``N - 1`` (the official literal 575, which is ``N - 1`` on CLIP-L/336) and the
  neighbour count is ``min(32, N - 1)``: both equal the official on LLaVA-1.5 and let smaller towers run;
* the attention is computed for the CLS query row only (the only row used: the same values); the merge is one
  batched gather instead of a per-token loop (the same sums; ties between neighbours break by ``topk``);
* images given as a list (the official code does not reduce them, :288-293) and LLaVA-NeXT's tiles are not served:
  the reduction runs where the family implements ``reduced_image_tokens`` and is refused by name elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SkipVisionConfig
from ..tower_reduction import TowerReduction, TowerRun, register_reduction
from .base import before_projector

NEIGHBOURS = 32  # clip_encoder.py:156, k=int(32)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index (n, k)`` of ``x (n, T, d)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def prumerge_attention(
    attention: torch.nn.Module, inputs: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a (n, N), patch keys (n, N, C))`` from a CLIP attention module and its input ``(n, 1 + N, C)``: the CLS
    row of ``softmax(q k^T * width**-0.5)`` without the CLS column (``clip_encoder.py:109-112``), and ``k[:, 1:]``
    (:119). ``width`` is the features' (:100)."""
    query = attention.q_proj(inputs[:, :1])
    keys = attention.k_proj(inputs)
    row = (query @ keys.transpose(1, 2)) * width**-0.5
    return row.softmax(dim=-1)[:, 0, 1:], keys[:, 1:]


def complement(kept: torch.Tensor, patches: int) -> torch.Tensor:
    """The pruned indices as ``complement_idx`` (:12-25) builds them: zero the kept entries of ``arange``, sort,
    drop the first ``len(kept)``."""
    every = torch.arange(patches, device=kept.device).expand(kept.shape[0], -1)
    return every.scatter(1, kept, 0).sort(dim=1).values[:, kept.shape[1] :]


def plus_positions(kept: int, patches: int) -> list[int] | None:
    """PruMerge+'s evenly spaced positions for ``kept`` attention tokens (:218-221, ``ratio = kept/patches``), or
    ``None`` where they are not ``kept`` many (the official path has no room for them, :219)."""
    if kept < 1:
        return None  # ratio 0: the official 1/ratio divides by zero
    step = int(1 / (kept / patches))
    positions = list(range(int(step / 2), patches - 1, step))
    return positions if len(positions) == kept else None


def prumerge_plus_budgets(patches: int) -> list[int]:
    """The token counts ``prumerge_plus`` serves on a tower with ``patches`` patches (LLaVA-1.5: 576)."""
    return [2 * k + 1 for k in range(1, (patches - 1) // 2 + 1) if plus_positions(k, patches) is not None]


def prumerge_merge(features: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(n, L + 1, C)``: the kept rows ``kept (n, L)`` of ``features (n, N, C)`` each plus its attention-weighted
    nearest neighbours, then the extra token (``clip_encoder.py:119-169``)."""
    n, patches, width = features.shape
    pruned = complement(kept, patches)
    extra = (_gather(features, pruned) * attn.gather(1, pruned).unsqueeze(-1)).sum(dim=1, keepdim=True)
    rows = kept.shape[1]
    if rows == 0:
        return extra
    candidates = torch.cat([kept, pruned], dim=1)  # (n, N): the official rest list before row i is taken out
    unit = F.normalize(keys, p=2, dim=-1)
    similarity = _gather(unit, kept) @ _gather(unit, candidates).transpose(1, 2)  # (n, L, N)
    similarity.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # row i is not its own candidate (:143-153)
    count = min(NEIGHBOURS, patches - 1)
    neighbours = candidates.gather(1, similarity.topk(count, dim=-1).indices.flatten(1))  # (n, L * count)
    weights = attn.gather(1, neighbours).view(n, rows, count, 1)  # raw attention: the normalisation is commented out
    pooled = (_gather(features, neighbours).view(n, rows, count, width) * weights).sum(dim=2)
    return torch.cat([_gather(features, kept) + pooled, extra], dim=1)


class PruMergeReduction(TowerReduction):
    needs_cls = True
    attention_layers = (1,)  # the layer after the feature layer: layers[23] for CLIP-L's hidden_states[-2]

    def __init__(self, name: str, plus: bool) -> None:
        self.name = name
        self.plus = plus

    def reduce(self, run: TowerRun, config: SkipVisionConfig) -> torch.Tensor:
        features = run.features[:, 1:]  # LLaVA's 'patch' features (:99)
        n, patches, width = features.shape
        layer = run.feature_layer + 1
        attn, keys = prumerge_attention(run.layers[layer].self_attn, run.attention_inputs[layer], width)
        count = config.num_retained // 2 if self.plus else config.num_retained
        kept = attn.topk(count, dim=-1).indices  # largest first (sorted=True, :116)
        if self.plus:
            positions = plus_positions(count, patches)
            if positions is None:
                raise ValueError(
                    f"prumerge+ with {config.num_retained + 1} tokens: the official fixed-ratio path samples a "
                    f"different number of positions than it keeps by attention on {patches} patches; use one of "
                    f"{prumerge_plus_budgets(patches)}"
                )
            sampled = torch.tensor(positions, device=kept.device).expand(n, -1)
            kept = torch.cat([kept, sampled], dim=1)  # appended as they are, duplicates kept (:224-226)
        return prumerge_merge(features, attn, keys, kept)

    def overhead_flops(self, hidden: int, tokens: int, heads: int, config: SkipVisionConfig) -> int:
        """Matmul FLOPs one tower pass of ``tokens`` (CLS included) adds beyond the tower and the projector: the
        CLS query and the keys, the CLS logits, and the key cosines of the kept rows against every patch (the
        weighted sums are elementwise)."""
        similarity = 2 * config.num_retained * (tokens - 1) * hidden
        return 2 * hidden * hidden + 2 * tokens * hidden * hidden + 2 * tokens * hidden + similarity


register_reduction(PruMergeReduction("prumerge", plus=False))
register_reduction(PruMergeReduction("prumerge+", plus=True))


def prumerge(tokens: int) -> SkipVisionConfig:
    """``tokens - 1`` patches by the next layer's CLS attention, each merged with its neighbours, plus one token
    merging the pruned ones: ``tokens`` per image, before the projector."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"prumerge: tokens per image is at least 1 (the extra token); got {tokens!r}")
    return before_projector("prumerge", tokens - 1, 1)


def prumerge_plus(tokens: int) -> SkipVisionConfig:
    """PruMerge with ``(tokens - 1) / 2`` patches by attention and as many evenly spaced ones, plus the extra
    token: ``tokens`` per image (one of :func:`prumerge_plus_budgets`), before the projector."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 3 or tokens % 2 == 0:
        raise ValueError(
            f"prumerge_plus: tokens per image is 2k + 1 (k by attention, k by position, the extra token), k >= 1; "
            f"got {tokens!r} (LLaVA-1.5 serves {prumerge_plus_budgets(576)})"
        )
    return before_projector("prumerge+", tokens - 1, 1)
