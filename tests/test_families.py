"""The invariant suite of method.md section 8, written once and run on every model family (tests/families.py)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from families import FAMILIES, batch, pair, vanilla_model

import skipvision
from skipvision import SkipVisionConfig
from skipvision.skip_kv import cache_slots, skip_kv_state

NAMES = list(FAMILIES)
LAYOUT = [(1, " what color is it?"), (1, "a b"), (0, "text only sample here"), (2, " compare")]
NEW_TOKENS = 5


def _inputs(name, model, cfg, samples=LAYOUT, dtype=torch.float32):
    return batch(name, cfg, samples, model.config, dtype=dtype)


def _family_forward(model, **kwargs):
    """The HF class's own forward (no Skip-FFN rows unless passed): the reference path."""
    return skipvision.family_of(model).hf_class.forward(model, **kwargs)


def _image_inputs(inputs):
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}


def _skipped(model, inputs):
    images = {k: v for k, v in _image_inputs(inputs).items() if k != "mm_token_type_ids"}
    return model.skipped_mask(inputs["input_ids"], inputs["pixel_values"], **images)


@contextlib.contextmanager
def _plain_layers(model, gate=None):
    """Every decoder layer runs its HF forward (Skip-FFN off); with ``gate`` (batch, seq, 1) the FFN output of each
    skipping layer (``skip_layers``) is multiplied by it: the single-stream reference of Skip-FFN."""
    layers = skipvision.family_of(model).decoder_layers(model)
    before = [layer.skip_ffn for layer in layers]
    gated = [] if gate is None else [layer for layer in layers if layer.skip_ffn]
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, o: o * gate) for layer in gated]
    for layer in layers:
        layer.skip_ffn = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.skip_ffn = value
        for h in hooks:
            h.remove()


