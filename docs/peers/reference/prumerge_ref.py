"""LLaVA-PruMerge and PruMerge+ -- a pure-PyTorch reference written from the math of the official code,
github.com/42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a (see prumerge.md). Nothing is copied
from that repository; the per-token Python loop of the official merge is re-derived as one batched gather, and the
self-check compares it against a literal loop written from the same description.

All citations are llava/model/multimodal_encoder/clip_encoder.py unless named otherwise:
  :12-25    complement_idx -- the pruned indices (ascending); with duplicate kept indices it drops extra ones
  :27-32    forward hooks that capture q_proj / k_proj *outputs* of encoder layer 23 (the last of CLIP ViT-L's 24)
  :34-47    outlier_dectection -- IQR rule on the CLS attention: ratio = #(a > Q3 + 1.5 IQR) / #a
  :85-171   token_prune_merge_advanced       (PruMerge)
  :174-281  token_prune_merge_advanced_plus  (PruMerge+; the one forward() calls, :300, if_adaptive=True)
  :286-302  forward -- a list of images (anyres) is *not* reduced, only a batched tensor
  llava/model/llava_arch.py:94-104  encode_images -- the projector runs on the reduced features

Inputs the method needs from the host tower (CLIP with a CLS token):
  features  (N, C)  hidden_states[-2][:, 1:]            -- the usual LLaVA-1.5 features, before the projector
  q, k      (N+1, C) q_proj / k_proj outputs of the *last* layer (input: layer_norm1(hidden_states[-2])), all heads
                     concatenated (C = 1024), bias included, *not* multiplied by the head scale
  attention  softmax(q k^T * C**-0.5) over all N+1 keys -- one "head" over the full width C, scaled by the feature
             width (clip_encoder.py:109), which is *not* the mean of the 16 per-head attentions
  cls_attn   attention[0, 1:] (N,) -- the CLS query row, CLS column dropped, not renormalised (:112)
  keys       k[1:] (N, C)                                                                          (:119)

Public pieces
  prumerge_attention(q, k, feature_dim)                          -> (cls_attn (B, N), patch_keys (B, N, C))
  iqr_outlier_count(cls_attn)                                    -> int
  prumerge_indices(cls_attn, plus, adaptive, reduction_ratio)    -> LongTensor of kept indices, official order
  official_complement(idx, N)                                    -> the pruned indices as complement_idx makes them
  prumerge_merge(features, cls_attn, keys, idx, k_neighbors=32)  -> (L+1, C)
  prumerge_reference(features, cls_attn, keys, plus, ...)        -> (list of (L_b+1, C), list of (L_b,) indices)
  hf_clip_prumerge_inputs(model, pixel_values)                   -> (features, cls_attn, keys) from an HF CLIPVisionModel

Run ``python prumerge_ref.py`` for the self-check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


def prumerge_attention(q: torch.Tensor, k: torch.Tensor, feature_dim: int | None = None):
    """The attention PruMerge ranks with (clip_encoder.py:98-112, 119).

    q, k: ``(B, N+1, C)`` outputs of the last layer's q_proj / k_proj (CLS first). ``feature_dim`` is the ``C`` of the
    *features* (``image_features.shape[-1]``, :100), which is the q/k width for CLIP; it defaults to ``q.shape[-1]``.
    attn = softmax(q @ k^T * feature_dim**-0.5, dim=-1)  -- single head over the full width.
    Returns ``(cls_attn (B, N), patch_keys (B, N, C))`` with ``cls_attn = attn[:, 0, 1:]`` and ``patch_keys = k[:, 1:]``.
    Only the CLS query row is ever used, so only that row is computed here (same values).
    """
    C = feature_dim if feature_dim is not None else q.shape[-1]
    row = (q[:, :1] @ k.transpose(-2, -1)) * C**-0.5  # (B, 1, N+1)
    cls_attn = F.softmax(row, dim=-1)[:, 0, 1:]
    return cls_attn, k[:, 1:]


def iqr_outlier_count(cls_attn: torch.Tensor) -> int:
    """Number of outliers by the IQR rule (clip_encoder.py:34-47): values > Q3 + 1.5 (Q3 - Q1), with Q1 / Q3 the 25th /
    75th percentiles by linear interpolation (numpy's default; ``torch.quantile``'s default is the same rule).

    The official function flattens whatever it is given -- the whole batch -- and returns count / numel; at B = 1
    (LLaVA evaluation) that is count / N, and the kept count ``int(N * ratio)`` is exactly ``count`` (checked for all
    count in 0..576). This reference is called per image. Computed in float32 like the official ``.to(float32)``.
    """
    a = cls_attn.detach().reshape(-1).to(torch.float32)
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype, device=a.device)).tolist()
    upper = q3 + 1.5 * (q3 - q1)
    return int((a > upper).sum())


def prumerge_indices(
    cls_attn: torch.Tensor, plus: bool, adaptive: bool = True, reduction_ratio: float = 1 / 8
) -> torch.Tensor:
    """Kept patch indices of one image, in the official order (clip_encoder.py:114-116, 203-227).

    cls_attn: ``(N,)``.
    PruMerge (:114-116): ratio = iqr_outlier_count / N if adaptive else ``reduction_ratio``;
        idx = topk(cls_attn, int(N * ratio)) -- sorted, largest attention first.
    PruMerge+ adaptive (:208-215): step = int(1 / ratio); idx += [j for j in range(0, 575, int(step / 3)) if j not in
        idx] -- spatially uniform raster positions (the stop 575 is the official literal, i.e. N - 1 for N = 576),
        appended after the top-k in ascending order.
    PruMerge+ non-adaptive, "for training" (:216-227): step = int(1 / reduction_ratio); idx += range(int(step / 2), 575,
        step) with *no* de-duplication (its size must equal the top-k count, which holds for ratio 1/8: 72 + 72).
    Raises ValueError where the official code would fail (ratio 0 -> 1/0; int(step / 3) == 0 -> arange step 0; an
    empty filtered list -> float tensor concatenated to the indices).
    """
    N = cls_attn.shape[-1]
    ratio = iqr_outlier_count(cls_attn) / N if adaptive else reduction_ratio
    idx = torch.topk(cls_attn, int(N * ratio), dim=-1, largest=True).indices
    if not plus:
        return idx
    if ratio == 0:
        raise ValueError("PruMerge+: no outliers (ratio 0); the official code divides by zero here")
    step_length = int(1 / ratio)
    stop = 575  # official literal (N - 1 for CLIP-L/336's 576 patches)
    if adaptive:
        stride = int(step_length / 3)
        if stride == 0:
            raise ValueError(f"PruMerge+: {int(N * ratio)} outliers > N/3 gives a zero stride (official crashes)")
        present = set(idx.tolist())
        extra = [j for j in range(0, stop, stride) if j not in present]
        if not extra:
            raise ValueError("PruMerge+: every sampled position is already kept (official concatenates a float tensor)")
    else:
        extra = list(range(int(step_length / 2), stop, step_length))
        if len(extra) != idx.numel():
            raise ValueError(f"PruMerge+ non-adaptive: {len(extra)} sampled vs {idx.numel()} top-k (official assumes equal)")
    return torch.cat([idx, torch.tensor(extra, dtype=idx.dtype, device=idx.device)])


def official_complement(idx: torch.Tensor, N: int) -> torch.Tensor:
    """The pruned indices exactly as complement_idx (clip_encoder.py:12-25) builds them: write 0 at every kept index of
    arange(N), sort ascending, drop the first len(idx) entries. With distinct indices this is the ascending set
    complement; with duplicates (only the non-adaptive PruMerge+ path) it also drops the smallest true-complement
    indices, one per duplicate.
    """
    a = torch.arange(N, device=idx.device)
    a = a.scatter(0, idx, torch.zeros_like(idx))
    return torch.sort(a).values[idx.numel():]


# ----------------------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------------------


def prumerge_merge(
    features: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, k_neighbors: int = 32
) -> torch.Tensor:
    """The merge of one image (clip_encoder.py:119-171, identical in the plus variant :231-281).

    features (N, C), cls_attn (N,), keys (N, Ck), idx (L,) kept indices (official order).
    Let a = cls_attn, k^ = keys / ||keys|| (L2, F.normalize), P = official_complement(idx).
    For the kept row i (token t = idx[i]) the candidates are every *other row* of [kept rows..., P...] -- i.e. all
    N - 1 other patch tokens, kept ones included (:143-153) -- and its neighbours are the ``k_neighbors`` (32, :156)
    candidates with the largest cosine similarity k^_t . k^_j. Then (:159-165)
        y_i = x_t + sum_{j in knn(i)} a_j x_j            -- *no* normalisation by sum(a_j) (commented out, :163),
                                                           x_t itself unweighted, neighbours use the *original* x
    and one extra token is appended (:168-169)
        y_extra = sum_{j in P} a_j x_j.
    Output: ``(L + 1, C)``, rows in idx order, the extra token last. Ties in the similarity are broken by topk.
    """
    N, C = features.shape
    L = idx.numel()
    compl = official_complement(idx, N)
    cand = torch.cat([idx, compl])  # row order of the official "rest" list before removing row i
    kn = F.normalize(keys, p=2, dim=-1)
    sim = kn[idx] @ kn[cand].T  # (L, L + |P|)
    if L:
        sim[torch.arange(L), torch.arange(L)] = float("-inf")  # row i is not its own candidate
    k = min(k_neighbors, cand.numel() - 1)
    nb = cand[torch.topk(sim, k, dim=-1).indices] if L else idx.new_zeros(0, k)  # (L, k) token indices
    w = cls_attn[nb].unsqueeze(-1)  # (L, k, 1)
    updated = features[idx] + (features[nb] * w).sum(dim=1)
    extra = (features[compl] * cls_attn[compl].unsqueeze(-1)).sum(dim=0, keepdim=True)
    return torch.cat([updated, extra], dim=0)


def prumerge_reference(
    image_features_pre_projector: torch.Tensor,
    cls_attn: torch.Tensor,
    keys: torch.Tensor,
    plus: bool,
    adaptive: bool = True,
    reduction_ratio: float = 1 / 8,
    k_neighbors: int = 32,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """PruMerge (``plus=False``, token_prune_merge_advanced) or PruMerge+ (``plus=True``,
    token_prune_merge_advanced_plus), per image.

    image_features_pre_projector: ``(B, N, C)`` = hidden_states[-2][:, 1:] of the CLIP tower.
    cls_attn: ``(B, N)`` and keys ``(B, N, Ck)`` from ``prumerge_attention`` (last layer's q/k).
    Returns ``(merged, kept)``: per image a ``(L_b + 1, C)`` tensor (rows: kept tokens in official order, then the
    extra token) and the ``(L_b,)`` kept indices in the same order. L_b varies per image when adaptive. The projector
    is applied afterwards (llava_arch.py:104) and the LLM sees the L_b + 1 tokens at consecutive positions.
    Official defaults: adaptive=True (forward, :300); reduction_ratio only matters when adaptive=False.
    """
    merged, kept = [], []
    for b in range(image_features_pre_projector.shape[0]):
        idx = prumerge_indices(cls_attn[b], plus, adaptive, reduction_ratio)
        merged.append(prumerge_merge(image_features_pre_projector[b], cls_attn[b], keys[b], idx, k_neighbors))
        kept.append(idx)
    return merged, kept


# ----------------------------------------------------------------------------------------------------------------------
# HF glue
# ----------------------------------------------------------------------------------------------------------------------


def hf_clip_prumerge_inputs(model, pixel_values: torch.Tensor, select_layer: int = -2, qk_layer: int = -1):
    """(features, cls_attn, keys) from an HF ``CLIPVisionModel`` the way the official tower gets them: forward hooks on
    ``encoder.layers[qk_layer].self_attn.q_proj / k_proj`` (the official hard-codes index 23 = the last of 24) capture
    the projections' outputs, which in HF (4.31 and 5.x) are unscaled -- the 1/sqrt(head_dim) is applied after the
    module. Any attention implementation works (no attention probabilities are needed).
    """
    inner = getattr(model, "vision_model", model)
    layer = inner.encoder.layers[qk_layer].self_attn
    got = {}
    hq = layer.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))
    hk = layer.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
    try:
        out = model(pixel_values, output_hidden_states=True)
    finally:
        hq.remove()
        hk.remove()
    feats = out.hidden_states[select_layer][:, 1:]
    cls_attn, keys = prumerge_attention(got["q"], got["k"], feats.shape[-1])
    return feats, cls_attn, keys


# ----------------------------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------------------------


def _merge_loop(features, cls_attn, keys, idx, k_neighbors=32):
    """A literal per-token loop written from the official description (independent of prumerge_merge's gather)."""
    N, C = features.shape
    compl = official_complement(idx, N)
    kn = F.normalize(keys, p=2, dim=-1)
    kept_x, kept_k, kept_a = features[idx], kn[idx], cls_attn[idx]
    out = torch.zeros_like(kept_x)
    for i in range(idx.numel()):
        rest_x = torch.cat([kept_x[:i], kept_x[i + 1:], features[compl]])
        rest_a = torch.cat([kept_a[:i], kept_a[i + 1:], cls_attn[compl]])
        rest_k = torch.cat([kept_k[:i], kept_k[i + 1:], kn[compl]])
        top = torch.topk(rest_k @ kept_k[i], k_neighbors).indices
        out[i] = kept_x[i] + (rest_x[top] * rest_a[top, None]).sum(0)
    extra = (features[compl] * cls_attn[compl, None]).sum(0, keepdim=True)
    return torch.cat([out, extra])


def _peaky_cls_attn(B, N, n_peaks, g):
    """Softmax rows with ``n_peaks`` clear outliers (CLIP-like: a few patches take most of the CLS attention)."""
    logits = torch.randn(B, N + 1, generator=g, dtype=torch.float64) * 0.3
    for b in range(B):
        peaks = torch.randperm(N, generator=g)[:n_peaks] + 1
        logits[b, peaks] += 4.0
    return logits.softmax(-1)[:, 1:]


def _self_check() -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    N, C = 576, 1024
    dt = torch.float64

    # [1] IQR: torch.quantile(linear) == numpy.percentile (the official's call), and the outlier count
    a = _peaky_cls_attn(1, N, 30, g)[0]
    cnt = iqr_outlier_count(a)
    try:
        import numpy as np

        an = a.to(torch.float32).numpy()
        q1, q3 = np.percentile(an, 25), np.percentile(an, 75)
        np_cnt = int((an > q3 + 1.5 * (q3 - q1)).sum())
        assert cnt == np_cnt, (cnt, np_cnt)
        lines.append(f"[1] IQR outliers (30 planted peaks): torch {cnt} == numpy {np_cnt}: ok")
    except ImportError:  # pragma: no cover
        lines.append(f"[1] IQR outliers: {cnt} (numpy not importable, not compared)")
    assert all(int(N * (c / N)) == c for c in range(N + 1))

    # [2] PruMerge: kept count == outlier count, output rows = kept + 1, order = descending attention
    feats = torch.randn(2, N, C, generator=g, dtype=dt)
    keys = torch.randn(2, N, C, generator=g, dtype=dt)
    ca = _peaky_cls_attn(2, N, 30, g)
    merged, kept = prumerge_reference(feats, ca, keys, plus=False)
    for b in range(2):
        c = iqr_outlier_count(ca[b])
        assert kept[b].numel() == c and merged[b].shape == (c + 1, C)
        assert torch.all(ca[b][kept[b]][:-1] >= ca[b][kept[b]][1:])
    lines.append(f"[2] PruMerge adaptive: kept {[k.numel() for k in kept]} (= IQR outliers), outputs "
                 f"{[tuple(m.shape) for m in merged]} (kept + 1 extra), kept sorted by attention: ok")

    # [3] PruMerge+: top-k then uniformly sampled positions (ascending, no duplicates); count check
    merged_p, kept_p = prumerge_reference(feats, ca, keys, plus=True)
    for b in range(2):
        c = iqr_outlier_count(ca[b])
        stride = int(int(1 / (c / N)) / 3)
        samp = [j for j in range(0, 575, stride) if j not in set(kept[b].tolist())]
        assert kept_p[b].tolist() == kept[b].tolist() + samp
        assert len(set(kept_p[b].tolist())) == kept_p[b].numel()
        assert merged_p[b].shape == (kept_p[b].numel() + 1, C)
    lines.append(f"[3] PruMerge+ adaptive: kept {[k.numel() for k in kept_p]} = top-k {[k.numel() for k in kept]} + "
                 f"sampled every int(int(N/k)/3) positions, outputs {[tuple(m.shape) for m in merged_p]}: ok")

    # [4] vectorised merge == literal loop (PruMerge, PruMerge+, and the duplicate-index non-adaptive plus path)
    for name, idx in (("prumerge", kept[0]), ("plus", kept_p[0]),
                      ("plus non-adaptive 1/8", prumerge_indices(ca[0], True, adaptive=False))):
        m1 = prumerge_merge(feats[0], ca[0], keys[0], idx)
        m2 = _merge_loop(feats[0], ca[0], keys[0], idx)
        assert torch.allclose(m1, m2, rtol=0, atol=1e-10), name
    nonad = prumerge_indices(ca[0], True, adaptive=False)
    lines.append(f"[4] batched merge == per-token loop for prumerge / plus / plus non-adaptive ({nonad.numel()} idx, "
                 f"{nonad.numel() - len(set(nonad.tolist()))} duplicates, complement "
                 f"{official_complement(nonad, N).numel()} rows): ok")

    # [5] merge formula by hand for one kept token; the extra token; determinism
    idx = kept[0]
    t = idx[0]
    kn = F.normalize(keys[0], dim=-1)
    s = kn @ kn[t]
    s[t] = -float("inf")
    nb = torch.topk(s, 32).indices
    y0 = feats[0, t] + (ca[0, nb, None] * feats[0, nb]).sum(0)
    assert torch.allclose(merged[0][0], y0, atol=1e-10)
    P = torch.tensor(sorted(set(range(N)) - set(idx.tolist())))
    assert torch.allclose(merged[0][-1], (ca[0, P, None] * feats[0, P]).sum(0), atol=1e-10)
    again, _ = prumerge_reference(feats, ca, keys, plus=False)
    assert all(torch.equal(x, y) for x, y in zip(merged, again))
    lines.append("[5] y_i = x_i + sum_{32-NN by key cosine, all other patches} a_j x_j; extra = sum_pruned a_j x_j; "
                 "deterministic: ok")

    # [6] fixed-ratio (non-adaptive) counts, e.g. for 64-token comparisons (not an official evaluation setting)
    m64, k64 = prumerge_reference(feats[:1], ca[:1], keys[:1], plus=False, adaptive=False, reduction_ratio=64 / N)
    mp, kp = prumerge_reference(feats[:1], ca[:1], keys[:1], plus=True, adaptive=False, reduction_ratio=1 / 18)
    m8, k8 = prumerge_reference(feats[:1], ca[:1], keys[:1], plus=True, adaptive=False, reduction_ratio=1 / 8)
    assert k64[0].numel() == 64 and m64[0].shape[0] == 65 and kp[0].numel() == 64 and mp[0].shape[0] == 65
    assert k8[0].numel() == 144 and m8[0].shape[0] == 145
    lines.append("[6] non-adaptive: PruMerge ratio 64/576 -> 64 kept + 1 = 65 rows; PruMerge+ ratio 1/18 -> 32 top + "
                 "32 sampled + 1 = 65 rows; PruMerge+ ratio 1/8 (official training path) -> 72 + 72 + 1 = 145: ok")

    # [7] HF CLIPVisionModel (random, LLaVA-1.5 geometry): hooks capture unscaled q/k of the last layer, computed from
    #     hidden_states[-2]; end-to-end shapes
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               image_size=336, patch_size=14, projection_dim=32)
        torch.manual_seed(0)
        tower = CLIPVisionModel(cfg).eval().double()
        px = torch.randn(1, 3, 336, 336, generator=g, dtype=dt)
        with torch.no_grad():
            f, c_attn, k = hf_clip_prumerge_inputs(tower, px)
            inner = getattr(tower, "vision_model", tower)
            last = inner.encoder.layers[-1]
            h = tower(px, output_hidden_states=True).hidden_states[-2]
            k_expected = last.self_attn.k_proj(last.layer_norm1(h))[:, 1:]
            assert torch.allclose(k, k_expected, atol=1e-10)
            mm, kk = prumerge_reference(f, c_attn, k, plus=True)
        lines.append(f"[7] HF CLIPVisionModel: keys == k_proj(layer_norm1(hidden_states[-2])) of the last layer; "
                     f"features {tuple(f.shape)}, PruMerge+ kept {kk[0].numel()}, output {tuple(mm[0].shape)}: ok")
    except ImportError as e:  # pragma: no cover
        lines.append(f"[7] skipped ({e})")
    except ValueError as e:  # a random tower can have degenerate CLS attention
        lines.append(f"[7] HF CLIPVisionModel: inputs extracted; PruMerge+ refused a degenerate random tower ({e})")
    return lines


if __name__ == "__main__":
    for line in _self_check():
        print(line)
    print("prumerge_ref self-check: all ok")
