"""One entry per model family: a tiny random model built from configs, its processor, and prompts with images of
different sizes. The parametrised invariant suite (test_families.py) runs on every entry."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

import skipvision
from skipvision import SkipVisionConfig
from skipvision.harness.presets import (
    MODEL_PRESETS,
    QWEN_FAMILIES,
    QWEN_IMAGE,
    build_model,
    build_processor,
    build_tokenizer,
    tokenizer_corpus,
)

# tiny geometry: 56 px tower input / 14 px patches = 16 tokens per pass; anyres grids of 1, 2, 4, 8 tiles
TEST_SIZES = dict(
    image_size=56,
    patch_size=14,
    vision_hidden=32,
    vision_layers=2,
    text_hidden=64,
    text_intermediate=160,
    text_layers=3,
    text_heads=4,
    text_kv_heads=2,
)

FAMILIES = {
    # name: (preset, Skip-Vision config, image sizes (W, H) of the batch)
    "llava": (
        replace(MODEL_PRESETS["tiny"], **TEST_SIZES),
        SkipVisionConfig(num_retained=5, num_skipped=6),
        [(56, 56), (80, 40), (60, 60)],
    ),
    "llava-next": (
        replace(MODEL_PRESETS["tiny-next"], **TEST_SIZES),
        SkipVisionConfig(num_retained=10, num_skipped=20),
        [(112, 112), (100, 60), (56, 50)],
    ),
    "llava-onevision": (
        replace(MODEL_PRESETS["tiny-onevision"], **TEST_SIZES),
        SkipVisionConfig(num_retained=16, num_skipped=20, selection="position"),
        [(112, 112), (100, 60), (56, 50)],
    ),
    # test_llava.py's configurations, folded in: no merge and no summaries, Skip-FFN in a subset of the layers
    "llava-no-merge": (
        replace(MODEL_PRESETS["tiny"], **TEST_SIZES),
        SkipVisionConfig(num_retained=5, num_skipped=11, selection="position", merge="none", summary_tokens=False),
        [(56, 56), (80, 40), (60, 60)],
    ),
    "llava-layer-subset": (
        replace(MODEL_PRESETS["tiny"], **TEST_SIZES),
        SkipVisionConfig(num_retained=4, num_skipped=6, skip_layers=(0, 2)),
        [(56, 56), (80, 40), (60, 60)],
    ),
    "llava-inplace": (
        replace(MODEL_PRESETS["tiny"], **TEST_SIZES),
        SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection="grid"),
        [(56, 56), (80, 40), (60, 60)],
    ),
    "llava-next-inplace": (
        replace(MODEL_PRESETS["tiny-next"], **TEST_SIZES),
        SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection="grid"),
        [(112, 112), (100, 60), (56, 50)],
    ),
}
# Qwen-VL: images of different sizes give different token grids (4x8, 6x6, 8x4 merged tokens at 14 px patches)
QWEN_SIZES = dict(TEST_SIZES, image_size=112)
QWEN_IMAGES = [(112, 56), (84, 84), (56, 112)]
INPLACE = SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection="grid")
for _family, _preset in (("qwen2.5-vl", "tiny-qwen2.5-vl"), ("qwen3-vl", "tiny-qwen3-vl")):
    _sizes = QWEN_SIZES if _family == "qwen2.5-vl" else dict(QWEN_SIZES, image_size=128, patch_size=16)
    _images = QWEN_IMAGES if _family == "qwen2.5-vl" else [(128, 64), (96, 96), (64, 128)]
    FAMILIES[_family] = (
        replace(MODEL_PRESETS[_preset], **_sizes),
        SkipVisionConfig(0.25, 3, selection="grid"),
        _images,
    )
    FAMILIES[f"{_family}-inplace"] = (replace(MODEL_PRESETS[_preset], **_sizes), INPLACE, _images)


@functools.cache
def tokenizer(family: str = "llava"):
    return build_tokenizer(tokenizer_corpus(), family=family if family in QWEN_FAMILIES else "llava")


def image_marker(family: str) -> str:
    return QWEN_IMAGE if FAMILIES[family][0].family in QWEN_FAMILIES else "<image>"


def vanilla_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    preset = FAMILIES[family][0]
    model = build_model(preset, tokenizer(preset.family), seed=seed).to(dtype).eval()
    with torch.no_grad():  # larger random projector so images matter visibly in the logits
        inner = model.model
        projector = inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.visual.merger
        for p in projector.parameters():
            p.mul_(4.0)
    return model


def pair(family: str, cfg: SkipVisionConfig | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(vanilla, Skip-Vision) models with identical weights; the scorer is made non-trivial."""
    cfg = cfg or FAMILIES[family][1]
    vanilla = vanilla_model(family, dtype, seed)
    model = skipvision.convert(copy.deepcopy(vanilla), cfg)
    if model.summary_scorer is not None:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            model.summary_scorer.score.weight.normal_(0, 0.5)
        model.summary_scorer.to(dtype)
    return vanilla, model


def processor(family: str, cfg: SkipVisionConfig | None, model_config=None):
    preset = FAMILIES[family][0]
    proc = build_processor(preset, tokenizer(preset.family))
    proc.tokenizer.padding_side = "left"
    if cfg is not None:
        skipvision.configure_processor(proc, cfg, model_config)
    return proc


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def batch(
    family: str,
    cfg: SkipVisionConfig | None,
    samples: list[tuple[int, str]],
    model_config=None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Left-padded batch; sample = (number of images, text). Images take the family's sizes in turn."""
    proc = processor(family, cfg, model_config)
    sizes = FAMILIES[family][2]
    texts, all_images, k = [], [], 0
    for n, text in samples:
        texts.append(image_marker(family) * n + text)
        for _ in range(n):
            all_images.append(sizes[k % len(sizes)])
            k += 1
    kwargs = {"images": images(all_images, seed)} if all_images else {}
    out = dict(proc(text=texts, padding=True, return_tensors="pt", **kwargs))
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out
