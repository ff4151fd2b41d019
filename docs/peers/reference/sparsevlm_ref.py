"""SparseVLM (text-guided visual token sparsification inside the LLM) -- a pure-PyTorch reference of its per-layer
selection step, written from the math of the official code (see sparsevlm.md). Nothing is copied from the repository.

Official code: github.com/Gumpest/SparseVLMs
  main @ 26a5f48813c46cd1c7364160354e7fdd3febaa67 (= branch v2.0 for the model files; USE_VERSION=1_0 default is the
       "v1.5" algorithm, USE_VERSION=2_0 the SparseVLM+ one)
  v1 @ 91fb6d9857a089a39c660527519c76ab0a259349 ("init sparsevlm", Oct 2024: rank-based adaptive counts)
Files (main unless marked v1):
  llava/model/language_model/modelling_sparse_llama.py
      :70      pruning_loc = [2, 6, 15]   (v1 :87: [2, 6, 15, 19])
      :194-204 text raters from the input embeddings (before layer 0)
      :214-321 the layer loop: at a pruning layer, run the layer, take its attention probabilities, select, recycle,
               drop tokens from its *output* hidden states
      :242-257 SparseVLM+ only: RoPE "gravity" correction and head selection
      :271-307 recycling (top 30 % of the dropped, DPC-KNN clusters, placed after the kept visual tokens)
      :308-320 no-recycle path (v2.0: original position ids kept)
      :618-714 SDPA attention that also returns softmax(QK^T/sqrt(d) + causal) ("attn_logits"); decode-time position
               override (:651-655, not in v2.0)
  llava/model/language_model/score.py
      :9-21    layer_dict / per-layer keep counts for RETAIN_TOKN = 192 / 128 / 96 / 64
      :23-46   attn_postprocess_topk (head mean, rater rows, visual columns, rater mean, top-k)
      :48-55   select_attn_head_by_sum (SparseVLM+: top 14 heads)
      v1 :23-44 attn_postprocess_rank (keep = int(rank * scale + bias))
  llava/model/language_model/utils.py
      :179-239 cluster_and_merge (DPC-KNN clustering, plain average per cluster)

Public pieces (one image, B = 1, as the official code; tensors unbatched)
  select_text_raters(visual_embeds, text_embeds)                      -> rater indices relative to the text start
  rater_visual_relation(attn, rater_idx_abs, v_start, v_num, heads)   -> (R, v_num) head-averaged rater->visual attn
  keep_count(...)                                                     -> the top-k size at a pruning layer
  dpc_knn_merge(x, cluster_num, noise)                                -> (cluster_num, D)
  recycle(dropped_hidden, dropped_scores, noise)                      -> (cluster_num, D)
  rope_gravity(positions, head_dim, base)                             -> (L, L) SparseVLM+ correction divisor
  select_heads_by_sum(attn, rater_idx_abs, v_start, v_end, n_heads)   -> (n_heads, L, L)
  sparsevlm_prune_step(hidden_out, attn, ...)                         -> dict: new hidden / positions / v_num / mask
  equivalent_tokens(v_after_layer, num_layers)                        -> the official "Equal Tokens" average

Run ``python sparsevlm_ref.py`` for the self-check.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------------

PRUNE_LAYERS = (2, 6, 15)  # modelling_sparse_llama.py:70 (0-indexed decoder layers; pruning acts on their outputs)
PRUNE_LAYERS_V1 = (2, 6, 15, 19)  # v1 modelling_sparse_llama.py:87

#: score.py:11-14 -- top-k at layers (2, 6, 15); "v1.5" = USE_VERSION 1_0 (default), "2.0" = SparseVLM+
KEEP_SCHEDULE = {
    ("1.5", 192): (300, 200, 110), ("2.0", 192): (300, 200, 118),
    ("1.5", 128): (303, 110, 36), ("2.0", 128): (238, 108, 60),
    ("1.5", 96): (238, 48, 26), ("2.0", 96): (246, 54, 28),
    ("1.5", 64): (66, 30, 17), ("2.0", 64): (66, 34, 20),
}

#: v1 README (b72c5d6) / scripts/v1_5/eval/*.sh at 91fb6d9: (scale, bias) of keep = int(rank * scale + bias)
V1_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}

RECYCLE_FRACTION = 0.3  # modelling_sparse_llama.py:282 -- top 30 % (+1) of the dropped tokens are recycled
CLUSTER_DIVISOR = 10  # :286 -- cluster_num = int(n_recycled / 10) + 1
N_HEADS_V2 = 14  # score.py:53 -- SparseVLM+ keeps the 14 heads with the most rater->visual attention


# ----------------------------------------------------------------------------------------------------------------------
# text raters
# ----------------------------------------------------------------------------------------------------------------------


def select_text_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Text raters (modelling_sparse_llama.py:198-204; v1 :215-220), computed once per prefill from the LLM's *input*
    embeddings (projector outputs for the image, embed_tokens for text).

    visual_embeds (Lv, D): the image tokens; text_embeds (Lt, D): *every* token after the image to the end of the
    prompt (question and the "ASSISTANT:" tail). Prefix tokens before the image are not candidates.
        M = softmax(V T^T, dim=text)            (Lv, Lt)   -- raw dot products, no scaling
        m = mean over visual rows               (Lt,)
        raters = { j : m_j > mean(m) }
    Returns the rater indices relative to the text start (ascending), i.e. ``t_token_idx[1]`` of the official code.
    """
    m = (visual_embeds @ text_embeds.T).softmax(dim=-1).mean(dim=0)
    return torch.nonzero(m > m.mean()).flatten()


