"""FasterVLM ([CLS] attention pruning before the projector) -- a pure-PyTorch reference written from the math of the
official code, github.com/Theia-4869/FasterVLM @ f5d5f12037e105a51865ecb4b28a73cd86eb4921 (see fastervlm.md).
Nothing is copied from that repository.

Official pieces it follows
  llava/model/multimodal_encoder/clip_encoder.py:35-47  feature_select: features = hidden_states[select_layer][:, 1:],
                                                         attn = attentions[select_layer][:, :, 0, 1:]  (CLS query row,
                                                         patch key columns; select_layer = -2 for LLaVA-1.5)
  llava/model/multimodal_encoder/clip_encoder.py:50-64  the tower runs with output_attentions=True
  llava/model/llava_arch.py:140-157                     encode_images: mean over heads, topk(visual_token_num), a boolean
                                                         index mask, projector over all N tokens
  llava/model/llava_arch.py:241-247                     single image: image_feature[index_mask] -> kept tokens in their
                                                         original raster order
  llava/model/llava_arch.py:168-240                     LLaVA-NeXT (anyres): the same top-T per crop (base image and
                                                         every crop), newline tokens always kept
  llava/model/language_model/llava_llama.py:44-62       visual_token_num comes straight from --visual-token-num

Public pieces
  fastervlm_scores(attentions)                            -> (B, N) CLS attention averaged over heads
  fastervlm_reference(image_features, attentions, keep)   -> (kept_features, kept_indices, index_mask)
  hf_clip_features_and_attentions(model, pixel_values)    -> what the official tower returns, from an HF CLIPVisionModel

Run ``python fastervlm_ref.py`` for the self-check.
"""

from __future__ import annotations

import torch


def fastervlm_scores(attentions: torch.Tensor) -> torch.Tensor:
    """The FasterVLM importance of each patch token: the [CLS] query's attention, averaged over heads.

    ``attentions`` is either one layer's full attention probabilities ``(B, H, N+1, N+1)`` (CLS at index 0, as HF CLIP
    returns them with ``output_attentions=True``) or already the CLS rows ``(B, H, N)`` over the patch keys.
    The official code takes ``attentions[:, :, 0, 1:]`` (clip_encoder.py:41) -- softmax rows over all N+1 keys, the
    CLS->CLS column dropped, *not* renormalised -- and ``.mean(dim=1)`` over heads (llava_arch.py:148).
    Returns ``(B, N)``.
    """
    if attentions.dim() == 4:
        attentions = attentions[:, :, 0, 1:]
    if attentions.dim() != 3:
        raise ValueError(f"expected (B, H, N+1, N+1) or (B, H, N), got {tuple(attentions.shape)}")
    return attentions.mean(dim=1)


