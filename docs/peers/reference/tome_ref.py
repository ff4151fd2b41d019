"""Token Merging (ToMe, Bolya et al., ICLR 2023) -- a pure-PyTorch reference written from the math of the official
code (github.com/facebookresearch/ToMe @ af95e4b, tome/merge.py, tome/patch/timm.py, tome/utils.py); see tome.md.

Nothing here is copied from that repository; it re-derives the same operations so that outputs (values *and* token
order) match the official implementation.

Public pieces
  tome_bipartite_soft_matching(metric, r, class_token, distill_token) -> (merge, unmerge)
  merge_wavg(merge, x, size) -> (x_merged, size_merged)
  merge_source(merge, x, source) -> source (adjacency: merged token <- original tokens)
  parse_r(num_layers, r) -> per-layer list of r
  schedule_for_target(num_patches, target, num_layers, class_token) -> per-layer list of r reaching a target count
  proportional_attention(...)   -- one HF CLIP attention with log(size) added to the logits
  tome_reference_vit_forward(clip_vision_model, pixel_values, r, ...) -> dict with per-layer hidden states etc.

Run ``python tome_ref.py`` for the self-check (fp64, tiny LLaVA CLIP tower: r=0 equals HF to 1e-12, etc.).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# ----------------------------------------------------------------------------------------------------------------------
# bipartite soft matching
# ----------------------------------------------------------------------------------------------------------------------


def _identity(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    return x


def tome_bipartite_soft_matching(
    metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> tuple[Callable, Callable]:
    """One ToMe round. ``metric``: [B, T, c] (ToMe uses the layer's keys averaged over heads).

    Set A = tokens at even positions 0, 2, 4, ...; set B = odd positions 1, 3, 5, ...
    Every A token proposes its most similar B token (cosine similarity); the r A tokens with the highest proposal
    scores are merged into their B partner; the other A tokens stay. Returns ``merge(x, mode)`` (mode: a
    ``scatter_reduce`` reduction, 'mean' / 'sum' / 'amax') giving [B, T - r, C] in the order
        [unmerged A tokens, all B tokens (original B order)]
    (with ``distill_token``: [A-unmerged[0], B[0], A-unmerged[1:], B[1:]]); and ``unmerge(y)`` mapping a merged
    sequence back to T tokens (each source token takes its destination's value).

    Unmerged A order: ascending original position when ``class_token`` (so CLS stays first), otherwise the order of
    the descending-score sort (the official code sorts only in the class-token case).

    r is clipped to floor((T - protected) / 2), protected = class_token + distill_token.
    """
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(int(r), (t - protected) // 2)
    if r <= 0:
        _identity.info = None  # type: ignore[attr-defined]
        return _identity, _identity

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # no eps, like the official code
        a, b = unit[:, 0::2], unit[:, 1::2]
        scores = a @ b.transpose(1, 2)  # [B, |A|, |B|] cosine similarities
        if class_token:  # CLS is A[0]: it never becomes a source
            scores[:, 0, :] = -math.inf
        if distill_token:  # the distillation token is B[0]: nothing merges into it
            scores[:, :, 0] = -math.inf
        best, partner = scores.max(dim=-1)  # per A token: best score and its B partner
        order = best.argsort(dim=-1, descending=True)  # A tokens by descending best score
        src = order[:, :r]  # merged A tokens (the r best edges)
        unm = order[:, r:]  # A tokens that stay
        if class_token:
            unm = unm.sort(dim=-1).values
        dst = partner.gather(1, src)  # B index of each merged A token

    n_a = a.shape[1]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        xa, xb = x[:, 0::2], x[:, 1::2]
        c = x.shape[-1]
        kept = xa.gather(1, unm[..., None].expand(-1, -1, c))
        moved = xa.gather(1, src[..., None].expand(-1, -1, c))
        # include_self=True (the default): the B token's own value takes part in the reduction
        xb = xb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce=mode)
        if distill_token:
            return torch.cat([kept[:, :1], xb[:, :1], kept[:, 1:], xb[:, 1:]], dim=1)
        return torch.cat([kept, xb], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        # (only for the non-distill layout, as in the official code)
        k = unm.shape[1]
        kept, yb = y[:, :k], y[:, k:]
        c = y.shape[-1]
        out = y.new_zeros(y.shape[0], t, c)
        out[:, 1::2] = yb
        out.scatter_(1, (2 * unm)[..., None].expand(-1, -1, c), kept)
        out.scatter_(1, (2 * src)[..., None].expand(-1, -1, c), yb.gather(1, dst[..., None].expand(-1, -1, c)))
        return out

    merge.info = dict(unm_idx=unm, src_idx=src, dst_idx=dst, r=r, num_a=n_a)  # type: ignore[attr-defined]
    return merge, unmerge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: x' = sum(size_i x_i) / sum(size_i) over each group; size' = sum(size_i).
    ``size`` is [B, T, 1] (None: all ones)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    total = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return total / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Track which original tokens each current token holds: source [B, T_now, T_orig] 0/1 (None: identity)."""
    if source is None:
        b, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(b, t, t)
    return merge(source, mode="amax")


# ----------------------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------------------


def parse_r(num_layers: int, r: int | Sequence[int] | tuple[int, float]) -> list[int]:
    """ToMe's schedule: int -> the same r in every layer; (r, inflect) -> a linear ramp from int(r (1 - inflect)) to
    2 r - that (inflect -1: decreasing, +1: increasing), truncated to ints; list -> as given, zero-padded."""
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(lo + step * i) for i in range(num_layers)]


def schedule_for_target(num_patches: int, target: int, num_layers: int, class_token: bool = True) -> list[int]:
    """A per-layer r list (ToMe itself only has constant / ramped r) that takes ``num_patches`` patch tokens to exactly
    ``target`` over ``num_layers`` merging layers, spreading the reduction evenly and respecting the one-half cap of
    every round. Raises if unreachable (each round at most halves: rounds >= ceil(log2(num_patches / target)))."""
    protected = int(class_token)
    t = num_patches + protected
    left = num_patches - target
    out = []
    for layer in range(num_layers):
        cap = (t - protected) // 2
        want = math.ceil(left / (num_layers - layer)) if left > 0 else 0
        r = min(cap, want)
        # if later layers cannot absorb the rest (halving), take as much as possible now
        rest_capacity = _capacity(t - r - protected, num_layers - layer - 1)
        if left - r > rest_capacity:
            r = cap
        out.append(r)
        t -= r
        left -= r
    if left > 0:
        raise ValueError(f"{num_patches} -> {target} is not reachable in {num_layers} ToMe rounds")
    return out


def _capacity(patches: int, rounds: int) -> int:
    """Most tokens removable from ``patches`` in ``rounds`` rounds (each removes floor(n / 2))."""
    removed = 0
    for _ in range(rounds):
        r = patches // 2
        removed += r
        patches -= r
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# HF CLIP vision tower with ToMe (by hand, block by block)
# ----------------------------------------------------------------------------------------------------------------------


def proportional_attention(attn_module, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``CLIPAttention`` math by hand, plus ToMe's proportional attention: logits (q k^T * head_dim^-0.5) get
    + log(size_j) for every key j (all heads, all queries) before the softmax. Returns (output, keys mean over heads)
    -- the keys are k_proj(x) (bias included, unscaled), as ToMe's metric."""
    b, t, c = x.shape
    h = attn_module.num_heads
    hd = c // h
    q = attn_module.q_proj(x).view(b, t, h, hd).transpose(1, 2)
    k = attn_module.k_proj(x).view(b, t, h, hd).transpose(1, 2)
    v = attn_module.v_proj(x).view(b, t, h, hd).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * attn_module.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, c)
    return attn_module.out_proj(out), k.mean(dim=1)


def _vision_parts(model):
    inner = getattr(model, "vision_model", model)  # transformers 5: CLIPVisionModel is flat; 4.x: .vision_model
    return inner.embeddings, inner.pre_layrnorm, inner.encoder.layers


@torch.no_grad()
def tome_reference_vit_forward(
    clip_vision_model,
    pixel_values: torch.Tensor,
    r: int | Sequence[int] | tuple[int, float],
    class_token: bool = True,
    prop_attn: bool = True,
    trace_source: bool = True,
) -> dict:
    """Run an HF CLIP vision tower layer by layer with ToMe in every block, as the official timm patch does:

        x = x + Attn(LN1(x), size)          # proportional attention (log size on the logits) if prop_attn
        merge = bipartite(keys.mean(heads), r_l, class_token)   # keys of this block's attention
        x, size = merge_wavg(merge, x, size)                     # between the attention and the MLP
        x = x + MLP(LN2(x))

    ``r``: int (constant per layer), (r, inflect), or a per-layer list (see parse_r). Returns dict:
      hidden_states: tuple like HF's (index 0 = pre_layrnorm(embeddings), index i = output of layer i-1),
      sizes: per-layer [B, T_l, 1] sizes after each layer (None before any merge),
      sources: per-layer [B, T_l, T_0] 0/1 maps (if trace_source), r: the list used (after the half-cap).
    HF LLaVA's features are hidden_states[vision_feature_layer] (-2) with [:, 1:] for 'default' (CLS is kept first by
    the class-token sort, so dropping index 0 still drops CLS)."""
    embeddings, pre_ln, layers = _vision_parts(clip_vision_model)
    x = pre_ln(embeddings(pixel_values))
    schedule = parse_r(len(layers), r)
    size = None
    source = None
    hidden, sizes, sources, used = [x], [], [], []
    for layer, r_l in zip(layers, schedule):
        attn_out, metric = proportional_attention(layer.self_attn, layer.layer_norm1(x), size if prop_attn else None)
        x = x + attn_out
        if r_l > 0:
            merge, _ = tome_bipartite_soft_matching(metric, r_l, class_token=class_token)
            used.append(merge.info["r"] if getattr(merge, "info", None) else 0)
            if trace_source:
                source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size)
        else:
            used.append(0)
        x = x + layer.mlp(layer.layer_norm2(x))
        hidden.append(x)
        sizes.append(size)
        sources.append(source)
    return dict(hidden_states=tuple(hidden), sizes=sizes, sources=sources, r=used)