def _prompt_positions(model, inputs):
    """The position ids the text model receives in a prefill of ``inputs`` (1-D, or M-RoPE's (4, batch, seq))."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    text_model = skipvision.family_of(model).language_model(model)
    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    positions = seen[0]
    if positions is None:  # the 1-D default
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return positions


@pytest.mark.parametrize("name", NAMES)
def test_native_layout_equals_vanilla_hf(name):
    vanilla, model = pair(name, skipvision.vanilla_config())
    inputs = _inputs(name, model, None)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ref = vanilla(**inputs, labels=labels)
    out = model(**inputs, labels=labels)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    gen_ref = vanilla.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gen, gen_ref)


@pytest.mark.parametrize("name", NAMES)
def test_skip_ffn_equals_gated_reference_fp64(name):
    _, model = pair(name, dtype=torch.float64)
    cfg = model.skip_vision_config
    inputs = _inputs(name, model, cfg, dtype=torch.float64)
    mask = inputs["attention_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    skipped = _skipped(model, inputs)
    assert int(skipped.sum()) > 0
    gate = (~skipped).to(torch.float64).unsqueeze(-1)
    with _plain_layers(model, gate):
        ref = model(**inputs, labels=labels)
    ref.loss.backward()
    valid = mask.bool()
    assert (out.logits - ref.logits)[valid].abs().max() <= 1e-10
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-10
    assert ("summary_scorer.score.weight" in grads) == cfg.summary_tokens
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=1e-8), n
    # and the gate matters: the ungated forward differs
    with _plain_layers(model):
        plain = model(**inputs)
    assert (plain.logits - out.logits)[valid].abs().max() > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_training_step_equals_gated_reference(name):
    # bf16 mixed precision (HF Trainer's --bf16): fp32 weights and residual stream, bf16 matmuls. The FFN's bf16
    # output is added back into the fp32 stream, as HF's own ``residual + mlp`` promotes it.
    _, model = pair(name)
    model.train()
    inputs = _inputs(name, model, model.skip_vision_config)
    mask = inputs["attention_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    gate = (~_skipped(model, inputs)).float().unsqueeze(-1)
    with _plain_layers(model, gate), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref = model(**inputs, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= 2e-2 * abs(ref.loss.item())


@pytest.mark.parametrize("name", NAMES)
def test_mlp_runs_on_non_skipped_rows_only(name):
    """The FFN of a skipping layer runs on exactly the tokens that are neither skipped nor padding (the batch is
    left-padded)."""
    _, model = pair(name)
    inputs = _inputs(name, model, model.skip_vision_config)
    images = _image_inputs(inputs)
    skipped = _skipped(model, inputs)
    rows = []
    layers = skipvision.family_of(model).decoder_layers(model)
    count = lambda _m, args: rows.append(args[0].shape[:-1].numel())  # noqa: E731
    hooks = [layer.mlp.register_forward_pre_hook(count) for layer in layers]
    model(**inputs)
    for h in hooks:
        h.remove()
    padding = inputs["attention_mask"] == 0
    assert bool(padding.any()) and not bool((padding & skipped).any())
    # a layer outside skip_layers runs its HF forward: the FFN over every row
    total = inputs["input_ids"].numel()
    kept = total - int(skipped.sum()) - int(padding.sum())
    assert rows == [kept if layer.skip_ffn else total for layer in layers]
    # the public mask from per-image visual token counts marks the same tokens
    cfg = model.skip_vision_config
    if cfg.in_place:
        return
    counts = [
        t.tokens.shape[0] for t in model.skip_vision_family.image_tokens(model, inputs["pixel_values"], images, cfg)
    ]
    mask = skipvision.skipped_token_mask(inputs["input_ids"], model.config.image_token_id, cfg, counts)
    assert torch.equal(mask, skipped)


def _masked_full_forward(model, sequences, inputs, prompt_skipped, skip_kv, prompt_positions):
    prompt_length = inputs["input_ids"].shape[1]
    batch_size, total = sequences.shape
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones(batch_size, total - prompt_length, dtype=torch.long)], dim=1
    )
    skipped = torch.zeros(batch_size, total, dtype=torch.bool)
    skipped[:, :prompt_length] = prompt_skipped
    rows = torch.arange(total)
    allowed = (rows[None, :, None] >= rows[None, None, :]) & attention_mask.bool()[:, None, :]
    if skip_kv:
        allowed &= ~((rows[None, :, None] >= prompt_length) & skipped[:, None, :])
    allowed |= torch.eye(total, dtype=torch.bool)
    # generated tokens continue every position axis from the prompt's largest (text: the token count)
    new = total - prompt_length
    last = prompt_positions.amax(dim=-1, keepdim=True)
    positions = torch.cat([prompt_positions, last + 1 + torch.arange(new)], dim=-1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, new))
    out = model(input_ids=sequences, attention_mask=allowed[:, None], position_ids=positions, use_cache=False, **extra)
    return out.logits[:, prompt_length - 1 : total - 1]


@pytest.mark.parametrize("skip_kv", [True, False], ids=["skip-kv", "full-kv"])
@pytest.mark.parametrize("layout", ["batch1", "left-padded"])
@pytest.mark.parametrize("name", NAMES)
def test_generate_equals_masked_full_forward(name, layout, skip_kv):
    cfg = SkipVisionConfig(**{**FAMILIES[name][1].to_dict(), "skip_kv_cache": skip_kv})
    _, model = pair(name, cfg)
    samples = LAYOUT[:1] if layout == "batch1" else LAYOUT
    inputs = _inputs(name, model, cfg, samples)
    image_id = model.config.image_token_id
    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=[image_id, 2],
        output_logits=True,
        return_dict_in_generate=True,
    )
    generated = torch.stack(out.logits, dim=1)
    prompt_skipped = _skipped(model, inputs)
    prompt_positions = _prompt_positions(model, inputs)
    reference = _masked_full_forward(model, out.sequences, inputs, prompt_skipped, skip_kv, prompt_positions)
    assert (generated - reference).abs().max() <= 1e-5
    # cache after prefill + NEW_TOKENS - 1 steps: each sample's valid entries = its tokens - its skipped tokens
    cache = out.past_key_values
    length = inputs["input_ids"].shape[1]
    if skip_kv:
        state = skip_kv_state(cache)
        expected = (inputs["attention_mask"].sum(1) - prompt_skipped.sum(1)).tolist()  # padding is pruned too
        assert state.slot_valid.sum(1).tolist() == expected
        assert cache_slots(cache) == max(expected) + NEW_TOKENS - 1
        assert cache.get_seq_length() == length + NEW_TOKENS - 1  # generate sees tokens in full coordinates
        unmasked = _masked_full_forward(model, out.sequences, inputs, prompt_skipped, False, prompt_positions)
        assert (generated[:, 1:] - unmasked[:, 1:]).abs().max() > 1e-4  # the pruning matters
    else:
        assert cache.get_seq_length() == length + NEW_TOKENS - 1


@pytest.mark.parametrize("name", NAMES)
def test_batch_and_padding_invariance(name):
    _, model = pair(name)
    cfg = model.skip_vision_config
    inputs = _inputs(name, model, cfg)
    batched = model(**inputs).logits
    for b, sample in enumerate(LAYOUT):
        keep = inputs["attention_mask"][b].bool()
        alone_inputs = _inputs(name, model, cfg, [sample])
        # the same images as in the batch: rebuild the batch with only this sample's images
        if sample[0]:
            before = sum(n for n, _ in LAYOUT[:b])
            alone_inputs = _select_images(inputs, before, sample[0], name)
            alone_inputs["input_ids"] = inputs["input_ids"][b : b + 1, keep]
            alone_inputs["attention_mask"] = torch.ones_like(alone_inputs["input_ids"])
            if "mm_token_type_ids" in inputs:
                alone_inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][b : b + 1, keep]
        alone = model(**alone_inputs).logits[0]
        assert (batched[b, keep] - alone).abs().max() <= 1e-5


def _select_images(inputs, start, count, name):
    out = {}
    if "image_grid_thw" in inputs:  # flattened patches: slice each image's rows
        grids = inputs["image_grid_thw"]
        rows = torch.cat([torch.zeros(1, dtype=torch.long), grids.prod(-1).cumsum(0)])
        out["pixel_values"] = inputs["pixel_values"][rows[start] : rows[start + count]]
        out["image_grid_thw"] = grids[start : start + count]
        return out
    for key in ("pixel_values", "image_sizes"):
        if key in inputs:
            out[key] = inputs[key][start : start + count]
    if "batch_num_images" in inputs:
        out["batch_num_images"] = torch.tensor([1] * count)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(name, tmp_path):
    _, model = pair(name)
    cfg = model.skip_vision_config
    inputs = _inputs(name, model, cfg)
    before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = skipvision.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.skip_vision_config == cfg
    after = loaded(**inputs).logits
    assert (after - before).abs().max() <= 1e-6  # a reloaded tower may pick another attention kernel


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    _, model = pair(name)
    cfg = model.skip_vision_config
    inputs = _inputs(name, model, cfg, LAYOUT[:2])
    wrong = dict(inputs, input_ids=inputs["input_ids"][:, 1:], attention_mask=inputs["attention_mask"][:, 1:])
    wrong["input_ids"] = inputs["input_ids"].clone()
    image_id = model.config.image_token_id
    first = int((wrong["input_ids"][0] == image_id).nonzero()[0, 0])
    wrong["input_ids"][0, first] = 7  # one placeholder fewer
    # in place, where the placeholders alone do not say an image's count, HF's own check names it
    with pytest.raises(ValueError, match="placeholder|image tokens do not match"):
        model(**wrong)
    no_images = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match="image"):
        model(**no_images)
    vanilla = vanilla_model(name)
    facts = skipvision.vision_facts(vanilla.config)
    if facts.eligible_tokens is None:  # varies per image: the count is checked per image
        big = SkipVisionConfig(num_retained=10_000, num_skipped=4, selection="position")
        with pytest.raises(ValueError, match="num_retained .* larger"):
            skipvision.convert(copy.deepcopy(vanilla), big)(**_inputs(name, model, big, LAYOUT[:2]))
        with pytest.raises(ValueError, match="fraction"):
            SkipVisionConfig(num_retained=1.5, num_skipped=4)
        return
    with pytest.raises(ValueError, match="num_retained .* larger"):
        skipvision.convert(
            vanilla, SkipVisionConfig(num_retained=facts.eligible_tokens + 1, num_skipped=4, selection="position")
        )
    assert type(vanilla) is skipvision.family_of(vanilla).hf_class  # a failed convert leaves the model as it was


@pytest.mark.parametrize("name", NAMES)
def test_hf_generate_paths_equal_plain_greedy(name):
    """Static cache (left-padded batch), assisted decoding (batch 1) and a continued second turn give what plain
    dynamic-cache greedy decoding gives, on every family."""
    cfg = FAMILIES[name][1]
    _, model = pair(name, cfg)
    greedy = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id, 2])
    inputs = _inputs(name, model, cfg)
    dynamic = model.generate(**inputs, **greedy, output_logits=True, return_dict_in_generate=True)
    static = model.generate(
        **inputs, **greedy, cache_implementation="static", output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (torch.stack(static.logits) - torch.stack(dynamic.logits)).abs().max() <= 1e-5
    # inputs_embeds with images (placeholders found from the embeddings, as HF does)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    if skipvision.family_of(model).model_type != "qwen3_vl":  # HF's own Qwen3-VL misplaces M-RoPE from embeddings
        from_embeds = model.generate(inputs_embeds=embeds, **rest, **greedy)
        assert torch.equal(from_embeds, dynamic.sequences[:, inputs["input_ids"].shape[1] :])
    single = _inputs(name, model, cfg, LAYOUT[:1])
    assert torch.equal(model.generate(**single, **greedy, assistant_model=model), model.generate(**single, **greedy))
    # turn 2 continues from the pruned cache: equal to decoding the whole conversation in one go
    first = model.generate(**single, **greedy, return_dict_in_generate=True)
    mask = torch.ones_like(first.sequences)
    images = {k: v for k, v in single.items() if k not in ("input_ids", "attention_mask")}
    second = model.generate(
        input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values, **images, **greedy
    )
    assert torch.equal(second, model.generate(**single, **{**greedy, "max_new_tokens": 8}))


MROPE = [name for name in NAMES if name.startswith("qwen")]


@pytest.mark.parametrize("name", MROPE)
def test_first_decode_positions_equal_vanilla(name):
    """The first decode step's position ids are the vanilla model's: all of them in place; in the full layout
    (shorter prompt) the M-RoPE axes (the text axis counts the prompt's own tokens)."""
    cfg = FAMILIES[name][1]
    vanilla, model = pair(name, cfg)

    def decode_positions(m, inputs):
        seen = []
        text_model = skipvision.family_of(m).language_model(m) if m is model else m.model.language_model
        hook = lambda _mod, args, kwargs: seen.append(kwargs["position_ids"])  # noqa: E731
        handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            m.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            handle.remove()
        return seen[1]  # (4, batch, 1)

    ref = decode_positions(vanilla, _inputs(name, vanilla, None))
    inputs = _inputs(name, model, cfg)
    got = decode_positions(model, inputs)
    if cfg.in_place:
        assert torch.equal(got, ref)
    else:
        assert torch.equal(got[1:], ref[1:])
        assert torch.equal(got[0, :, 0], inputs["attention_mask"].sum(-1))
    # a direct forward without position ids on the pruned cache lands on the same positions
    out = model(**inputs, use_cache=True)
    assert skip_kv_state(out.past_key_values) is not None
    step = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
    seen = []
    hook = lambda _mod, args, kwargs: seen.append(kwargs["position_ids"])  # noqa: E731
    handle = skipvision.family_of(model).language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values)
    finally:
        handle.remove()
    assert torch.equal(seen[0][1:], got[1:])


@pytest.mark.parametrize("name", [n for n in MROPE if not n.endswith("inplace")])
def test_full_layout_refuses_videos_by_name(name):
    _, model = pair(name)
    inputs = _inputs(name, model, model.skip_vision_config, LAYOUT[:1])
    with pytest.raises(ValueError, match="pixel_values_videos .* layout='inplace'"):
        model(**inputs, pixel_values_videos=torch.zeros(4, inputs["pixel_values"].shape[1]))