def fastervlm_reference(
    image_features: torch.Tensor, attentions: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FasterVLM token pruning (llava_arch.py:140-157 and 241-247).

    image_features: ``(B, N, C)`` patch features of the feature layer (``hidden_states[-2][:, 1:]`` for LLaVA-1.5),
        before or after the projector -- the projector acts token by token, so selecting before it (cheaper) or
        after it (what the official code does: projector over all N, then ``feature[index_mask]``) is the same.
    attentions: the same layer's attention, ``(B, H, N+1, N+1)`` or ``(B, H, N)`` (see ``fastervlm_scores``).
    keep: T, the number of visual tokens kept per image (e.g. 64; the paper's 90 % setting is 58).

    Returns ``(kept_features (B, T, C), kept_indices (B, T) ascending, index_mask (B, N) bool)``. Kept tokens keep
    their original raster order (boolean-mask indexing), and the LLM gives them consecutive positions like any other
    sequence of image tokens. Ties in the scores are broken by ``torch.topk`` (implementation-defined).
    """
    B, N, C = image_features.shape
    scores = fastervlm_scores(attentions)
    if scores.shape != (B, N):
        raise ValueError(f"scores {tuple(scores.shape)} do not match features {(B, N)}")
    if not 0 < keep <= N:
        raise ValueError(f"keep must be in 1..{N}, got {keep}")
    top = torch.topk(scores, k=keep, dim=1).indices  # (B, T)
    index_mask = torch.zeros(B, N, dtype=torch.bool, device=image_features.device)
    index_mask.scatter_(1, top, True)
    kept_indices = torch.sort(top, dim=1).values  # what boolean-mask indexing yields
    kept_features = image_features[index_mask].view(B, keep, C)
    return kept_features, kept_indices, index_mask


def hf_clip_features_and_attentions(model, pixel_values: torch.Tensor, select_layer: int = -2):
    """What FasterVLM's tower returns, from an HF ``CLIPVisionModel`` (transformers 4.x or 5.x).

    The attention probabilities come from ``output_attentions=True``; HF only returns them from the eager attention,
    so load the tower with ``attn_implementation="eager"`` (with SDPA/flash they come back as ``None``).
    ``attentions[select_layer]`` is the attention *inside* the layer whose output is ``hidden_states[select_layer]``
    (hidden_states has one more entry than attentions: the embeddings), i.e. for -2 the penultimate layer (index 22
    of 24 in CLIP ViT-L/14-336). Returns ``(features (B, N, C), attentions (B, H, N+1, N+1))``.
    """
    out = model(pixel_values, output_attentions=True, output_hidden_states=True)
    if out.attentions is None or out.attentions[select_layer] is None:
        raise RuntimeError("no attention probabilities: load the tower with attn_implementation='eager'")
    return out.hidden_states[select_layer][:, 1:], out.attentions[select_layer]


# ----------------------------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------------------------


def _self_check() -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    B, H, N, C = 2, 16, 576, 1024
    logits = torch.randn(B, H, N + 1, N + 1, generator=g)
    attn = logits.softmax(-1)
    feats = torch.randn(B, N, C, generator=g)

    # [1] shapes and counts for the LLaVA-1.5 settings (README: 288/144/64/58/29 tokens)
    for keep in (288, 144, 64, 58, 29):
        kf, ki, mask = fastervlm_reference(feats, attn, keep)
        assert kf.shape == (B, keep, C) and ki.shape == (B, keep) and int(mask.sum()) == B * keep
        assert torch.all(ki[:, 1:] > ki[:, :-1]), "kept indices must be strictly ascending (raster order)"
    lines.append("[1] keep in (288,144,64,58,29): shapes (B,T,C), masks sum to B*T, indices ascending: ok")

    # [2] the kept set is exactly the T largest head-averaged CLS attentions; equals features[mask]
    kf, ki, mask = fastervlm_reference(feats, attn, 64)
    s = attn[:, :, 0, 1:].mean(1)
    for b in range(B):
        thr = s[b].sort(descending=True).values[63]
        assert torch.equal(mask[b], s[b] >= thr)
        assert torch.equal(kf[b], feats[b, ki[b]])
    lines.append("[2] kept set == 64 largest mean-over-heads CLS->patch attentions; features gathered in order: ok")

    # [3] (B,H,N) input == (B,H,N+1,N+1) input; determinism
    kf2, ki2, _ = fastervlm_reference(feats, attn[:, :, 0, 1:], 64)
    kf3, ki3, _ = fastervlm_reference(feats, attn, 64)
    assert torch.equal(ki, ki2) and torch.equal(ki, ki3) and torch.equal(kf, kf3)
    lines.append("[3] CLS-row input == full-matrix input; two runs identical: ok")

    # [4] selection commutes with a token-wise projector (official: project all, then mask)
    proj = torch.nn.Sequential(torch.nn.Linear(C, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    with torch.no_grad():
        a = proj(feats)[mask].view(B, 64, 32)
        b_ = proj(kf)
    assert torch.allclose(a, b_, atol=1e-6)
    lines.append("[4] project-then-mask == mask-then-project: ok")

    # [5] with an HF CLIPVisionModel (random, small width, LLaVA-1.5 geometry 336/14 -> 576 patches, eager attention)
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               image_size=336, patch_size=14, projection_dim=32)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        tower = CLIPVisionModel(cfg).eval()
        px = torch.randn(1, 3, 336, 336, generator=g)
        with torch.no_grad():
            f, at = hf_clip_features_and_attentions(tower, px)
        kf, ki, mask = fastervlm_reference(f, at, 64)
        assert f.shape == (1, 576, 64) and at.shape == (1, 4, 577, 577) and kf.shape == (1, 64, 64)
        assert torch.allclose(at.sum(-1), torch.ones(()), atol=1e-5)
        lines.append(f"[5] HF CLIPVisionModel (eager, 576 patches): features {tuple(f.shape)}, attentions "
                     f"{tuple(at.shape)} (layer -2), kept {tuple(kf.shape)}, first kept indices {ki[0, :6].tolist()}: ok")
    except ImportError as e:  # pragma: no cover
        lines.append(f"[5] skipped (transformers not importable: {e})")
    return lines


if __name__ == "__main__":
    for line in _self_check():
        print(line)
    print("fastervlm_ref self-check: all ok")
