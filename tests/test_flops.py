"""Analytic FLOPs against torch.utils.flop_counter on tiny models, and the paper's FLOPs column."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair, prompts

import skipvision
from skipvision import SkipVisionConfig
from skipvision import flops as F
from skipvision.harness import measure

CONFIGS = {
    "tome+summary+cls": SkipVisionConfig(num_retained=16, num_skipped=24),
    "vanilla-equivalent": SkipVisionConfig(
        num_retained=64, num_skipped=0, selection="position", merge="none", summary_tokens=False
    ),
    "layer-subset": SkipVisionConfig(num_retained=8, num_skipped=20, skip_layers=(1,)),
}


def analytic_forward(model, cfg, text_tokens, images, batch):
    shape = skipvision.family_of(model).model_shape(model.config)
    counts = F.sequence_counts(shape, text_tokens, images, cfg)
    lm = F.language_flops(shape, counts, logits=counts.attention_length, causal=False, skip_layers=cfg.skip_layers)
    vision = F.vision_flops(shape, images)
    return batch * sum(lm.values()), batch * (sum(vision.values()) + F.skip_vision_overhead(shape, cfg, images)), lm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_match_flop_counter(name):
    cfg = CONFIGS[name]
    _, model = pair(cfg)
    ids, _, pixels = prompts([2, 2], cfg, [3, 3], [5, 5])
    text = int((ids[0] != IMAGE_TOKEN_ID).sum())
    total, per_module = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels))
    lm, vision, parts = analytic_forward(model, cfg, text, 2, batch=2)
    assert abs((lm + vision) / total - 1) <= 0.02
    measured_lm = per_module["SkipVisionLlavaForConditionalGeneration.model.language_model"]
    measured_lm += per_module["SkipVisionLlavaForConditionalGeneration.lm_head"]
    assert abs(lm / measured_lm - 1) <= 0.02
    # FFN FLOPs exactly: 6*d*m per token that runs the FFN, per layer
    mlp = sum(v for k, v in per_module.items() if ".language_model." in k and k.endswith(".mlp"))
    assert mlp == 2 * parts["ffn"]
    # a real batch's prefill parts (the bench's per-part view) add up, the FFN exactly as measured
    analytic = measure.batch_flops(model, {"input_ids": ids, "pixel_values": pixels})
    assert analytic["prefill_language_model_parts"]["ffn"] == mlp
    assert sum(analytic["prefill_language_model_parts"].values()) == analytic["prefill_language_model"]


def test_list_valued_feature_layers_are_counted():
    """Several feature layers: a wider projector input and CLS scoring in each of them."""
    import copy

    from conftest import llava_config
    from transformers import LlavaForConditionalGeneration

    import skipvision

    cfg = CONFIGS["tome+summary+cls"]
    config = llava_config()
    config.vision_feature_layer = [-2, -1]
    model = skipvision.convert(copy.deepcopy(LlavaForConditionalGeneration(config)), cfg).eval()
    ids, _, pixels = prompts([2, 2], cfg, [3, 3], [5, 5])
    total, _ = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels))
    lm, vision, _ = analytic_forward(model, cfg, int((ids[0] != IMAGE_TOKEN_ID).sum()), 2, batch=2)
    assert skipvision.family_of(model).model_shape(model.config).vision.feature_layers == 2
    assert abs((lm + vision) / total - 1) <= 0.02


def test_skipping_removes_exactly_the_ffn_of_skipped_tokens():
    cfg = CONFIGS["tome+summary+cls"]
    _, model = pair(cfg)
    ids, _, pixels = prompts([1], cfg, [3], [5])
    embeds, skipped = model.embed_multimodal(ids, pixels)
    base = super(type(model), model)
    _, with_skip = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels))
    _, without = measure.measured_flops(lambda: base.forward(inputs_embeds=embeds))
    d, m, layers = 64, 160, 3
    mlp = lambda counts: sum(v for k, v in counts.items() if "language_model" in k and k.endswith(".mlp"))  # noqa: E731
    assert mlp(without) - mlp(with_skip) == 6 * d * m * cfg.num_skipped * layers
    attn = lambda counts: sum(v for k, v in counts.items() if "language_model" in k and k.endswith(".self_attn"))  # noqa: E731
    assert attn(without) == attn(with_skip)  # projections and attention still see every token


def test_training_step_flops_are_three_forwards():
    """Trained parts cost 3x their forward (backward = input + weight gradients); the frozen tower, CLS scoring
    and merge (no gradient) cost 1x."""
    cfg = CONFIGS["tome+summary+cls"]
    _, model = pair(cfg, attn="eager")
    model.train()
    model.model.vision_tower.requires_grad_(False)
    ids, _, pixels = prompts([1, 1], cfg, [3, 3], [5, 5])
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    total, _ = measure.measured_flops(lambda: model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward())
    shape = skipvision.family_of(model).model_shape(model.config)
    counts = F.sequence_counts(shape, int((ids[0] != IMAGE_TOKEN_ID).sum()), 1, cfg)
    lm = sum(F.language_flops(shape, counts, logits=counts.attention_length, causal=False).values())
    vision = F.vision_flops(shape, images=1)
    d = shape.text.hidden
    scorer = 2 * (cfg.num_retained + cfg.num_skipped) * d
    no_grad = F.skip_vision_overhead(shape, cfg) - scorer
    analytic = 2 * (3 * (lm + vision["projector"] + scorer) + vision["tower"] + no_grad)
    assert abs(analytic / total - 1) <= 0.02


@pytest.mark.parametrize(
    ("preset", "overrides", "paper"),
    [
        ("llava-llama3-8b", {}, 0.25),
        ("llava-llama3-8b", {"num_retained": 256, "num_skipped": 320}, 0.60),
        ("cos-llama3-8b", {}, 0.25),
    ],
)
def test_presets_reproduce_the_paper_flops_column(preset, overrides, paper):
    p = F.PAPER_SHAPES[preset]
    cfg = SkipVisionConfig(**{**p.skip_vision.to_dict(), **overrides})
    assert p.paper_ratio(cfg) == paper
    result = F.compare(p.shape, cfg, text_tokens=F.DEFAULT_TEXT_TOKENS)
    assert abs(result["ratio"] - paper) <= 0.03, result["ratio"]


def test_flops_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "skipvision", "flops", "--preset", "cos-llama3-8b", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out)
    assert data["vanilla_flops"] > data["skip_vision_flops"] > 0
    assert data["ratio"] == pytest.approx(data["skip_vision_flops"] / data["vanilla_flops"])


def test_decode_context_and_kv_bytes():
    p = F.PAPER_SHAPES["llava-llama3-8b"]
    rep = F.report(p.shape, p.skip_vision, text_tokens=16, new_tokens=2)
    assert rep["kv_cache_entries_after_prefill"] == rep["attention_length"] - 156
    assert F.kv_cache_bytes(p.shape, 1) == 2 * 32 * 8 * 128 * 2
    assert torch.tensor(0).item() == 0


def test_anyres_presets_scale_with_tiles():
    """Vanilla's language-model cost grows with every tile; Skip-Vision's stays at N_r + 2 full + N_s skipped."""
    p = F.PAPER_SHAPES["llava-next-llama3-8b"]
    results = [F.compare(p.shape_for(t), p.skip_vision, text_tokens=16) for t in (1, 2, 4, 8)]
    assert len({r["skip_vision_flops"] for r in results}) == 1
    assert [r["ratio"] for r in results] == sorted((r["ratio"] for r in results), reverse=True)
    shape = p.shape_for(4)  # 2x2 grid of 24x24-token tiles: 48 newline rows in the vanilla model
    assert shape.native_tokens == 576 * 5 + 48 and shape.eligible == 576 and shape.towers_per_image == 5
    assert F.PAPER_SHAPES["llava-hd-llama3-8b"].shape_for(4).native_tokens == 576 * 5
    with pytest.raises(ValueError, match="no tiles"):
        F.PAPER_SHAPES["llava-llama3-8b"].shape_for(2)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_tower_flops_match_flop_counter(preset):
    """The analytic Qwen-VL tower (patch embedding, blocks, merger and Qwen3's deepstack mergers) counts exactly
    what FlopCounterMode counts for one non-square image."""
    from dataclasses import replace as dc_replace

    from skipvision.harness.presets import MODEL_PRESETS, build_model, build_tokenizer, tokenizer_corpus

    spec = dc_replace(MODEL_PRESETS[preset], text_hidden=64, text_intermediate=128, text_layers=1)
    model = build_model(spec, build_tokenizer(tokenizer_corpus(), family=spec.family)).eval()
    grid = torch.tensor([[1, 8, 12]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * spec.patch_size**2)
    with torch.no_grad():
        measured, _ = measure.measured_flops(lambda: model.model.get_image_features(pixels, grid))
    family = skipvision.family_of(model.config)
    tower, projector = family.tower_flops(model.config, 1, {"image_grid_thw": grid})
    assert tower + projector == measured


def test_flops_cli_in_place_layout_and_fraction():
    """--layout inplace skips the non-retained share in place (no merge, no summaries): more FLOPs than the full
    layout's merge at the same retained fraction, less than vanilla."""

    def run(*extra):
        cmd = [sys.executable, "-m", "skipvision", "flops", "--preset", "qwen2.5-vl-7b-448", "--json", *extra]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    full, in_place = run(), run("--layout", "inplace", "--num-retained", "0.25")
    assert in_place["config"] == skipvision.in_place_config(0.25).to_dict()
    assert full["ratio"] < in_place["ratio"] < 1
