"""Every HF calling path a user reaches for gives what plain decoding under Skip KV-cache semantics gives.

Assisted and prompt-lookup decoding, ``inputs_embeds`` with images, static caches, compiled decode steps,
multi-turn continuation from a pruned cache, beam search on a left-padded batch, eager vs SDPA, Auto classes,
list-valued feature layers. Tiny random LLaVA models in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS_ID, IMAGE_TOKEN_ID, VOCAB, llava_config, pair, prompts
from test_skip_kv import CFG, masked_full_forward
from transformers import AutoModelForImageTextToText, CompileConfig, LlavaForConditionalGeneration, StaticCache

import skipvision
from skipvision import SkipVisionConfig
from skipvision.skip_kv import cache_slots, skip_kv_state

GREEDY = dict(do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID, EOS_ID])


def with_skip_kv(skip_kv: bool) -> SkipVisionConfig:
    return SkipVisionConfig(**{**CFG.to_dict(), "skip_kv_cache": skip_kv})


@pytest.mark.parametrize("skip_kv", [True, False], ids=["skip-kv", "full-kv"])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(skip_kv):
    """Drafts verified in the prefill are generated tokens: under Skip KV-cache they must not see S either."""
    _, model = pair(with_skip_kv(skip_kv))
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, **GREEDY)
    greedy = model.generate(**inputs)
    assert torch.equal(model.generate(**inputs, assistant_model=model), greedy)
    assert torch.equal(model.generate(**inputs, assistant_model=copy.deepcopy(model)), greedy)
    assert torch.equal(model.generate(**inputs, prompt_lookup_num_tokens=3), greedy)


@pytest.mark.parametrize("assistant_skip_kv", [True, False], ids=["assistant-skip-kv", "assistant-full-kv"])
def test_assisted_decoding_with_rejected_drafts(assistant_skip_kv):
    """An assistant that disagrees from its first draft: the drafts verified in the prefill are rejected, so the
    pruned cache is cropped back into its prompt's trailing (text) columns. Greedy gives plain greedy's tokens;
    sampling runs HF's speculative acceptance and, with top_k=1, also gives greedy's tokens."""
    _, model = pair(CFG)
    _, assistant = pair(with_skip_kv(assistant_skip_kv), seed=7)  # another model: its drafts differ
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8)
    greedy = model.generate(**inputs, **GREEDY)
    drafts = assistant.generate(**inputs, **GREEDY)
    assert drafts[0, ids.shape[1]] != greedy[0, ids.shape[1]]  # the first draft is rejected
    assert torch.equal(model.generate(**inputs, **GREEDY, assistant_model=assistant), greedy)
    sampled = dict(do_sample=True, top_k=1, suppress_tokens=GREEDY["suppress_tokens"])
    assert torch.equal(model.generate(**inputs, **sampled, assistant_model=assistant), greedy)
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, assistant_model=assistant)
    assert out.shape[0] == 1 and out.shape[1] <= ids.shape[1] + 8


def test_crop_into_a_pruned_prompt():
    """``crop`` cuts back through generated tokens and the prompt's kept trailing columns, in full coordinates; a
    crop that would need a pruned key is refused by name. A left-padded batch with rows of different widths."""
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    cache = out.past_key_values
    prompt = ids.shape[1]
    assert cache.get_seq_length() == prompt
    slots = cache_slots(cache)
    cache.crop(-2)  # two trailing text tokens of the prompt
    assert cache.get_seq_length() == prompt - 2 and cache_slots(cache) == slots - 2
    # decoding on from the cropped cache equals a prefill of the shorter prompt, pruned the same way
    ref = model(input_ids=ids[:, :-2], attention_mask=mask[:, :-2], pixel_values=pixels, use_cache=True)
    step = dict(input_ids=ids[:, -2:-1], attention_mask=mask[:, :-1])
    logits = model(**step, past_key_values=cache).logits
    expected = model(**step, past_key_values=ref.past_key_values).logits
    assert (logits - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot crop .* pruned prompt no longer holds them"):
        cache.crop(-6)  # reaches the second sample's image, whose skipped keys are gone


def test_inputs_embeds_with_images_equal_input_ids():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    embeds = model.get_input_embeddings()(ids).detach()
    reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    # placeholders found from the embeddings (as HF does), or from input_ids given alongside
    assert (model(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels).logits - reference).abs().max() == 0
    both = model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels).logits
    assert (both - reference).abs().max() == 0
    greedy = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, **GREEDY)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, **GREEDY)
    assert torch.equal(out, greedy[:, ids.shape[1] :])  # HF returns only new tokens for inputs_embeds
    with pytest.raises(ValueError, match="different sequences"):
        model(input_ids=ids[:, 1:], inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels)


def test_static_cache_equals_dynamic_cache():
    """A static cache holds the pruned layout compacted into its first slots."""
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2, 0], CFG, [2, 7, 4], [9, 3, 1])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, **GREEDY)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(**inputs)
    static = model.generate(**inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (torch.stack(static.logits) - torch.stack(dynamic.logits)).abs().max() <= 1e-5
    reference = masked_full_forward(model, dynamic.sequences, mask, pixels, ids.shape[1], skip_kv=True)
    assert (torch.stack(static.logits, dim=1) - reference).abs().max() <= 1e-5
    state = skip_kv_state(static.past_key_values)
    assert cache_slots(static.past_key_values) == state.num_slots + 5  # compacted, then 5 decode steps
    assert int(static.past_key_values.get_seq_length()) == ids.shape[1] + 5
    # the static cache shrank to the pruned prompt plus the room for new tokens: a decode step reads only that
    full = static.past_key_values.layers[0].skip_vision_full_max_cache_len
    assert full >= ids.shape[1] + 5
    assert static.past_key_values.layers[0].keys.shape[2] == state.num_slots + (full - ids.shape[1])
    # a user's static cache, reused: reset gives it back its full size for the next prompt. Every sample has images
    # here, so every row loses tokens and the cache shrinks
    ids, mask, pixels = prompts([1, 2], CFG, [2, 7], [9, 3])
    inputs.update(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 6)
    first = model.generate(**inputs, past_key_values=cache)
    state = skip_kv_state(cache)
    assert state.num_slots < ids.shape[1] and cache.layers[0].keys.shape[2] == state.num_slots + 6
    cache.reset()
    again = model.generate(**inputs, past_key_values=cache)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.sequences, model.generate(**inputs).sequences)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_compiled_decode_step_equals_eager(cache_kind):
    """``torch.compile(fullgraph=True)`` traces a decode step on a pruned cache (no graph break, no data-dependent
    branch); the eager backend keeps the test free of a C++ toolchain."""
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2], CFG, [3, 6], [4, 1])
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4) if cache_kind == "static" else None
    prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True)
    eager_cache, compiled_cache = prefill.past_key_values, copy.deepcopy(prefill.past_key_values)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    token = prefill.logits[:, -1:].argmax(-1)
    for _ in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        eager = model(input_ids=token, attention_mask=mask, past_key_values=eager_cache).logits
        traced = compiled(input_ids=token, attention_mask=mask, past_key_values=compiled_cache).logits
        assert (traced - eager).abs().max() <= 1e-5
        token = eager[:, -1:].argmax(-1)


def _compiled_static_generate(model, span):
    """Greedy generate of 8 decode steps on a left-padded batch, static cache, HF's compiled forward (eager
    backend); returns (tokens, graphs dynamo compiled)."""
    ids, mask, pixels = prompts([1, 2], span, [3, 6], [4, 1])
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # HF compiles on accelerators only by default
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=9, cache_implementation="static",
        compile_config=compile_config, **GREEDY,
    )  # fmt: skip
    return out, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_compiled_static_decode_compiles_once():
    """No tensor whose shape grows per step enters the compiled forward: one graph serves every decode step of a
    padded batch, as for HF's class, with Skip-Vision and with the vanilla config."""
    vanilla, model = pair(CFG)
    _, hf_graphs = _compiled_static_generate(vanilla, 64)
    out, graphs = _compiled_static_generate(model, CFG)
    assert hf_graphs == graphs == 1
    ids, mask, pixels = prompts([1, 2], CFG, [3, 6], [4, 1])
    eager = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=9, **GREEDY)
    assert torch.equal(out, eager)
    native = skipvision.convert(copy.deepcopy(vanilla), skipvision.vanilla_config())
    assert _compiled_static_generate(native, 64)[1] == 1


