"""Reference prefill of the OFFICIAL PyramidDrop algorithm (Cooperx521/PyramidDrop,
llava/model/modeling_llama_pdrop.py: pdrop_forward + pdrop_rank_drop) for an HF LlavaForConditionalGeneration
(Llama text model, transformers 5.x), batch 1, written from a reading of that code (not copied).

Per stage boundary rank_layer = layer_list[s] (after layers 0..rank_layer-1 have run):
  * h = output of layer rank_layer-1; ranking uses layer `rank_layer`'s input_layernorm, q_proj, k_proj (the NEXT
    layer), RoPE at the CURRENT (already renumbered) positions, causal softmax over ALL keys of the query row,
    mean over heads, then the visual-key columns; with several queries (training) the mean over queries;
  * query (inference): the last token of the current sequence; (training, `labels` given): every token t with
    labels[t+1] != -100 and labels[t] == -100, i.e. the token before each answer span of a multi-turn record;
  * keep int(N * ratio_list[s]) visual tokens (N = ORIGINAL visual count, int() truncates, may be 0), topk then
    sorted ascending (original order kept); text tokens all kept;
  * positions are renumbered 0..L'-1 and the mask is the plain causal mask of the shorter sequence.
The official q.k^T does no repeat_kv (it only works for num_kv_heads == num_heads, e.g. Vicuna); here GQA keys are
repeated as the attention layer itself does, which is identical when there is no GQA.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def _causal_mask(n: int, dtype, device) -> torch.Tensor:
    """Additive (1, 1, n, n) causal mask."""
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def _ratio_list(ratio, n_stages: int) -> list[float]:
    """A float lambda gives the paper's geometric schedule [lambda, lambda^2, ...]; a list is used as given
    (the official --image_token_ratio_list, ratios of the ORIGINAL visual count, 1.0 prepended internally)."""
    if isinstance(ratio, (int, float)):
        return [float(ratio) ** (s + 1) for s in range(n_stages)]
    assert len(ratio) == n_stages, "one ratio per entry of layer_list"
    return [float(r) for r in ratio]


def _visual_scores(layer, h, positions, rotary, queries, vis_start, n_vis) -> torch.Tensor:
    """Mean (over heads, then over query rows) softmax attention of `queries` to the visual keys, computed with
    `layer`'s input norm and q/k projections applied to h (1, L, D)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)  # (1, H, L, d)
    k = attn.k_proj(x).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, L, d)
    cos, sin = rotary(h, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = q[0][:, queries] @ k[0].transpose(-1, -2) * attn.head_dim**-0.5  # (H, Q, L)
    scores = scores + _causal_mask(h.shape[1], h.dtype, h.device)[0, 0][queries]
    probs = scores.softmax(dim=-1)  # over all keys (text + visual), causal
    return probs.mean(dim=0)[:, vis_start : vis_start + n_vis].mean(dim=0)  # heads, then queries -> (n_vis,)


@torch.no_grad()
def pdrop_reference(model, input_ids, pixel_values, layer_list, ratio, image_token_index, labels=None):
    """Official-PyramidDrop prefill. Returns (last-token logits (V,), [kept visual indices per stage] as indices
    into the ORIGINAL visual-token run, ascending). `labels` (1, L) switches to the training query rule."""
    lm = model.model.language_model
    layers, rotary = lm.layers, lm.rotary_emb
    assert input_ids.shape[0] == 1, "batch 1"
    assert all(0 < l < len(layers) for l in layer_list), "official code indexes layers[rank_layer]"
    assert list(layer_list) == sorted(layer_list)
    ratios = _ratio_list(ratio, len(layer_list))

    # embeddings with the visual features scattered into the (contiguous) run of image tokens
    ids = input_ids[0]
    embeds = model.model.get_input_embeddings()(input_ids)
    feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    feats = torch.cat(list(feats), dim=0).to(embeds.dtype)
    is_img = ids == image_token_index
    vis_start, n_orig = int(is_img.nonzero()[0]), int(is_img.sum())
    assert bool(is_img[vis_start : vis_start + n_orig].all()), "one contiguous visual run"
    embeds[0, is_img] = feats
    h = embeds
    lab = None if labels is None else labels[0].clone()

    orig_index = torch.arange(n_orig, device=h.device)  # current visual run -> original visual index
    n_vis, kept, start = n_orig, [], 0
    for s, rank_layer in enumerate(list(layer_list) + [len(layers)]):
        positions = torch.arange(h.shape[1], device=h.device)[None]  # renumbered after every drop
        mask = _causal_mask(h.shape[1], h.dtype, h.device)
        pos_emb = rotary(h, positions)
        for layer in layers[start:rank_layer]:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)
        start = rank_layer
        if rank_layer == len(layers):
            break
        # ---- rank & drop at the end of stage s (official: after layer rank_layer-1) ----
        keep_n = int(n_orig * ratios[s])  # int(), from the ORIGINAL count
        if lab is None:
            queries = torch.tensor([h.shape[1] - 1], device=h.device)  # last instruction token
        else:
            ans = ((lab[1:] != -100) & (lab[:-1] == -100)).nonzero()[:, 0]  # t with labels[t+1] an answer start
            queries = ans
        if len(queries) == 0:  # official: no answer start -> the record keeps everything
            kept.append(orig_index.clone())
            continue
        score = _visual_scores(layers[rank_layer], h, positions, rotary, queries, vis_start, n_vis)
        top = score.topk(keep_n).indices.sort().values
        keep = torch.cat([torch.arange(vis_start, device=h.device), vis_start + top,
                          torch.arange(vis_start + n_vis, h.shape[1], device=h.device)])
        h = h[:, keep]
        if lab is not None:
            lab = lab[keep]
        orig_index, n_vis = orig_index[top], keep_n
        kept.append(orig_index.clone())

    logits = model.lm_head(lm.norm(h))[0, -1]
    return logits, kept


