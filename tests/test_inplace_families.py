"""The in-place layout on HF families without a Skip-Vision family module of their own (duck-typed facts):
Idefics3, SmolVLM, InternVL, Mistral3, and Gemma3 refused. Tiny random models from configs; inputs written by hand
with each family's placeholder count (the processors' own expansion is HF's and unchanged in place)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf

import skipvision
from skipvision import SkipVisionConfig
from skipvision.skip_kv import skip_kv_state

TEXT = dict(
    vocab_size=1024, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=512, pad_token_id=0,
)  # fmt: skip
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
IMAGE = 1000


def _idefics3(cls=hf.Idefics3ForConditionalGeneration, config=hf.Idefics3Config):
    vision = dict(VISION, image_size=56, patch_size=14)
    cfg = config(vision_config=vision, text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE, scale_factor=2)
    return cls(cfg), lambda n: {"pixel_values": torch.randn(n, 1, 3, 56, 56)}, 4


def _internvl():
    vision = dict(VISION, image_size=[56, 56], patch_size=[14, 14])
    cfg = hf.InternVLConfig(
        vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE, downsample_ratio=0.5
    )
    return hf.InternVLForConditionalGeneration(cfg), lambda n: {"pixel_values": torch.randn(n, 3, 56, 56)}, 4


def _mistral3():
    vision = dict(VISION, image_size=56, patch_size=14, head_dim=16)
    text = dict(TEXT, model_type="mistral", head_dim=16, sliding_window=None)
    cfg = hf.Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE, spatial_merge_size=2)

    def images(n):
        return {"pixel_values": torch.randn(n, 3, 56, 56), "image_sizes": torch.tensor([[56, 56]] * n)}

    return hf.Mistral3ForConditionalGeneration(cfg), images, 4


BUILDERS = {
    "idefics3": _idefics3,
    "smolvlm": lambda: _idefics3(hf.SmolVLMForConditionalGeneration, hf.SmolVLMConfig),
    "internvl": _internvl,
    "mistral3": _mistral3,
}
CFG = SkipVisionConfig(0.5, layout="inplace", merge="none", summary_tokens=False, selection="grid")


def _setup(name, dtype=torch.float32):
    torch.manual_seed(0)
    vanilla, images, per_image = BUILDERS[name]()
    vanilla = vanilla.to(dtype).eval()
    # a left-padded batch: [pad pad | text | image | text] and [text | image | text], one image each
    rows = []
    for pad in (2, 0):
        ids = [0] * pad + [5, 6, 7] + [IMAGE] * per_image + [8, 9] + [10] * (2 - pad)
        rows.append(ids)
    input_ids = torch.tensor(rows)
    mask = (input_ids != 0).long()
    extra = images(2)
    extra["pixel_values"] = extra["pixel_values"].to(dtype)
    return vanilla, dict(input_ids=input_ids, attention_mask=mask, **extra)


def _image_args(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_in_place_family_invariants(name, tmp_path):
    vanilla, inputs = _setup(name)
    # everything retained equals the vanilla model
    keep_all = skipvision.convert(copy.deepcopy(vanilla), SkipVisionConfig(1.0, **_INPLACE))
    assert (keep_all(**inputs).logits - vanilla(**inputs).logits).abs().max() <= 1e-6
    model = skipvision.convert(copy.deepcopy(vanilla), CFG)
    assert type(model).__name__ == f"SkipVision{type(vanilla).__name__}"
    skipped = model.skipped_mask(**_image_args(inputs))
    assert skipped.sum(1).tolist() == [2, 2]  # half of each image's 4 tokens
    # generate with Skip KV-cache equals a no-cache forward where generated tokens cannot see S
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = model.generate(**inputs, **greedy, suppress_tokens=[IMAGE])
    sequences, prompt = out.sequences, inputs["input_ids"].shape[1]
    total = sequences.shape[1]
    full_mask = torch.cat([inputs["attention_mask"], torch.ones(2, total - prompt, dtype=torch.long)], 1)
    rows = torch.arange(total)
    allowed = (rows[None, :, None] >= rows[None, None, :]) & full_mask.bool()[:, None, :]
    hidden = torch.zeros(2, total, dtype=torch.bool)
    hidden[:, :prompt] = skipped
    allowed &= ~((rows[None, :, None] >= prompt) & hidden[:, None, :])
    allowed |= torch.eye(total, dtype=torch.bool)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    ref = model(input_ids=sequences, attention_mask=allowed[:, None], position_ids=positions, use_cache=False, **images)
    generated = torch.stack(out.logits, dim=1)
    assert (generated - ref.logits[:, prompt - 1 : total - 1]).abs().max() <= 1e-5
    state = skip_kv_state(out.past_key_values)
    assert state.slot_valid.sum(1).tolist() == (inputs["attention_mask"].sum(1) - skipped.sum(1)).tolist()
    # a saved checkpoint loads back as the same Skip-Vision class
    model.save_pretrained(tmp_path)
    loaded = skipvision.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.skip_vision_config == CFG
    assert (loaded(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("name", list(BUILDERS))
def test_in_place_family_skip_ffn_equals_gated_reference_fp64(name):
    vanilla, inputs = _setup(name, torch.float64)
    model = skipvision.convert(vanilla, CFG)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    skipped = model.skipped_mask(**_image_args(inputs))
    gate = (~skipped).double().unsqueeze(-1)
    layers = skipvision.family_of(model).decoder_layers(model)
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, o: o * gate) for layer in layers]
    try:
        ref = skipvision.family_of(model).hf_class.forward(model, **inputs, labels=labels)
    finally:
        for h in hooks:
            h.remove()
    valid = inputs["attention_mask"].bool()
    assert (out.logits - ref.logits)[valid].abs().max() <= 1e-10
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-10
    plain = skipvision.family_of(model).hf_class.forward(model, **inputs)
    assert (plain.logits - out.logits)[valid].abs().max() > 1e-6


def test_mistral3_grid_selection_follows_the_image_rows_and_columns():
    """A Mistral3 image is rows of placeholders, each ended by a break token (what PixtralProcessor writes); grid
    selection of a quarter keeps every 2nd row and column of the image's real grid (``image_sizes``)."""
    vanilla, _, _ = _mistral3()
    model = skipvision.convert(vanilla, skipvision.in_place_config(0.25))
    rows, cols, image_break = 4, 6, 11
    ids = [5, 6] + ([IMAGE] * cols + [image_break]) * rows + [8]
    skipped = model.skipped_mask(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(1, 3, 14 * 2 * rows, 14 * 2 * cols),
        image_sizes=torch.tensor([[14 * 2 * rows, 14 * 2 * cols]]),
    )[0]
    image = torch.tensor(ids) == IMAGE
    kept = (~skipped[image]).nonzero().squeeze(1).tolist()
    assert kept == [r * cols + c for r in (0, 2) for c in (0, 2, 4)]


def test_in_place_only_families_refuse_the_full_layout_and_gemma3_is_refused():
    vanilla, _ = _setup("idefics3")
    with pytest.raises(ValueError, match="only layout='inplace'"):
        skipvision.convert(vanilla, SkipVisionConfig(2, 1, selection="position"))
    assert type(vanilla) is hf.Idefics3ForConditionalGeneration
    text = dict(TEXT, model_type="gemma3_text", head_dim=16, sliding_window=64, layer_types=["sliding_attention"] * 3)
    cfg = hf.Gemma3Config(
        vision_config=dict(VISION, image_size=56, patch_size=14, model_type="siglip_vision_model"),
        text_config=text,
        mm_tokens_per_image=4,
        image_token_id=IMAGE,
    )
    gemma = hf.Gemma3ForConditionalGeneration(cfg)
    with pytest.raises(TypeError, match="sandwich norms"):
        skipvision.convert(gemma, CFG)


_INPLACE = dict(layout="inplace", merge="none", summary_tokens=False, selection="grid")
