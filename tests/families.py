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
from skipvision.presets import MODEL_PRESETS, build_model, build_processor, build_tokenizer, tokenizer_corpus

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
}


@functools.cache
def tokenizer():
    return build_tokenizer(tokenizer_corpus())


def vanilla_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    preset = FAMILIES[family][0]
    model = build_model(preset, tokenizer(), seed=seed).to(dtype).eval()
    with torch.no_grad():  # larger random projector so images matter visibly in the logits
        for p in model.model.multi_modal_projector.parameters():
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
    proc = build_processor(FAMILIES[family][0], tokenizer())
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
        texts.append("<image>" * n + text)
        for _ in range(n):
            all_images.append(sizes[k % len(sizes)])
            k += 1
    kwargs = {"images": images(all_images, seed)} if all_images else {}
    out = dict(proc(text=texts, padding=True, return_tensors="pt", **kwargs))
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out