if __name__ == "__main__":
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    # the skipvision 'tiny' preset's geometry: 168 px / 14 -> 144 visual tokens; 4-layer 256-wide Llama, GQA 8/4
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
    logits, kept = pdrop_reference(model, input_ids, pixel_values, [1, 2, 3], 1.0, image_token)
    diff = (logits - ref).abs().max().item()
    print(f"ratio=1.0 vs plain HF forward: max |dlogits| = {diff:.3e}; kept per stage = {[len(k) for k in kept]}")
    assert diff < 1e-12 and all(len(k) == 144 for k in kept)

    logits, kept = pdrop_reference(model, input_ids, pixel_values, [1, 2, 3], 0.5, image_token)
    print(f"ratio=0.5: kept per stage = {[len(k) for k in kept]} (int(144*0.5**s)); "
          f"nested = {all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(kept, kept[1:]))}; "
          f"|logits - vanilla|max = {(logits - ref).abs().max().item():.3e}")
    # the official score at the first boundary is layer rank_layer's own attention map on the full sequence:
    # compare with HF eager output_attentions of layer 2 (last query row, mean over heads, visual columns)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True).attentions[2]
    model.set_attn_implementation("sdpa")
    hf_top = att[0, :, -1, 6:150].mean(0).topk(int(144 * 0.5)).indices.sort().values
    _, kept2 = pdrop_reference(model, input_ids, pixel_values, [2], 0.5, image_token)
    print(f"stage-0 ranking == top-k of HF eager attentions[2] (last row, head mean): {torch.equal(hf_top, kept2[0])}")
    assert torch.equal(hf_top, kept2[0])
    labels = torch.full_like(input_ids, -100)
    labels[0, 160:165] = 7  # one answer span -> query = token 159
    labels[0, 170:172] = 7  # a second turn's answer -> query = token 169
    _, kept_tr = pdrop_reference(model, input_ids, pixel_values, [2], 0.3, image_token, labels=labels)
    print(f"training rule (2 answer starts), lambda=0.3 at layer 2: kept {len(kept_tr[0])} = int(144*0.3)")
