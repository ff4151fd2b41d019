"""SparseVLM (peers/sparsevlm.py, ``llm_drop_rule="sparsevlm"``) against a reference written from the official code's
math (Gumpest/SparseVLMs v1.5, main @ 26a5f48 with ``USE_VERSION`` unset; docs/peers/sparsevlm.md):
``modelling_sparse_llama.py`` picks the text raters from the input embeddings (:198-204), runs each pruning layer
on the current sequence, scores the visual tokens by the raters' rows of its attention probabilities (head mean,
rater mean; ``score.py:23-42``), keeps the top ``min(count, v_num - 1)`` in order, recycles the best-scored 30 % of
the dropped ones of the layer's *output* into DPC-KNN clusters (``utils.py:179-239``) placed after the kept visual
tokens (:277-305), renumbers the positions (:302), and decodes each layer at its own cache length (:653-655).
The reference runs the HF layers by hand in fp64, at batch 1, on the conftest LLaVA (64 visual tokens)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair, prompts
from peer_checks import one_image_prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from skipvision import llm_drop
from skipvision.drop_schedule import visual_per_layer
from skipvision.peers import sparsevlm

LAYERS = 8
SPAN = 64
#: score.py:11-14 (v1.5): visual tokens kept after layers 2 / 6 / 15 of 32, of 576, per RETAIN_TOKN
OFFICIAL = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


# --- the reference -----------------------------------------------------------------------------------------------
def _causal(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _attention_probabilities(layer, h, rope) -> torch.Tensor:
    """(H, L, L): softmax(QK^T / sqrt(d) + causal) of ``layer`` on its input ``h``, as the official SDPA subclass
    recomputes them (modelling_sparse_llama.py:686-696, utils.py:95-116)."""
    attn, n = layer.self_attn, h.shape[1]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    k = repeat_kv(k, attn.num_key_value_groups)
    return (q @ k.transpose(2, 3) / attn.head_dim**0.5 + _causal(n, h.dtype)).softmax(-1)[0]


def cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """utils.py:179-239 for one sample, without the density noise (deterministic)."""
    n, c = x.shape
    dist_matrix = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / c**0.5
    dist_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).to(x.dtype)
    dist = (dist_matrix * mask + dist_matrix.max() * (1 - mask)).min(dim=-1).values
    index_down = torch.topk(dist * density, k=cluster_num).indices
    idx_cluster = dist_matrix[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    all_weight = x.new_zeros(cluster_num, 1).index_add_(0, idx_cluster, x.new_ones(n, 1)) + 1e-6
    norm_weight = x.new_ones(n, 1) / all_weight[idx_cluster]
    return x.new_zeros(cluster_num, c).index_add_(0, idx_cluster, x * norm_weight)


def official_sparsevlm(vanilla, ids, pixels, layers, counts, fixed=None):
    """``(logits (L', V), stages, lengths)`` of the official prefill: per pruning layer the new sequence's index
    (full coordinates, -1 for a recycled token), the recycled tokens and the selection; each layer's input length
    (what its cache holds). ``fixed``: the stages of a prefill whose selections are reused, as cached decoding
    continues it (the appended tokens are text after the image, which is never dropped)."""
    lm = vanilla.model.language_model
    h = vanilla.get_input_embeddings()(ids)
    feats = vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
    is_image = ids[0] == IMAGE_TOKEN_ID
    h = h.masked_scatter(is_image[None, :, None], feats.to(h.dtype))
    v_start, v_num = int(is_image.nonzero()[0]), int(is_image.sum())
    t_start = v_start + v_num
    # text raters (modelling_sparse_llama.py:198-204), relative to the text start
    m_v_t = (h[0, v_start:t_start] @ h[0, t_start:].T).softmax(-1).mean(0)
    raters = torch.where(m_v_t > m_v_t.mean())[0]
    index, stages, lengths = torch.arange(h.shape[1]), [], []
    for layer_idx, layer in enumerate(lm.layers):
        positions = torch.arange(h.shape[1])[None]  # position_ids[:, :L'] of a prefill: 0 .. L'-1
        rope = lm.rotary_emb(h, positions)
        lengths.append(h.shape[1])
        out = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_ids=positions, position_embeddings=rope)
        if layer_idx not in layers:
            h = out
            continue
        s = layers.index(layer_idx)
        if fixed is None:
            attn = _attention_probabilities(layer, h, rope).mean(0)
            scores = attn[raters + t_start][:, v_start:t_start].mean(0)
            keep = torch.zeros(v_num, dtype=torch.bool)
            keep[torch.topk(scores, min(counts[s], v_num - 1)).indices] = True
            top = scores[~keep].topk(int(int((~keep).sum()) * 0.3) + 1).indices
        else:
            keep, top = fixed[s]["keep"], fixed[s]["top"]
        vis = out[0, v_start:t_start]
        merged = cluster_and_merge(vis[~keep][top], int(top.numel() / 10) + 1)
        h = torch.cat([out[:, :v_start], vis[keep][None], merged[None], out[:, t_start:]], dim=1)
        v_index = index[v_start:t_start]
        index = torch.cat([index[:v_start], v_index[keep], torch.full((len(merged),), -1), index[t_start:]])
        slots = torch.arange(len(merged)) + v_start + int(keep.sum())  # right after the kept visual tokens
        v_num = int(keep.sum()) + len(merged)
        t_start = v_start + v_num
        stages.append({"index": index.clone(), "recycled": merged, "slots": slots, "keep": keep, "top": top})
    return vanilla.lm_head(lm.norm(h))[0], stages, lengths


# --- the checks --------------------------------------------------------------------------------------------------
def _capture(model):
    """Hooks recording the prefill's DropPlan and each decoder layer's input hidden states."""
    layers = model.skip_vision_family.decoder_layers(model)
    seen = {"inputs": {}}

    def hook(module, args, kwargs, i):
        if llm_drop.DROP_PLAN_KWARG in kwargs:
            seen["plan"] = kwargs[llm_drop.DROP_PLAN_KWARG]
            seen["inputs"][i] = args[0] if args else kwargs["hidden_states"]

    return [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ], seen


@pytest.mark.parametrize(("tokens", "attn"), [(64, "sdpa"), (192, "sdpa"), (64, "eager")])
def test_sparsevlm_equals_the_official_algorithm(tokens, attn):
    cfg = sparsevlm(tokens, LAYERS)  # the official setting's counts of 576, as fractions of the tower's 64
    assert cfg.llm_drop_rule == "sparsevlm"
    layers = [layer for layer, _ in cfg.llm_drop]
    assert layers == [0, 1, 3]  # 2, 6, 15 of 32 scaled to 8 layers (3, 7, 16 layers run before each pruning)
    counts = [round(k * SPAN / 576) for k in OFFICIAL[tokens]]
    vanilla, model = pair(cfg, dtype=torch.float64, num_layers=LAYERS, attn=attn)
    ids = one_image_prompt(SPAN, suffix=8)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hooks, seen = _capture(model)
    with torch.no_grad():
        reference, stages, lengths = official_sparsevlm(vanilla, ids, pixels, layers, counts)
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
    for hook in hooks:
        hook.remove()
    plan = seen["plan"]
    for s, (layer, stage) in enumerate(zip(layers, stages)):
        # the same kept tokens, in the same order, and the recycled ones in the same slots ...
        assert torch.equal(plan.index[layer + 1][0], stage["index"]), s
        assert int(stage["keep"].sum()) == min(counts[s], len(stage["keep"]) - 1)
        # ... the new ones holding the same aggregates (the next layer's input; a stage may keep earlier ones)
        assert torch.all(plan.index[layer + 1][0, stage["slots"]] == llm_drop.RECYCLED)
        recycled = seen["inputs"][layer + 1][0, stage["slots"]]
        assert (recycled - stage["recycled"]).abs().max() <= 1e-10
    assert (out.logits[0, -1] - reference[-1]).abs().max() <= 1e-10
    # each layer caches the sequence it ran on; the FLOPs model counts the same visual tokens
    assert [out.past_key_values.layers[i].keys.shape[2] for i in range(LAYERS)] == lengths
    text = ids.shape[1] - SPAN
    assert [n - text for n in lengths] == visual_per_layer(SPAN, cfg.llm_drop, LAYERS, cfg.llm_drop_rule)
    # cached decoding: each layer's new token at its own cache length, the prefill's selections kept
    new = 3
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new, do_sample=False)
    with torch.no_grad():
        continued, _, _ = official_sparsevlm(vanilla, generated[:, :-1], pixels, layers, counts, fixed=stages)
        assert torch.equal(continued[-new:].argmax(-1), generated[0, -new:])
        # the decode steps' fp64 logits (generate hands them out in fp32) over the prefill's cache
        cache = out.past_key_values
        tolerance = 1e-10 if attn == "sdpa" else 1e-6  # HF's eager attention takes its softmax in fp32
        for step in range(1, new):
            token = generated[:, ids.shape[1] + step - 1 : ids.shape[1] + step]
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
            assert (logits - continued[step - new]).abs().max() <= tolerance


def test_recycling_is_dpc_knn_of_the_best_scored_dropped():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(57, 16, generator=g, dtype=torch.float64)
    scores = torch.rand(57, generator=g, dtype=torch.float64)
    got = llm_drop.recycle(x, scores)
    top = scores.topk(int(57 * 0.3) + 1).indices  # 18 recycled -> 2 clusters
    assert got.shape == (2, 16)
    assert (got - cluster_and_merge(x[top], 2)).abs().max() <= 1e-12
    # three planted blobs come back as their means
    centers = torch.tensor([[8.0] * 16, [-8.0] * 16, [0.0] * 8 + [8.0] * 8], dtype=torch.float64)
    blobs = torch.cat([c + 0.1 * torch.randn(10, 16, generator=g, dtype=torch.float64) for c in centers])
    merged = llm_drop.dpc_knn_merge(blobs, 3)
    for i in range(3):
        mean = blobs[10 * i : 10 * (i + 1)].mean(0) * (10 / (10 + 1e-6))
        assert any(torch.allclose(row, mean, atol=1e-12) for row in merged)


def test_schedule_is_the_official_one():
    cfg = sparsevlm(64, 32)
    assert cfg.llm_drop == ((2, 66 / 576), (6, 30 / 576), (15, 17 / 576))
    # 576 -> 66 kept + 16 clusters -> 30 + 2 -> 17 + 1: the official "Equal Tokens" 64.8, 82.25 per layer processed
    per_layer = visual_per_layer(576, cfg.llm_drop, 32, "sparsevlm")
    assert per_layer == [576] * 3 + [82] * 4 + [32] * 9 + [18] * 16
    assert abs((sum(per_layer[1:]) + 18) / 32 - 64.8125) < 1e-12
    after = {96: [249, 55, 27], 128: [312, 117, 39], 192: [309, 204, 113]}
    for tokens, want in after.items():
        counts = visual_per_layer(576, sparsevlm(tokens, 32).llm_drop, 32, "sparsevlm")
        assert [counts[3], counts[7], counts[16]] == want
    # between official budgets: linear in the budget; below 64: the 64 row in proportion; other towers: same share
    assert [k * 576 for _, k in sparsevlm(160, 32).llm_drop] == pytest.approx([301.5, 155.0, 73.0])
    assert [k * 576 for _, k in sparsevlm(32, 32).llm_drop] == pytest.approx([33.0, 15.0, 8.5])
    assert sparsevlm(16, 32, visual=144).llm_drop == cfg.llm_drop
    assert [layer for layer, _ in sparsevlm(64, 40).llm_drop] == [3, 8, 19]
    assert [layer for layer, _ in sparsevlm(64, 4).llm_drop] == [0, 1, 2]
    for bad in ({"tokens": 0, "num_layers": 32}, {"tokens": 576, "num_layers": 32}, {"tokens": 64, "num_layers": 3}):
        with pytest.raises(ValueError):
            sparsevlm(**bad)


def test_what_the_official_code_does_not_run_is_refused():
    cfg = sparsevlm(64, LAYERS)
    _, model = pair(cfg, num_layers=LAYERS)
    ids = one_image_prompt(SPAN, suffix=8)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="training-free"):
        model(input_ids=ids, pixel_values=pixels, labels=ids)
    model.train()
    with pytest.raises(NotImplementedError, match="training-free"):
        model(input_ids=ids, pixel_values=pixels)
    model.eval()
    two, mask, two_pixels = prompts([1, 1], SPAN, [3, 3], [5, 5])
    with pytest.raises(NotImplementedError, match="batch 1"):
        model(input_ids=two, attention_mask=mask, pixel_values=two_pixels)
    padded = torch.cat([torch.zeros(1, 2, dtype=ids.dtype), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :2] = 0
    with pytest.raises(NotImplementedError, match="unpadded"):
        model(input_ids=padded, attention_mask=mask, pixel_values=pixels)
    both, _, both_pixels = prompts([2], SPAN, [3], [5])
    with pytest.raises(NotImplementedError, match="one image"):
        model(input_ids=both, pixel_values=both_pixels)
    with pytest.raises(ValueError, match="no text rater"):
        model(input_ids=one_image_prompt(SPAN, suffix=1), pixel_values=pixels)
