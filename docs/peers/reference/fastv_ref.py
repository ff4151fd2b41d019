"""Reference prefill of OFFICIAL FastV (pkunlp-icler/FastV), llava-hf KV-cache variant semantics
(src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py, LlamaModel.fastv_forward), for an
HF LlavaForConditionalGeneration (Llama text model, transformers 5.x), batch 1; written from a reading of that code.

  * layers 0..K-1 run on the full sequence; the score is layer K-1's OWN attention map (its output_attentions:
    input_layernorm + q/k of layer K-1 applied to layer K-1's INPUT, RoPE at true positions, causal softmax),
    row of the LAST token of the sequence, mean over heads, columns of the visual run;
  * keep round(N * (1 - R)) visual tokens (Python round), topk then sorted ascending (order kept);
  * before layer K: hidden states gathered to the kept indices, position_ids = the kept ORIGINAL indices (true
    positions, gaps where tokens were dropped), mask = plain causal mask over the shorter sequence;
  * with a KV cache (decoding) no further drop: layers >= K cache only the kept tokens, new tokens get true
    positions L, L+1, ... (the in-place variant has no cache and re-ranks on every forward).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def _causal_mask(n: int, dtype, device) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


@torch.no_grad()
def fastv_reference(model, input_ids, pixel_values, K, R, image_token_index):
    """FastV prefill (K >= 1: prune after K layers; R: fraction of visual tokens dropped, keep ratio 1-R).
    Returns (last-token logits (V,), kept visual indices into the original visual run, ascending)."""
    lm = model.model.language_model
    layers, rotary = lm.layers, lm.rotary_emb
    assert input_ids.shape[0] == 1 and 1 <= K < len(layers)

    ids = input_ids[0]
    embeds = model.model.get_input_embeddings()(input_ids)
    feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    is_img = ids == image_token_index
    vis_start, n_vis = int(is_img.nonzero()[0]), int(is_img.sum())
    embeds[0, is_img] = torch.cat(list(feats), dim=0).to(embeds.dtype)
    h = embeds

    positions = torch.arange(h.shape[1], device=h.device)[None]
    mask, pos_emb = _causal_mask(h.shape[1], h.dtype, h.device), rotary(h, positions)
    for layer in layers[: K - 1]:
        h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)

    # layer K-1's attention probabilities (what output_attentions returns), last query row
    last = layers[K - 1]
    attn = last.self_attn
    x = last.input_layernorm(h)
    q = attn.q_proj(x).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = pos_emb
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    probs = (q[0, :, -1:] @ k[0].transpose(-1, -2) * attn.head_dim**-0.5).softmax(-1)  # (H, 1, L), row L-1 sees all
    score = probs.mean(0)[0, vis_start : vis_start + n_vis]
    h = last(h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)

    keep_n = round(n_vis * (1 - R))
    top = score.topk(keep_n).indices.sort().values
    keep = torch.cat([torch.arange(vis_start, device=h.device), vis_start + top,
                      torch.arange(vis_start + n_vis, h.shape[1], device=h.device)])
    h, positions = h[:, keep], keep[None]  # TRUE positions kept
    mask, pos_emb = _causal_mask(h.shape[1], h.dtype, h.device), rotary(h, positions)
    for layer in layers[K:]:
        h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)
    return model.lm_head(lm.norm(h))[0, -1], top


if __name__ == "__main__":
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    image_token = 4
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=168, patch_size=14),
        text_config=LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
        image_token_id=image_token, image_seq_length=144,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).to(torch.float64).eval()
    prompt = torch.randint(5, 512, (1, 30))
    input_ids = torch.cat([prompt[:, :6], torch.full((1, 144), image_token), prompt[:, 6:]], dim=1)
    pixel_values = torch.randn(1, 3, 168, 168, dtype=torch.float64)
    with torch.no_grad():
        ref = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]

    logits, kept = fastv_reference(model, input_ids, pixel_values, 2, 0.0, image_token)
    diff = (logits - ref).abs().max().item()
    print(f"R=0 vs plain HF forward: max |dlogits| = {diff:.3e}, kept {len(kept)}")
    assert diff < 1e-12 and len(kept) == 144

    # ranking == top-k of HF eager output_attentions of layer K-1 (last row, head mean, visual columns)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True).attentions[1]
    model.set_attn_implementation("sdpa")
    hf_top = att[0, :, -1, 6:150].mean(0).topk(round(144 * 0.25)).indices.sort().values
    logits, kept = fastv_reference(model, input_ids, pixel_values, 2, 0.75, image_token)
    print(f"K=2, R=0.75: kept {len(kept)} = round(144*0.25); == HF eager attentions[1] top-k: {torch.equal(hf_top, kept)}")
    assert torch.equal(hf_top, kept)

    # the dropped tokens are exactly invisible from layer K on: same logits as a full-length run whose layers >= K
    # mask the dropped visual keys (FastV's attention-mask variant, true positions everywhere)
    dropped = torch.ones(144, dtype=torch.bool)
    dropped[kept] = False
    lm = model.model.language_model
    with torch.no_grad():
        h = model.model.get_input_embeddings()(input_ids)
        h[0, input_ids[0] == image_token] = torch.cat(list(model.model.get_image_features(
            pixel_values=pixel_values, return_dict=True).pooler_output)).to(h.dtype)
        pos = torch.arange(h.shape[1])[None]
        pe, m = lm.rotary_emb(h, pos), _causal_mask(h.shape[1], h.dtype, "cpu")
        m2 = m.clone()
        m2[..., 6:150][..., dropped] = torch.finfo(h.dtype).min
        for i, layer in enumerate(lm.layers):
            h = layer(h, attention_mask=m if i < 2 else m2, position_ids=pos, position_embeddings=pe)
        masked = model.lm_head(lm.norm(h))[0, -1]
    print(f"in-place drop vs key-mask variant: max |dlogits| = {(logits - masked).abs().max().item():.3e}")