# ----------------------------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------------------------


def _tiny_llava(layers: int | None = None, image_size: int | None = None, hidden: int | None = None):
    """A tiny LlavaForConditionalGeneration with the 'tiny' preset's CLIP geometry (skipvision harness/presets.py: 168 px,
    patch 14, hidden 64, 2 layers, heads = hidden // 32, intermediate 4 x hidden, layer -2, 'default')."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    geometry = dict(image_size=168, patch_size=14, hidden=64, layers=2)
    try:  # the project's preset, when importable
        from skipvision.harness.presets import get_preset

        p = get_preset("tiny")
        geometry = dict(image_size=p.image_size, patch_size=p.patch_size, hidden=p.vision_hidden, layers=p.vision_layers)
    except Exception:
        pass
    image_size = image_size or geometry["image_size"]
    hidden = hidden or geometry["hidden"]
    layers = layers or geometry["layers"]
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        image_size=image_size,
        patch_size=geometry["patch_size"],
    )
    text = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_token_id=5,
        image_seq_length=(image_size // geometry["patch_size"]) ** 2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # like presets._informative_tower_init: distinct tokens instead of near-identical ones
        tower = model.model.vision_tower
        inner = getattr(tower, "vision_model", tower)
        inner.embeddings.patch_embedding.weight.normal_(0.0, 0.05)
        inner.embeddings.position_embedding.weight.normal_(0.0, 0.5)
    return model.double()


def _self_check() -> None:
    torch.manual_seed(0)
    out = []

    # 1. r = 0 equals the HF tower (fp64, sdpa) to 1e-12, every hidden state
    model = _tiny_llava()
    tower = model.model.vision_tower
    px = torch.randn(2, 3, tower.config.image_size, tower.config.image_size, dtype=torch.float64)
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states
    mine = tome_reference_vit_forward(tower, px, r=0)
    err = max((a - b).abs().max().item() for a, b in zip(ref, mine["hidden_states"]))
    assert len(ref) == len(mine["hidden_states"]) and err < 1e-12, err
    out.append(f"[1] r=0 vs HF CLIPVisionModel hidden_states ({len(ref)} tensors, {tuple(ref[-1].shape)}): "
               f"max |diff| = {err:.3e}")
    # and the LLaVA feature path: get_image_features == hidden_states[-2][:, 1:] -> projector
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
        proj = model.model.multi_modal_projector(mine["hidden_states"][-2][:, 1:]).reshape(-1, feats.shape[-1])
    err = (feats.reshape(-1, feats.shape[-1]) - proj).abs().max().item()
    assert err < 1e-12, err
    out.append(f"[1b] LLaVA get_image_features == projector(ref hidden_states[-2][:, 1:]): max |diff| = {err:.3e}")

    # 2. r > 0 on the tiny tower: layer 0 is the only one feeding hidden_states[-2]; one round caps at half
    res = tome_reference_vit_forward(tower, px, r=100)
    t = [h.shape[1] for h in res["hidden_states"]]
    assert t == [145, 73, 37], t
    assert torch.equal(res["sizes"][-1].sum(1), torch.full((2, 1), 145.0, dtype=torch.float64))
    cls_src = res["sources"][-1][:, 0]
    assert (cls_src[:, 0] == 1).all() and (cls_src.sum(-1) == 1).all()  # CLS alone, first
    out.append(f"[2] tiny tower r=100 (clipped to half): tokens per hidden state {t}, r used {res['r']}, sizes sum 145, "
               f"CLS stays alone at index 0")

    # 3. merge_wavg keeps sum(size * x) and sum(size); merged value is the size-weighted mean of its sources
    x = torch.randn(3, 41, 8, dtype=torch.float64)
    m = torch.randn(3, 41, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 41, 1)).double()
    merge, unmerge = tome_bipartite_soft_matching(m, 15, class_token=True)
    y, s = merge_wavg(merge, x, size)
    assert y.shape == (3, 26, 8)
    assert torch.allclose((y * s).sum(1), (x * size).sum(1), atol=1e-12) and torch.equal(s.sum(1), size.sum(1))
    src = merge_source(merge, x)  # groups: which original tokens each output token holds
    manual = (src @ (x * size)) / (src @ size)
    assert torch.allclose(manual, y, atol=1e-12)
    info = merge.info
    assert (info["unm_idx"][:, 0] == 0).all() and torch.equal(info["unm_idx"], info["unm_idx"].sort(-1).values)
    back = unmerge(y)
    assert back.shape == x.shape and torch.allclose(back[:, 1::2], y[:, info["unm_idx"].shape[1]:])
    out.append("[3] merge_wavg: sum(size*x), sum(size) preserved; output = size-weighted group means; order "
               "[unmerged A ascending (CLS first), all B]; unmerge restores length")

    # 4. proportional attention == attention over the expanded (duplicated) tokens
    attn = tower.encoder.layers[0].self_attn if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[0].self_attn
    base = torch.randn(1, 6, tower.config.hidden_size, dtype=torch.float64)
    counts = torch.tensor([1, 3, 2, 1, 4, 2])
    expanded = base.repeat_interleave(counts, dim=1)
    full, _ = proportional_attention(attn, expanded, None)
    first = torch.cumsum(counts, 0) - counts
    comp, _ = proportional_attention(attn, base, counts.double().view(1, 6, 1))
    err = (full[:, first] - comp).abs().max().item()
    assert err < 1e-12, err
    out.append(f"[4] proportional attention (log size) == plain attention over duplicated tokens: {err:.3e}")

    # 5. schedules: halving bound and an exact target on a deeper tower (576 patches like LLaVA-1.5's CLIP-L/336)
    sched = schedule_for_target(576, 64, 23)
    assert sum(sched) == 512 and all(v <= 288 for v in sched)
    try:
        schedule_for_target(144, 36, 1)
        raise AssertionError("should be unreachable")
    except ValueError:
        pass
    assert schedule_for_target(144, 36, 2) == [72, 36]
    out.append(f"[5] parse_r(24, 16) = {parse_r(24, 16)[:3]}..; parse_r(24,(16,-1)) = "
               f"{parse_r(24, (16, -1))[:3]}..{parse_r(24, (16, -1))[-2:]}; 576->64 over 23 layers: {sched}; "
               f"144->36 needs >= 2 rounds (tiny tower has 1 before layer -2)")

    deep = _tiny_llava(layers=4)
    dt = deep.model.vision_tower
    with torch.no_grad():
        ref = dt(px, output_hidden_states=True).hidden_states
    res = tome_reference_vit_forward(dt, px, r=[72, 36, 0, 0])
    t = [h.shape[1] for h in res["hidden_states"]]
    assert t == [145, 73, 37, 37, 37], t
    res0 = tome_reference_vit_forward(dt, px, r=[0, 0, 0, 0])
    err = max((a - b).abs().max().item() for a, b in zip(ref, res0["hidden_states"]))
    assert err < 1e-12
    out.append(f"[6] 4-layer tower: r=[72,36,0,0] gives tokens {t} (36 patches + CLS at hidden_states[-2]); "
               f"r=0 vs HF {err:.3e}")
    print("\n".join(out))
    print("tome_ref self-check: OK")


if __name__ == "__main__":
    _self_check()
