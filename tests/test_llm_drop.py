"""In-LLM dropping (FastV, PyramidDrop): the scoring equals eager attention, a full budget is the vanilla model,
and prefill, training loss and cached decoding equal a hand-written loop that removes the dropped tokens between
layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair, prompts

import skipvision
from skipvision import flops as F
from skipvision import llm_drop
from skipvision.harness import measure
from skipvision.peers import fastv, pyramid_drop

LAYERS = 4
SPAN = 64  # visual tokens per image of the conftest tower


def _batch():
    return prompts([1, 2, 0], SPAN, [3, 1, 6], [2, 4, 3])


def test_last_query_attention_equals_eager_attention():
    vanilla, _ = pair(skipvision.vanilla_config(), num_layers=LAYERS, attn="eager")
    ids, mask, pixels = _batch()
    out = vanilla(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True, output_hidden_states=True
    )
    lm = vanilla.model.language_model
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    rope = lm.rotary_emb(out.hidden_states[0], positions)
    query, _ = llm_drop.query_indices(mask, None, ids.shape)
    assert query.tolist() == [[ids.shape[1] - 1]] * 3
    for layer_idx in (0, 2):
        hidden = out.hidden_states[layer_idx]
        got = llm_drop.query_attention(lm.layers[layer_idx], hidden, rope, query, mask.bool())
        want = out.attentions[layer_idx][torch.arange(3), :, query[:, 0]].mean(1)
        assert (got - want).abs().max() <= 1e-6


def test_query_index_with_labels_is_the_last_instruction_token():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100] * 6])
    assert llm_drop.query_indices(mask, labels, mask.shape)[0].tolist() == [[2], [3]]
    # PyramidDrop's training rule: the token before every answer span (one per turn)
    labels = torch.tensor([[-100, 7, -100, -100, 8, 8], [-100] * 6])
    index, valid = llm_drop.query_indices(mask, labels, mask.shape, every_answer=True)
    assert [row[v].tolist() for row, v in zip(index, valid)] == [[0, 3], [3]]


def test_full_budget_is_the_vanilla_model():
    vanilla, model = pair(fastv(1.0, layer=1), num_layers=LAYERS)
    ids, mask, pixels = _batch()
    ref = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (out - ref)[mask.bool()].abs().max() <= 1e-5


def _reference_logits(vanilla, ids, mask, pixels, schedule, query, extra=None):
    """Per sample, unpadded: run the layers by hand, removing the dropped visual tokens between layers (ranked by
    eager attention of the query token). ``extra``: tokens appended after the prompt (decoding), which see only
    what the prompt's last layers kept. Returns per-sample logits over (prompt + extra) kept positions' rows."""
    lm = vanilla.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda _m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    hook.remove()
    embeds = captured["inputs_embeds"]
    results = []
    for b in range(ids.shape[0]):
        valid = mask[b].bool()
        h = embeds[b, valid][None]
        visual = ids[b, valid] == IMAGE_TOKEN_ID
        q = int(query[b]) - int((~valid).sum())
        if extra is not None:
            h = torch.cat([h, lm.embed_tokens(extra[b])[None]], 1)
            visual = torch.cat([visual, torch.zeros(extra.shape[1], dtype=torch.bool)])
        keep = torch.arange(h.shape[1])
        n_visual = int(visual.sum())
        rope_all = lm.rotary_emb(h, keep[None])
        stages = dict(schedule)
        for layer_idx, layer in enumerate(lm.layers):
            rope = tuple(t[:, keep] for t in rope_all)
            x = h
            h = layer(h, attention_mask=None, position_embeddings=rope)
            if layer_idx in stages:
                # eager attention of the query token in this layer
                qi = int((keep == q).nonzero())
                scores = llm_drop.query_attention(layer, x, rope, torch.tensor([[qi]]))[0]
                vis = visual[keep]
                k = llm_drop.kept_count(n_visual, stages[layer_idx])
                top = scores.masked_fill(~vis, -1).topk(k).indices
                stay = ~vis
                stay[top] = True
                h, keep = h[:, stay], keep[stay]
        results.append((keep, vanilla.lm_head(lm.norm(h))[0]))
    return results


@pytest.mark.parametrize("peer", ["fastv", "pyramid"])
def test_prefill_and_loss_equal_the_hand_loop(peer):
    # the mechanism under FastV's rule, over one drop and over a multi-stage schedule (the official PyramidDrop rule
    # is checked against its own reference in tests/peers/test_pyramid_drop.py)
    cfg = (
        fastv(0.25, layer=2) if peer == "fastv" else replace(pyramid_drop(0.5, LAYERS, stages=4), llm_drop_rule="fastv")
    )
    vanilla, model = pair(cfg, num_layers=LAYERS)
    vanilla.double(), model.double()
    ids, mask, pixels = _batch()
    pixels = pixels.double()
    query = llm_drop.query_indices(mask, None, ids.shape)[0][:, 0]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        ref = _reference_logits(vanilla, ids, mask, pixels, cfg.llm_drop, query)
    for b, (keep, logits) in enumerate(ref):
        assert (out.logits[b, -1] - logits[-1]).abs().max() <= 1e-6
        pad = int((mask[b] == 0).sum())
        # every kept position's logits, too (text and kept visual tokens alike)
        assert (out.logits[b, pad + keep] - logits).abs().max() <= 1e-6
    # the cache of each layer holds exactly the tokens it saw
    cache = out.past_key_values
    counts = [int(cache.layers[i].keys.shape[2]) for i in range(LAYERS)]
    visual = int((ids == IMAGE_TOKEN_ID).sum(1).max())
    widest = [len(k) for k, _ in ref]
    assert counts[0] == ids.shape[1] and counts[-1] == max(widest) and counts[-1] < ids.shape[1] - visual // 2
    # training: the loss (labels on the text after the images) equals the hand loop's, and gradients flow
    labels = torch.where(ids == IMAGE_TOKEN_ID, -100, ids).masked_fill(mask == 0, -100)
    labels[:, :-3] = -100
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    tq = llm_drop.query_indices(mask, labels, ids.shape)[0][:, 0]
    with torch.no_grad():
        ref = _reference_logits(vanilla, ids, mask, pixels, cfg.llm_drop, tq)
    total, count = 0.0, 0
    for b, (keep, logits) in enumerate(ref):
        pad = int((mask[b] == 0).sum())
        for pos in range(ids.shape[1] - 4, ids.shape[1] - 1):
            row = int((keep == pos - pad).nonzero())
            total += torch.nn.functional.cross_entropy(logits[row], ids[b, pos + 1], reduction="sum")
            count += 1
    assert abs(loss.item() - float(total) / count) <= 1e-6


def test_cached_greedy_decoding_equals_the_hand_loop():
    # the hand loop ranks as FastV does, over PyramidDrop's stages (its own rule: tests/peers/test_pyramid_drop.py)
    cfg = replace(pyramid_drop(0.5, LAYERS, stages=4), llm_drop_rule="fastv")
    vanilla, model = pair(cfg, num_layers=LAYERS)
    vanilla.double(), model.double()
    ids, mask, pixels = _batch()
    pixels = pixels.double()
    new = 4
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        min_new_tokens=new,
    )
    generated = out.sequences[:, ids.shape[1] :]
    query = llm_drop.query_indices(mask, None, ids.shape)[0][:, 0]
    with torch.no_grad():
        ref = _reference_logits(vanilla, ids, mask, pixels, cfg.llm_drop, query, extra=generated)
    for b, (_, logits) in enumerate(ref):
        for t in range(new):
            # the row predicting generated token t: the prompt's last token (t = 0) or generated token t - 1
            assert (out.logits[t][b] - logits[-new - 1 + t]).abs().max() <= 1e-6


def test_flops_match_flop_counter():
    cfg = pyramid_drop(0.5, LAYERS, stages=4)
    _, model = pair(cfg, num_layers=LAYERS)
    ids, mask, pixels = prompts([1], SPAN, [3], [5])
    total, _ = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels))
    shape = skipvision.family_of(model).model_shape(model.config)
    text = int((ids[0] != IMAGE_TOKEN_ID).sum())
    counts = F.sequence_counts(shape, text, 1, cfg)
    lm = F.language_flops(shape, counts, logits=ids.shape[1], causal=False, llm_drop=cfg.llm_drop)
    vision = sum(F.vision_flops(shape, 1).values())
    assert abs((sum(lm.values()) + vision) / total - 1) <= 0.01
    assert sum(F.language_flops(shape, counts, llm_drop=cfg.llm_drop).values()) < sum(
        F.language_flops(shape, counts).values()
    )


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="increasing layers"):
        skipvision.SkipVisionConfig(
            None, 0, merge="none", summary_tokens=False, skip_kv_cache=False, llm_drop=((2, 0.5), (1, 0.25))
        )
    with pytest.raises(ValueError, match="cannot be combined"):
        skipvision.SkipVisionConfig(4, 2, llm_drop=((1, 0.5),))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        fastv(1.5)
    vanilla, _ = pair(skipvision.vanilla_config(), num_layers=LAYERS)
    with pytest.raises(ValueError, match="leaves no later layer"):
        skipvision.convert(vanilla, fastv(0.5, layer=LAYERS))
    _, model = pair(fastv(0.5, layer=1), num_layers=LAYERS)
    ids, mask, pixels = _batch()
    with pytest.raises(NotImplementedError, match="dynamic cache"):
        model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2, cache_implementation="static"
        )
    one = prompts([1], SPAN, [3], [2])
    cache = model(input_ids=one[0], pixel_values=one[2], use_cache=True).past_key_values
    with pytest.raises(NotImplementedError, match="empty cache"):
        model(input_ids=one[0], pixel_values=one[2], past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="assisted"):
        model.generate(input_ids=one[0], pixel_values=one[2], max_new_tokens=3, prompt_lookup_num_tokens=2)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-next"])
def test_other_families_full_budget_is_vanilla_and_caches_shrink(family):
    """M-RoPE (Qwen2.5-VL) and anyres images (LLaVA-NeXT) on a left-padded batch: a full budget is vanilla (prefill
    logits and greedy tokens), and a dropping model's later cache layers hold each sample's kept tokens only."""
    from families import batch as family_batch
    from families import pair as family_pair

    vanilla, full = family_pair(family, fastv(1.0, layer=1))
    samples = [(1, " what is it"), (2, " and these two?")]
    inputs = family_batch(family, skipvision.vanilla_config(), samples, vanilla.config)
    mask = inputs["attention_mask"].bool()
    assert (full(**inputs).logits - vanilla(**inputs).logits)[mask].abs().max() <= 1e-4
    kwargs = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert full.generate(**inputs, **kwargs).tolist() == vanilla.generate(**inputs, **kwargs).tolist()
    layers = len(skipvision.family_of(full).decoder_layers(full))
    # M-RoPE positions have no renumbering rule in the official code: Qwen-VL takes the named true-positions departure
    positions = "true" if family.startswith("qwen") else "renumbered"
    cfg = pyramid_drop(0.5, layers, stages=layers, positions=positions)
    _, model = family_pair(family, cfg)
    out = model(**inputs, use_cache=True)
    visual = model.image_placeholder_mask(inputs["input_ids"]).sum(1)
    text = mask.sum(1) - visual
    cache = out.past_key_values
    for layer_idx, fraction in [(0, 1.0), (1, 0.5), (layers - 1, 0.5 ** (layers - 1))]:
        kept = [llm_drop.kept_count(int(v), fraction, cfg.llm_drop_rule) for v in visual]
        expected = inputs["input_ids"].shape[1] if layer_idx == 0 else max(int(t) + k for t, k in zip(text, kept))
        assert cache.layers[layer_idx].keys.shape[2] == expected
    assert model.generate(**inputs, **kwargs).shape[1] == inputs["input_ids"].shape[1] + 4


def test_beam_search_moves_the_bookkeeping():
    # the reference is the vanilla layout through the same mixin (HF's own LLaVA gives other prefill logits for the
    # beam-expanded two-image sample here; tests/test_hf_paths.py checks our beams against each sample alone)
    _, vanilla = pair(skipvision.vanilla_config(), num_layers=LAYERS, dtype=torch.float64)
    _, full = pair(fastv(1.0, layer=1), num_layers=LAYERS, dtype=torch.float64)
    ids, mask, pixels = _batch()
    pixels = pixels.double()
    kwargs = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    want = vanilla.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    got = full.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert got.tolist() == want.tolist()
    _, model = pair(pyramid_drop(0.5, LAYERS, stages=4), num_layers=LAYERS, dtype=torch.float64)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert out.shape == (6, ids.shape[1] + 4)