def rater_visual_relation(
    attn: torch.Tensor, rater_idx_abs: torch.Tensor, v_start: int, v_num: int, heads: torch.Tensor | None = None
) -> torch.Tensor:
    """The rater->visual block of one layer's attention probabilities (score.py:27-30).

    attn (H, L, L): softmax(QK^T / sqrt(d) + causal mask) of the pruning layer over the *current* sequence (after the
    earlier prunings). heads: optional subset (SparseVLM+). Returns ``mean_h attn[h, raters, v_start:v_start+v_num]``
    of shape (R, v_num); the relation score of visual token j is its mean over the raters (score.py:32).
    """
    if heads is not None:
        attn = attn[heads]
    return attn.mean(dim=0)[rater_idx_abs][:, v_start:v_start + v_num]


def keep_count(
    version: str, retain: int, layer_idx: int, v_num: int, relation: torch.Tensor | None = None,
    scale: float | None = None, bias: float | None = None,
) -> int | None:
    """How many visual tokens the top-k keeps at a pruning layer.

    "1.5" / "2.0": min(KEEP_SCHEDULE[(version, retain)][layer_dict[layer]], v_num - 1)   (score.py:37-41)
    "1"         : r = matrix_rank(relation (R, v_num), float32);                          (v1 score.py:32-42)
                  None (no pruning at this layer) if v_num == r, else min(int(r * scale + bias), v_num - 1).
                  scale/bias default to V1_SCALE_BIAS[retain].
    """
    if version in ("1.5", "2.0"):
        if v_num == 0:
            return None
        return min(KEEP_SCHEDULE[(version, retain)][PRUNE_LAYERS.index(layer_idx)], v_num - 1)
    if version == "1":
        if scale is None or bias is None:
            scale, bias = V1_SCALE_BIAS[retain]
        r = int(torch.linalg.matrix_rank(relation.float()))
        if v_num - r == 0:
            return None
        return min(int(r * scale + bias), v_num - 1)
    raise ValueError(f"unknown version {version!r}")


# ----------------------------------------------------------------------------------------------------------------------
# recycling (v1 and v1.5; SparseVLM+ drops it)
# ----------------------------------------------------------------------------------------------------------------------