@pytest.mark.parametrize("resend_images", [False, True], ids=["turn2-text", "turn2-resends-image"])
def test_multi_turn_continuation_equals_fresh_run(resend_images):
    """``generate(previous sequences + new turn, past_key_values=...)`` equals one run over the whole conversation
    under Skip KV-cache semantics (everything after the first prompt cannot see S)."""
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    first = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=4,
        return_dict_in_generate=True,
        **GREEDY,
    )
    turn = torch.randint(5, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    sequences = torch.cat([first.sequences, turn], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, sequences.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
    second = model.generate(
        input_ids=sequences,
        attention_mask=full_mask,
        pixel_values=pixels if resend_images else None,
        past_key_values=first.past_key_values,
        max_new_tokens=4,
        output_logits=True,
        return_dict_in_generate=True,
        **GREEDY,
    )
    continued = torch.stack(second.logits, dim=1)
    reference = masked_full_forward(model, second.sequences, mask, pixels, ids.shape[1], skip_kv=True)
    assert (continued - reference[:, sequences.shape[1] - ids.shape[1] :]).abs().max() <= 1e-5
    # the continuation's first step really is at the end of the conversation, not inside the old prompt
    assert second.past_key_values.get_seq_length() == second.sequences.shape[1] - 1


def test_reusing_or_extending_a_pruned_cache_wrongly_is_refused():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, **GREEDY)
    first = model.generate(**inputs, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="do not extend the .* tokens already in past_key_values"):
        model.generate(**inputs, past_key_values=first.past_key_values)  # generate twice on one cache
    image_turn, _, new_pixels = prompts([1], CFG, [0], [2], seed=5)
    sequences = torch.cat([first.sequences, image_turn[:, 1:]], dim=1)
    with pytest.raises(ValueError, match="new images after a non-empty cache"):
        model.generate(
            input_ids=sequences, pixel_values=new_pixels, past_key_values=first.past_key_values, max_new_tokens=2
        )
    with pytest.raises(ValueError, match="cannot crop"):
        first.past_key_values.crop(-10)


def test_beam_search_on_a_left_padded_batch_equals_each_sample_alone():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2, 1], CFG, [2, 7, 4], [9, 3, 1])
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, **GREEDY)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **beams)
    images = [0, 1, 3, 4]  # image index ranges per sample: [0], [1, 2], [3]
    for b in range(3):
        keep = mask[b].bool()
        alone = model.generate(input_ids=ids[b : b + 1, keep], pixel_values=pixels[images[b] : images[b + 1]], **beams)
        assert torch.equal(batched[2 * b : 2 * b + 2, ids.shape[1] :], alone[:, int(keep.sum()) :])


