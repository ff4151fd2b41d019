"""VisionZip (Yang et al., CVPR 2025) -- a pure-PyTorch reference written from the math of the official code
(github.com/dvlab-research/VisionZip @ 3151f6d: visionzip/clip_encoder.py, visionzip/utils.py, visionzip/main.py,
visionzip/llava_arch.py); see visionzip.md. Nothing is copied; outputs (values and token order) match the official code.

Public pieces
  clip_layer_internals(vision_model, pixel_values, layer=-2) -> (hidden_states tuple, attention probs, keys mean)
  visionzip_reference(hidden_states_feature_layer, attn_cls_row, keys, dominant, contextual) -> (kept, info)
  visionzip_from_clip(vision_model, pixel_values, dominant, contextual, layer=-2) -> (kept, info)
  visionzip_anyres_layout(base, tiles, tile_dominant_idx, rows, cols, side) -> LLaVA-NeXT 'spatial_unpad' sequence

``dominant`` counts CLS (the official ``visionzip(model, dominant=54, contextual=10)`` keeps CLS + 53 patches + 10
contextual = 64 tokens, all fed to the projector and the LLM).

Run ``python visionzip_ref.py`` for the self-check.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------------------------
# the selection / merge
# ----------------------------------------------------------------------------------------------------------------------


def visionzip_reference(
    hidden_states_feature_layer: torch.Tensor,
    attn_cls_row: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, dict]:
    """VisionZip on one tower pass.

    hidden_states_feature_layer: [B, 1+P, C], the tower's hidden_states[-2] (output of layer L-2; no post-LN), CLS at 0.
    attn_cls_row: softmax attention of layer L-2 from the CLS query, [B, H, 1+P] (summed over heads here, as the
        official code) or already reduced [B, 1+P]; only the patch columns 1..P are used.
    keys: layer L-2's keys k_proj(LN1(input)) averaged over heads, [B, 1+P, d] (or [B, H, 1+P, d]: averaged here).
    dominant: tokens kept by attention, CLS included (dominant - 1 patches).
    contextual: merged tokens.

    Returns kept [B, dominant + contextual, C] in the official order
        [CLS, dominant patches in ascending position, contextual tokens in ascending target position]
    and info: dominant_idx [B, dominant] (ascending, 0 first), target_idx [B, contextual] (positions in the 1+P
    sequence), assign [B, M - contextual] (slot of each merged non-target token), merged_idx [B, M - contextual]
    (their positions), counts [B, contextual], groups (per batch: list of (target, [assigned positions])),
    topk_order [B, dominant] ([0] + top-(dominant-1) in descending score, the official ``all_indices``).
    """
    h = hidden_states_feature_layer
    b, t, c = h.shape
    if attn_cls_row.dim() == 3:
        attn_cls_row = attn_cls_row.sum(dim=1)  # sum over heads (order-equivalent to the mean)
    if keys.dim() == 4:
        keys = keys.mean(dim=1)
    n_dom = dominant - 1  # patches chosen by attention; CLS is always kept on top

    # --- dominant: top (dominant - 1) patches by CLS attention, plus CLS; gathered in ascending position order
    top = attn_cls_row[:, 1:].topk(n_dom, dim=1).indices + 1
    topk_order = torch.cat([top.new_zeros(b, 1), top], dim=1)
    dominant_idx = topk_order.sort(dim=1).values
    keep = torch.zeros(b, t, dtype=torch.bool, device=h.device)
    keep.scatter_(1, dominant_idx, True)
    dominant_tokens = h.gather(1, dominant_idx[..., None].expand(-1, -1, c))

    # --- the rest (ascending position); M = (1+P) - dominant
    rest_idx = torch.stack([torch.nonzero(~keep[i]).squeeze(1) for i in range(b)])  # [B, M]
    m = rest_idx.shape[1]
    rest_h = h.gather(1, rest_idx[..., None].expand(-1, -1, c))
    rest_k = keys.gather(1, rest_idx[..., None].expand(-1, -1, keys.shape[-1]))
    rest_k = rest_k / rest_k.norm(dim=-1, keepdim=True)  # L2-normalised keys (no eps)

    # --- contextual targets: evenly spaced over the rest's positions 0, step, 2 step, ... (first `contextual`)
    step = max(1, m // contextual)
    slots = torch.arange(0, m, step, device=h.device)[:contextual]  # positions within the rest
    is_target = torch.zeros(m, dtype=torch.bool, device=h.device)
    is_target[slots] = True
    others = torch.nonzero(~is_target).squeeze(1)

    # --- each non-target joins its most cosine-similar target (first index on ties)
    sim = rest_k[:, others] @ rest_k[:, slots].transpose(1, 2)  # [B, M - C, C]
    assign = sim.argmax(dim=2)
    one_hot = torch.zeros(b, others.numel(), slots.numel(), dtype=h.dtype, device=h.device)
    one_hot.scatter_(2, assign[..., None], 1.0)
    counts = one_hot.sum(dim=1)  # [B, C]
    mean_assigned = (one_hot.transpose(1, 2) @ rest_h[:, others]) / counts.clamp(min=1)[..., None]
    # the official formula: target + mean(assigned) -- NOT the mean over {target} U assigned; unweighted
    contextual_tokens = rest_h[:, slots] + mean_assigned

    kept = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    target_idx = rest_idx[:, slots]
    merged_idx = rest_idx[:, others]
    groups = [
        [(int(target_idx[i, j]), merged_idx[i][assign[i] == j].tolist()) for j in range(slots.numel())]
        for i in range(b)
    ]
    info = dict(
        dominant_idx=dominant_idx, target_idx=target_idx, assign=assign, merged_idx=merged_idx, counts=counts,
        groups=groups, topk_order=topk_order, step=step,
    )
    return kept, info


# ----------------------------------------------------------------------------------------------------------------------
# the HF CLIP tower's internals (by hand)
# ----------------------------------------------------------------------------------------------------------------------


def _vision_parts(model):
    inner = getattr(model, "vision_model", model)  # transformers 5: CLIPVisionModel is flat; 4.x: .vision_model
    return inner.embeddings, inner.pre_layrnorm, inner.encoder.layers


@torch.no_grad()
def clip_layer_internals(vision_model, pixel_values: torch.Tensor, layer: int = -2):
    """Run the tower by hand; return (hidden_states as HF's tuple, attention probs [B, H, T, T] of ``layer``, keys of
    ``layer`` averaged over heads [B, T, head_dim]). ``layer`` indexes layers like HF's attentions tuple, so the
    attention/keys of layer -2 belong to the layer whose output is hidden_states[-2] (what VisionZip uses)."""
    embeddings, pre_ln, layers = _vision_parts(vision_model)
    target = layer % len(layers)
    x = pre_ln(embeddings(pixel_values))
    hidden = [x]
    probs = keys = None
    for i, blk in enumerate(layers):
        a = blk.self_attn
        y = blk.layer_norm1(x)
        bsz, t, c = y.shape
        nh = a.num_heads
        hd = c // nh
        q = a.q_proj(y).view(bsz, t, nh, hd).transpose(1, 2)
        k = a.k_proj(y).view(bsz, t, nh, hd).transpose(1, 2)
        v = a.v_proj(y).view(bsz, t, nh, hd).transpose(1, 2)
        p = ((q @ k.transpose(-1, -2)) * a.scale).softmax(dim=-1)
        if i == target:
            probs, keys = p, k.mean(dim=1)
        x = x + a.out_proj((p @ v).transpose(1, 2).reshape(bsz, t, c))
        x = x + blk.mlp(blk.layer_norm2(x))
        hidden.append(x)
    return tuple(hidden), probs, keys


def visionzip_from_clip(vision_model, pixel_values, dominant: int, contextual: int, layer: int = -2):
    """VisionZip on a CLIP tower: features = hidden_states[layer] (the official code hard-wires -2), CLS attention and
    keys from the same layer. Returns (kept [B, dominant + contextual, C] -- to go through the projector --, info)."""
    hidden, probs, keys = clip_layer_internals(vision_model, pixel_values, layer)
    return visionzip_reference(hidden[layer], probs[:, :, 0, :], keys, dominant, contextual)


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT anyres layout (official llava_arch.py, mm_patch_merge_type containing 'unpad')
# ----------------------------------------------------------------------------------------------------------------------


def visionzip_anyres_layout(
    base: torch.Tensor, tiles: torch.Tensor, tile_dominant_idx: torch.Tensor, rows: int, cols: int, side: int
) -> torch.Tensor:
    """Sequence of one anyres image, as the official patch builds it (every crop, base and tiles, went through
    VisionZip with the same dominant/contextual and then the projector):

      base crop's kept tokens as they are (CLS, dominant ascending, contextual)
      + the tiles' dominant *patches* (no CLS) placed on the stitched (rows*side) x (cols*side) grid (tiles in
        row-major order) and read out in raster order of that whole grid (no unpadding, no image_newline)
      + the tiles' CLS tokens (tile order)
      + the tiles' contextual tokens (tile-major, then slot order).

    base [D+C, ch]; tiles [n, D+C, ch] (n = rows * cols); tile_dominant_idx [n, D] (positions incl. 0, any order);
    side: patches per side (the official code hard-codes 24 / 576 for CLIP-L/336)."""
    n, kept_len, ch = tiles.shape
    d = tile_dominant_idx.shape[1]
    assert n == rows * cols
    pos = tile_dominant_idx.sort(dim=1).values[:, 1:] - 1  # patch positions of the dominant patches (CLS dropped)
    grid = tiles.new_zeros(n, side * side, ch)
    mask = torch.zeros(n, side * side, dtype=torch.bool, device=tiles.device)
    mask.scatter_(1, pos, True)
    grid[mask] = tiles[:, 1:d].reshape(-1, ch)
    grid = grid.view(rows, cols, side, side, ch).permute(0, 2, 1, 3, 4).reshape(rows * side * cols * side, ch)
    mask = mask.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(-1)
    return torch.cat([base, grid[mask], tiles[:, 0], tiles[:, d:].reshape(-1, ch)], dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------------------------


def _self_check() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tome_ref import _tiny_llava

    out = []
    model = _tiny_llava()  # fp64, the 'tiny' preset's CLIP geometry: 144 patches + CLS, 2 layers
    tower = model.model.vision_tower
    px = torch.randn(2, 3, tower.config.image_size, tower.config.image_size, dtype=torch.float64)

    # 1. the by-hand internals match HF (hidden states: sdpa; attention probs: eager's output_attentions)
    hidden, probs, keys = clip_layer_internals(tower, px, -2)
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states
        impl = tower.config._attn_implementation
        tower.config._attn_implementation = "eager"
        try:
            ref_attn = tower(px, output_attentions=True).attentions
        finally:
            tower.config._attn_implementation = impl
    err_h = max((a - b).abs().max().item() for a, b in zip(ref, hidden))
    err_a = (ref_attn[-2] - probs).abs().max().item()  # eager runs its softmax in float32
    assert err_h < 1e-12 and err_a < 1e-6, (err_h, err_a)
    out.append(f"[1] by-hand tower vs HF: hidden_states {err_h:.2e}; layer -2 attention probs vs eager {err_a:.2e}")

    # 2. the tiny preset's numbers: 36 kept = 30 dominant (incl CLS) + 6 contextual
    kept, info = visionzip_from_clip(tower, px, dominant=30, contextual=6)
    assert kept.shape == (2, 36, tower.config.hidden_size)
    assert (info["dominant_idx"][:, 0] == 0).all() and torch.equal(kept[:, 0], hidden[-2][:, 0])
    m = 145 - 30
    assert info["step"] == m // 6 and info["target_idx"].shape == (2, 6)
    for i in range(2):
        cover = sorted(info["dominant_idx"][i].tolist() + info["target_idx"][i].tolist() + info["merged_idx"][i].tolist())
        assert cover == list(range(145))  # every position used exactly once
        for j, (tgt, members) in enumerate(info["groups"][i]):
            expect = hidden[-2][i, tgt] + (hidden[-2][i, members].mean(0) if members else 0)
            assert torch.allclose(kept[i, 30 + j], expect, atol=1e-12)
    out.append(f"[2] tiny: dominant=30 (CLS+29), contextual=6 -> {tuple(kept.shape)}; step={info['step']} over the "
               f"{m} rest; targets (batch 0) {info['target_idx'][0].tolist()}; group sizes {info['counts'][0].tolist()}; "
               f"contextual = target + mean(assigned) checked")

    # 3. LLaVA-1.5 numbers on synthetic inputs: 577 tokens, dominant=54, contextual=10 -> 64; targets every 52nd
    b, t, c, hd, heads = 1, 577, 16, 8, 4
    hs = torch.randn(b, t, c, dtype=torch.float64)
    attn = torch.rand(b, heads, t).softmax(-1).double()
    ks = torch.randn(b, heads, t, hd, dtype=torch.float64)
    kept, info = visionzip_reference(hs, attn, ks, 54, 10)
    assert kept.shape == (1, 64, c) and info["step"] == 52
    out.append(f"[3] 577 tokens, dominant=54, contextual=10 -> {tuple(kept.shape)}; rest M=523, step 52 "
               f"(slots 0,52,..,468 of the rest)")

    # 4. anyres layout: base + 2x2 tiles of 24x24
    side, d, cc = 24, 54, 10
    n = 4
    tiles = torch.randn(n, d + cc, 3, dtype=torch.float64)
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(576)[: d - 1] + 1]) for _ in range(n)])
    seq = visionzip_anyres_layout(torch.randn(d + cc, 3, dtype=torch.float64), tiles, idx, 2, 2, side)
    assert seq.shape[0] == (1 + n) * (d + cc)
    out.append(f"[4] anyres 2x2 tiles: sequence length {seq.shape[0]} = 5 x 64")
    print("\n".join(out))
    print("visionzip_ref self-check: OK")


if __name__ == "__main__":
    _self_check()