def dpc_knn_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DPC-KNN clustering and per-cluster averaging of x (N, D) (utils.py:179-239, after TCFormer).

        d_ij    = ||x_i - x_j||_2 / sqrt(D)
        rho_i   = exp(-mean_{j in kNN(i)} d_ij^2) + noise_i    (k = cluster_num, self included; official noise is
                                                                 torch.rand * 1e-6 -- pass ``noise`` to reproduce a
                                                                 run, None for a deterministic reference)
        delta_i = min_{j : rho_j > rho_i} d_ij, or max_{i,j} d_ij when no such j
        centers = topk(rho * delta, cluster_num)               (order of the output clusters)
        assign each token to its nearest center (argmin over centers of d); each center to itself
        y_c     = sum_{i in c} x_i / (|c| + 1e-6)
    Returns (cluster_num, D).
    """
    N, D = x.shape
    dist = torch.cdist(x.unsqueeze(0).float(), x.unsqueeze(0).float()).squeeze(0).to(x.dtype) / D**0.5
    dist.fill_diagonal_(0)
    knn = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(knn**2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise
    higher = density[None, :] > density[:, None]  # higher[i, j]: j is denser than i
    dmax = dist.max()
    delta = torch.where(higher, dist, dmax).min(dim=-1).values
    centers = torch.topk(delta * density, k=cluster_num).indices
    assign = dist[centers].argmin(dim=0)  # (N,) cluster id of each token
    assign[centers] = torch.arange(cluster_num, device=x.device)
    counts = torch.zeros(cluster_num, dtype=x.dtype, device=x.device).index_add_(0, assign, torch.ones_like(x[:, 0]))
    w = 1.0 / (counts + 1e-6)
    return torch.zeros(cluster_num, D, dtype=x.dtype, device=x.device).index_add_(0, assign, x * w[assign, None])


def recycle(dropped_hidden: torch.Tensor, dropped_scores: torch.Tensor, noise: torch.Tensor | None = None):
    """Token recycling (modelling_sparse_llama.py:277-290; v1 :251-266).

    dropped_hidden (Nd, D): the pruning layer's *output* hidden states of the dropped visual tokens (ascending order);
    dropped_scores (Nd,): their rater relation scores. Keep the top int(0.3 Nd) + 1 by score, cluster them into
    int(n / 10) + 1 clusters with ``dpc_knn_merge`` (noise: one value per recycled token). Returns (cluster_num, D).
    """
    n = int(dropped_hidden.shape[0] * RECYCLE_FRACTION) + 1
    top = torch.topk(dropped_scores, n).indices
    cluster_num = int(n / CLUSTER_DIVISOR) + 1
    return dpc_knn_merge(dropped_hidden[top], cluster_num, noise)


# ----------------------------------------------------------------------------------------------------------------------
# SparseVLM+ (v2.0) extras
# ----------------------------------------------------------------------------------------------------------------------


def rope_gravity(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The SparseVLM+ "gravity" divisor (modelling_sparse_llama.py:242-251): the RoPE score of all-ones query and key
    vectors at the current position ids,
        G_mn = (q_m . k_n) / sqrt(d) with q = k = 1 rotated  =  (2 / sqrt(d)) * sum_{i < d/2} cos((p_m - p_n) theta_i),
        theta_i = base^(-2i/d)
    (G_mm = sqrt(d)). The official code divides the layer's attention *probabilities* elementwise by G (all heads),
    then selects heads; G is not positive for every distance, which the official code does not guard against.
    """
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rel = positions.to(torch.float64)[:, None] - positions.to(torch.float64)[None, :]
    return (2.0 / math.sqrt(head_dim)) * torch.cos(rel[..., None] * inv).sum(-1)


def select_heads_by_sum(
    attn: torch.Tensor, rater_idx_abs: torch.Tensor, v_start: int, v_end: int, n_heads: int = N_HEADS_V2
) -> torch.Tensor:
    """SparseVLM+ head selection (score.py:48-55): sum each head's rater->visual attention, keep the top ``n_heads``
    (14, hard-coded). Returns the indices of the kept heads (descending sum)."""
    per_head = attn[:, rater_idx_abs, v_start:v_end].sum(dim=(1, 2))
    return per_head.topk(n_heads).indices


# ----------------------------------------------------------------------------------------------------------------------
# one pruning layer
# ----------------------------------------------------------------------------------------------------------------------