@pytest.mark.parametrize("skip_kv", [True, False], ids=["skip-kv", "full-kv"])
def test_eager_and_sdpa_attention_agree(skip_kv):
    cfg = with_skip_kv(skip_kv)
    (_, sdpa), (_, eager) = pair(cfg, attn="sdpa"), pair(cfg, attn="eager")
    ids, mask, pixels = prompts([1, 2, 0], cfg, [2, 7, 4], [9, 3, 1])
    prefill = [m(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits for m in (sdpa, eager)]
    assert (prefill[0] - prefill[1])[mask.bool()].abs().max() <= 1e-5
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, **GREEDY)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    outs = [m.generate(**inputs) for m in (sdpa, eager)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert (torch.stack(outs[0].logits) - torch.stack(outs[1].logits)).abs().max() <= 1e-5


def test_auto_classes_load_skip_vision_checkpoints(tmp_path):
    vanilla, model = pair(CFG)
    model.save_pretrained(tmp_path / "skip")
    vanilla.save_pretrained(tmp_path / "vanilla")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "skip")
    assert isinstance(loaded, skipvision.SkipVisionLlavaForConditionalGeneration)
    assert loaded.skip_vision_config == CFG
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "vanilla")
    assert type(plain) is LlavaForConditionalGeneration  # a vanilla checkpoint stays HF's own class


def test_list_valued_feature_layers_use_cls_attention_of_each_layer():
    """Features concatenated from several layers: R = top-N_r by the mean CLS attention of those layers."""
    config = llava_config()
    config.vision_feature_layer = [-2, -1]
    torch.manual_seed(0)
    vanilla = LlavaForConditionalGeneration(config).eval()
    cfg = SkipVisionConfig(num_retained=12, num_skipped=52, merge="none", summary_tokens=False)
    skip = skipvision.convert(copy.deepcopy(vanilla), cfg)
    _, _, pixels = prompts([2], cfg, [1], [1])
    tower = vanilla.model.vision_tower
    tower.config._attn_implementation = "eager"
    attentions = tower(pixels, output_attentions=True).attentions
    scores = (attentions[-2][:, :, 0, 1:].sum(1) + attentions[-1][:, :, 0, 1:].sum(1)) / 2
    top = scores.topk(12, dim=-1).indices.sort(-1).values
    features = vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    features = torch.stack(list(features))
    expected = features.gather(1, top.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    assert torch.allclose(skip.encode_images(pixels)[:, :12], expected, atol=1e-6)
