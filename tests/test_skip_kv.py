"""Skip KV-cache: cached decoding with pruned cache == full forward under the equivalent mask (method.md 8.5-8.7)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, IMAGE_TOKEN_ID, pair, prompts

import skipvision
from skipvision import SkipVisionConfig
from skipvision.skip_kv import cache_slots, prune_skipped_kv, skip_kv_state

CFG = SkipVisionConfig(num_retained=16, num_skipped=24)
NEW_TOKENS = 6
LAYOUTS = {
    "batch1": ([1], [3], [4]),
    "left-padded-3": ([1, 2, 1], [2, 7, 4], [9, 3, 1]),
    "ragged-text-only": ([2, 0], [1, 3], [2, 30]),
}


def masked_full_forward(model, sequences, prompt_mask, pixel_values, prompt_length, skip_kv):
    """No-cache forward over prompt + generated tokens; decode rows cannot see S when ``skip_kv``."""
    batch, total = sequences.shape
    attention_mask = torch.cat([prompt_mask, torch.ones(batch, total - prompt_length, dtype=torch.long)], dim=1)
    skipped = torch.zeros(batch, total, dtype=torch.bool)
    skipped[:, :prompt_length] = skipvision.skipped_token_mask(sequences[:, :prompt_length], IMAGE_TOKEN_ID, CFG)
    rows = torch.arange(total)
    allowed = (rows[None, :, None] >= rows[None, None, :]) & attention_mask.bool()[:, None, :]
    if skip_kv:
        allowed &= ~((rows[None, :, None] >= prompt_length) & skipped[:, None, :])
    allowed |= torch.eye(total, dtype=torch.bool)  # padding rows attend to themselves (their outputs are unused)
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=sequences,
        pixel_values=pixel_values,
        attention_mask=allowed[:, None],
        position_ids=positions,
        use_cache=False,
    )
    return out.logits[:, prompt_length - 1 : total - 1]


@pytest.mark.parametrize("skip_kv", [True, False], ids=["skip-kv", "full-kv"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_generate_equals_masked_full_forward(layout, skip_kv):
    cfg = SkipVisionConfig(**{**CFG.to_dict(), "skip_kv_cache": skip_kv})
    _, model = pair(cfg)
    ids, mask, pixels = prompts(*LAYOUTS[layout][:1], cfg, *LAYOUTS[layout][1:])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=[IMAGE_TOKEN_ID, EOS_ID],
        output_logits=True,
        return_dict_in_generate=True,
    )
    generated = torch.stack(out.logits, dim=1)
    reference = masked_full_forward(model, out.sequences, mask, pixels, ids.shape[1], skip_kv)
    assert (generated - reference).abs().max() <= 1e-5
    if skip_kv:  # and the mask matters: without it the same sequence scores differently
        unmasked = masked_full_forward(model, out.sequences, mask, pixels, ids.shape[1], skip_kv=False)
        assert (generated[:, 1:] - unmasked[:, 1:]).abs().max() > 1e-4


def test_cache_is_pruned_and_decoding_ignores_pruned_entries():
    skip_cfg = CFG
    keep_cfg = SkipVisionConfig(**{**CFG.to_dict(), "skip_kv_cache": False})
    _, model = pair(keep_cfg)
    ids, mask, pixels = prompts([1, 2, 1], keep_cfg, [2, 7, 4], [9, 3, 1])
    length = ids.shape[1]
    prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    cache = prefill.past_key_values
    assert all(layer.keys.shape[-2] == length for layer in cache.layers)  # no pruning with skip_kv_cache=False

    skipped = skipvision.skipped_token_mask(ids, IMAGE_TOKEN_ID, skip_cfg)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    for layer in cache.layers:  # poison S: nothing downstream may read it
        for b in range(3):
            layer.keys[b, :, skipped[b]] = float("nan")
            layer.values[b, :, skipped[b]] = float("nan")
    state = prune_skipped_kv(cache, skipped)
    images = torch.tensor([1, 2, 1])
    expected = length - images.min().item() * CFG.num_skipped  # the widest sample sets the cache width
    assert state.slot_valid.sum(1).tolist() == (length - images * CFG.num_skipped).tolist()
    for (keys, values), layer in zip(before, cache.layers):
        assert layer.keys.shape[-2] == expected
        for b in range(3):
            n = int(state.slot_valid[b].sum())
            kept = (~skipped[b]).nonzero().squeeze(1)
            assert torch.equal(layer.keys[b, :, :n], keys[b, :, kept])  # kept entries are bitwise the same
            assert torch.equal(layer.values[b, :, :n], values[b, :, kept])

    positions = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: positions.append(kw["position_ids"].clone()), with_kwargs=True
    )
    token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    step = model(input_ids=token, attention_mask=full_mask, past_key_values=cache)
    hook.remove()
    assert not torch.isnan(step.logits).any()
    assert positions[0][:, 0].tolist() == mask.sum(1).tolist()  # true position L (per sample, padding excluded)
    assert cache_slots(cache) == expected + 1
    assert cache.get_seq_length() == ids.shape[1] + 1  # generate sees tokens in full coordinates

    _, pruned_model = pair(skip_cfg)
    reference = pruned_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    step_ref = pruned_model(input_ids=token, attention_mask=full_mask, past_key_values=reference.past_key_values)
    assert (step.logits - step_ref.logits).abs().max() <= 1e-6


def test_first_generated_position_is_prompt_length():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    positions = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: positions.append(kw["position_ids"].clone()), with_kwargs=True
    )
    model.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID, EOS_ID]
    )
    hook.remove()
    length = ids.shape[1]
    assert positions[0][0].tolist() == list(range(length))
    assert [p.item() for p in positions[1:]] == [length, length + 1]


def test_prefill_logits_depend_on_skipped_tokens():
    """Under the default causal mask the last prompt token sees S at prefill (8.6)."""
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    embeds, skipped = model.embed_multimodal(ids, pixels)
    rows = skipvision.skip_ffn.ffn_rows(skipped)
    base = super(type(model), model).forward(inputs_embeds=embeds, skip_vision_ffn_rows=rows).logits[0, -1]
    noisy = embeds + skipped.unsqueeze(-1).float()
    moved = super(type(model), model).forward(inputs_embeds=noisy, skip_vision_ffn_rows=rows).logits[0, -1]
    assert (base - moved).abs().max() > 1e-4


def test_sampling_generate_runs_and_prunes():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 1], CFG, [2, 5], [3, 1])
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=4,
        do_sample=True,
        top_k=10,
        suppress_tokens=[IMAGE_TOKEN_ID, EOS_ID],
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, ids.shape[1] + 4)
    assert cache_slots(out.past_key_values) == ids.shape[1] - CFG.num_skipped + 3


def test_bad_decode_inputs():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    cache = model(input_ids=ids, pixel_values=pixels, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="attention_mask has 5 columns"):
        model(input_ids=ids[:, :1], attention_mask=torch.ones(1, 5, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="already pruned"):
        prune_skipped_kv(cache, torch.zeros(1, cache.get_seq_length(), dtype=torch.bool))
    with pytest.raises(ValueError, match="non-empty cache"):
        model(input_ids=ids, pixel_values=pixels, past_key_values=cache)


def test_tuple_outputs_prune_the_cache_too():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    as_dict = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    as_tuple = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True, return_dict=False)
    cache = next(entry for entry in as_tuple if isinstance(entry, type(as_dict.past_key_values)))
    assert skip_kv_state(cache) is not None
    # the widest row is the 2-image one (no padding): 2 * N_s of its columns are pruned; the other row's padding is too
    slots = cache_slots
    assert slots(cache) == slots(as_dict.past_key_values) == ids.shape[1] - 2 * CFG.num_skipped
    assert skip_kv_state(cache).slot_valid.sum(1).tolist() == (mask.sum(1) - torch.tensor([1, 2]) * 24).tolist()
    assert torch.equal(as_tuple[0], as_dict.logits)