def sparsevlm_prune_step(
    hidden_out: torch.Tensor,
    attn: torch.Tensor,
    positions: torch.Tensor,
    v_start: int,
    v_num: int,
    rater_idx: torch.Tensor,
    layer_idx: int,
    retain: int = 64,
    version: str = "1.5",
    head_dim: int | None = None,
    rope_base: float = 10000.0,
    noise: torch.Tensor | None = None,
    scale: float | None = None,
    bias: float | None = None,
) -> dict:
    """What the official loop does after running pruning layer ``layer_idx`` on the current sequence
    (modelling_sparse_llama.py:229-321; v1 :225-293).

    hidden_out (L, D): the layer's output hidden states (the residual stream after attention + MLP).
    attn (H, L, L): the layer's attention probabilities (causal softmax; the official SDPA subclass recomputes them).
    positions (L,): the position ids used by this layer.
    v_start: number of tokens before the image; v_num: current number of visual tokens; text starts at v_start+v_num.
    rater_idx: ``select_text_raters`` output (relative to the text start; stays valid because text is never dropped).
    version: "1" (rank rule, PRUNE_LAYERS_V1), "1.5" (fixed schedule + recycling, default), "2.0" (SparseVLM+).
    head_dim: needed for "2.0" (the RoPE correction).

    Steps
      1. raters_abs = rater_idx + v_start + v_num
      2. (2.0) attn <- attn / rope_gravity(positions); heads <- top-14 by rater->visual sum
      3. s = mean over heads (all, or the 14) and over raters of attn[:, raters_abs, visual]        (v_num,)
      4. k = keep_count(...); mask = top-k of s (None -> keep everything, no recycling)
      5. (1, 1.5) recycled = recycle(hidden_out[dropped visual], s[dropped])  (skipped if nothing is dropped)
      6. new sequence = [prefix, kept visual (ascending), recycled clusters, text]
         positions: "1"/"1.5": arange(L_new) (the official slices the leading L_new ids, which are 0..L-1 at prefill);
                    "2.0": the kept tokens' original position ids (no recycling in 2.0).
    Returns dict(hidden, positions, v_num, keep_mask (v_num,) bool, recycled (int), scores (v_num,)).
    """
    L = hidden_out.shape[0]
    t_start = v_start + v_num
    raters_abs = rater_idx + t_start
    heads = None
    if version == "2.0":
        if head_dim is None:
            raise ValueError("version 2.0 needs head_dim for the RoPE correction")
        attn = attn / rope_gravity(positions, head_dim, rope_base).to(attn.dtype)
        heads = select_heads_by_sum(attn, raters_abs, v_start, t_start)
    rel = rater_visual_relation(attn, raters_abs, v_start, v_num, heads)  # (R, v_num)
    scores = rel.mean(dim=0)
    k = keep_count(version, retain, layer_idx, v_num, rel, scale, bias)
    if k is None:
        return dict(hidden=hidden_out, positions=positions, v_num=v_num,
                    keep_mask=torch.ones(v_num, dtype=torch.bool), recycled=0, scores=scores)
    keep_mask = torch.zeros(v_num, dtype=torch.bool, device=hidden_out.device)
    keep_mask[torch.topk(scores, k).indices] = True
    vis = hidden_out[v_start:t_start]
    parts = [hidden_out[:v_start], vis[keep_mask]]
    n_rec = 0
    if version in ("1", "1.5") and bool((~keep_mask).any()):
        rec = recycle(vis[~keep_mask], scores[~keep_mask], noise)
        parts.append(rec)
        n_rec = rec.shape[0]
    parts.append(hidden_out[t_start:])
    hidden = torch.cat(parts, dim=0)
    if version == "2.0":
        keep_all = torch.ones(L, dtype=torch.bool, device=hidden_out.device)
        keep_all[v_start:t_start] = keep_mask
        new_pos = positions[keep_all]
    else:
        new_pos = torch.arange(hidden.shape[0], device=positions.device, dtype=positions.dtype)
    return dict(hidden=hidden, positions=new_pos, v_num=int(keep_mask.sum()) + n_rec, keep_mask=keep_mask,
                recycled=n_rec, scores=scores)


def equivalent_tokens(v_after_layer: list[int]) -> float:
    """The official "Equal Tokens" figure (modelling_sparse_llama.py:359, 368): the mean over decoder layers of the
    visual-token count *recorded after each layer*, so a pruning layer already counts its reduced number although it
    ran on the larger set. ``v_after_layer[l]`` is that count for layer l."""
    return sum(v_after_layer) / len(v_after_layer)


# ----------------------------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------------------------


def _random_causal_attn(H: int, L: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    logits = torch.randn(H, L, L, generator=g, dtype=dtype)
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def _simulate(version: str, retain: int, g: torch.Generator, num_layers: int = 32, H: int = 32, D: int = 64,
              v_start: int = 35, n_text: int = 40, head_dim: int = 128):
    """Run the selection at every pruning layer over random hidden states / attentions (shapes as LLaVA-1.5-7B; no
    recycling noise, so deterministic)."""
    v_num = 576
    emb = torch.randn(v_start + v_num + n_text, D, generator=g, dtype=torch.float64)
    raters = select_text_raters(emb[v_start:v_start + v_num], emb[v_start + v_num:])
    hidden, positions = emb, torch.arange(emb.shape[0])
    layers = PRUNE_LAYERS_V1 if version == "1" else PRUNE_LAYERS
    counts, steps = [], []
    for layer in range(num_layers):
        if layer in layers:
            L = hidden.shape[0]
            hidden_out = hidden + 0.01 * torch.randn(L, D, generator=g, dtype=torch.float64)
            attn = _random_causal_attn(H, L, g)
            if version == "1":  # a low-rank rater->visual block, so the rank rule has something to do
                base = attn[:, :, v_start:v_start + v_num]
                attn = attn.clone()
                attn[:, :, v_start:v_start + v_num] = base[:, :, :8].repeat(1, 1, v_num // 8 + 1)[:, :, :v_num]
            out = sparsevlm_prune_step(hidden_out, attn, positions, v_start, v_num, raters, layer, retain, version,
                                       head_dim=head_dim)
            steps.append((layer, v_num, int(out["keep_mask"].sum()), out["recycled"], out["v_num"]))
            hidden, positions, v_num = out["hidden"], out["positions"], out["v_num"]
            assert hidden.shape[0] == v_start + v_num + n_text and positions.shape[0] == hidden.shape[0]
        counts.append(v_num)
    return counts, steps, positions, raters


def _self_check() -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)

    # [1] text raters: a subset of the text tokens, above-mean relevance; deterministic
    v = torch.randn(576, 64, generator=g)
    t = torch.randn(40, 64, generator=g)
    r1, r2 = select_text_raters(v, t), select_text_raters(v, t)
    m = (v @ t.T).softmax(-1).mean(0)
    assert torch.equal(r1, r2) and 0 < r1.numel() < 40 and torch.all(m[r1] > m.mean())
    lines.append(f"[1] text raters: {r1.numel()} of 40 text tokens (m_j > mean m), deterministic: ok")

    # [2] v1.5 (USE_VERSION=1_0, RETAIN_TOKN=64): 576 -> 66 kept + 16 recycled = 82 -> 30 + 2 = 32 -> 17 + 1 = 18
    counts, steps, pos, _ = _simulate("1.5", 64, g)
    assert [s[4] for s in steps] == [82, 32, 18], steps
    assert [(s[2], s[3]) for s in steps] == [(66, 16), (30, 2), (17, 1)]
    assert torch.equal(pos, torch.arange(pos.numel()))
    eq = equivalent_tokens(counts)
    true_avg = sum([576] * 3 + [82] * 4 + [32] * 9 + [18] * 16) / 32
    lines.append(f"[2] v1.5 RETAIN_TOKN=64 at layers 2/6/15: (v_in, kept, recycled, v_out) = "
                 f"{[(s[1], s[2], s[3], s[4]) for s in steps]}; official 'Equal Tokens' {eq:.2f}; "
                 f"tokens actually processed per layer {true_avg:.2f}; positions re-indexed 0..L'-1: ok")

    # [3] SparseVLM+ (USE_VERSION=2_0, RETAIN_TOKN=64): 576 -> 66 -> 34 -> 20, no recycling, original positions kept
    counts2, steps2, pos2, _ = _simulate("2.0", 64, g)
    assert [s[4] for s in steps2] == [66, 34, 20] and all(s[3] == 0 for s in steps2)
    assert torch.all(pos2[1:] > pos2[:-1]) and pos2[-1] == 35 + 576 + 40 - 1 and pos2.numel() == 35 + 20 + 40
    lines.append(f"[3] SparseVLM+ RETAIN_TOKN=64: v_out {[s[4] for s in steps2]}, 'Equal Tokens' "
                 f"{equivalent_tokens(counts2):.2f}, last position id still {int(pos2[-1])} (original ids kept): ok")

    # [4] other budgets (v1.5 and 2.0): 'Equal Tokens' close to the nominal 192 / 128 / 96 / 64
    rows = []
    for ver in ("1.5", "2.0"):
        for retain in (192, 128, 96, 64):
            c, s, _, _ = _simulate(ver, retain, g)
            rows.append(f"{ver}/{retain}: {[x[4] for x in s]} eq {equivalent_tokens(c):.1f}")
    lines.append("[4] " + "; ".join(rows))

    # [5] v1 (rank rule, 64 = scale 0.8, bias 0, layers 2/6/15/19) on a rank-8 rater->visual block
    c1, s1, _, _ = _simulate("1", 64, g)
    assert s1[0][2] == int(8 * 0.8)  # planted rank 8 -> keep int(8 * 0.8) = 6 at layer 2
    lines.append(f"[5] v1 rank rule (scale 0.8, planted rank-8 rater->visual block; real blocks have rank <= min(#raters, v_num)): "
                 f"(layer, v_in, kept, recycled, v_out) = {s1}: ok")

    # [6] recycling: cluster count and the DPC-KNN merge properties; noise reproducibility
    x = torch.randn(510, 16, generator=g, dtype=torch.float64)
    sc = torch.rand(510, generator=g, dtype=torch.float64)
    rec = recycle(x, sc)
    assert rec.shape == (16, 16)  # int(510*0.3)+1 = 154 -> int(15.4)+1 = 16 clusters
    y = dpc_knn_merge(x[:50], 6)
    assert y.shape == (6, 16)
    nz = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-6
    assert torch.equal(dpc_knn_merge(x[:50], 6, nz), dpc_knn_merge(x[:50], 6, nz.clone()))
    # three planted blobs -> three clusters whose outputs are the blob means (times count / (count + 1e-6))
    centers = torch.tensor([[10.0] * 16, [-10.0] * 16, [0.0] * 8 + [10.0] * 8], dtype=torch.float64)
    blobs = torch.cat([c + 0.1 * torch.randn(10, 16, generator=g, dtype=torch.float64) for c in centers])
    got = dpc_knn_merge(blobs[torch.randperm(30, generator=g)], 3)
    want = torch.stack([blobs[i * 10:(i + 1) * 10].mean(0) for i in range(3)]) * (10 / (10 + 1e-6))
    assert all(any(torch.allclose(r, w) for r in got) for w in want)
    lines.append("[6] recycle: 510 dropped -> 154 recycled -> 16 clusters; DPC-KNN recovers 3 planted blob means; "
                 "deterministic given the noise: ok")

    # [7] rope gravity: diagonal sqrt(d), symmetric, = (2/sqrt d) sum cos(...) against a direct RoPE computation
    d = 128
    p = torch.arange(20)
    G = rope_gravity(p, d)
    inv = 10000 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = p[:, None].double() * torch.cat([inv, inv])[None]
    ones = torch.ones(20, d, dtype=torch.float64)
    rot_half = torch.cat([-ones[:, d // 2:], ones[:, : d // 2]], dim=-1)
    q = ones * ang.cos() + rot_half * ang.sin()
    assert torch.allclose(G, q @ q.T / math.sqrt(d), atol=1e-9) and torch.allclose(G.diag(), torch.full((20,), d**0.5, dtype=torch.float64))
    lines.append(f"[7] rope_gravity == all-ones q/k RoPE scores / sqrt(d) (HF rotate_half convention); "
                 f"G[0,0]={G[0, 0]:.3f}, G[0,19]={G[0, 19]:.3f}: ok")
    return lines


if __name__ == "__main__":
    for line in _self_check():
        print(line)
    print("sparsevlm_ref self-check: all ok")
