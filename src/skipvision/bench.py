"""Side-by-side latency / memory benchmark: vanilla vs Skip-Vision without Skip KV-cache vs Skip-Vision.

All three variants share the same weights and inputs (built by the family's own processor from synthetic images)
and are measured in one run, with warm-up, repetitions and medians. Timed: prefill (time to first token, vision
tower included), decode time per token, end-to-end ``generate`` of a fixed number of new tokens (EOS disabled),
and a training step (forward + backward + AdamW). Also reported: KV-cache bytes after prefill, peak CUDA memory
(on a GPU), analytic FLOPs of the exact batch and achieved FLOP/s. For anyres families (LLaVA-NeXT, OneVision)
the image size sets the tile count, so the same run can show how cost grows with resolution.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from . import flops as F
from .api import configure_processor, convert, family_of
from .config import SkipVisionConfig, vanilla_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORDS = "what color shape is the left right small large count how many square circle triangle".split()


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4)
    dtypes: tuple[str, ...] = ("fp32",)
    tiles: tuple[int, ...] = (0,)  # anyres tile counts to measure (0 = the tower's own image size, no tiling)
    image_size: int = 336  # image side for dynamic-resolution towers (Qwen-VL), which have no size of their own
    new_tokens: int = 16
    text_tokens: int = 24  # prompt words around the image
    warmup: int = 1
    repeats: int = 3
    train: bool = True
    freeze_tower: bool = False  # train the language model and projector only (the usual fine-tuning recipe)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def variants(skip: SkipVisionConfig) -> dict[str, SkipVisionConfig]:
    return {
        "vanilla": vanilla_config(),
        "skip_vision_no_kv": replace(skip, skip_kv_cache=False),
        "skip_vision": replace(skip, skip_kv_cache=True),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def median_seconds(fn: Callable[[], Any], settings: BenchSettings) -> float:
    for _ in range(settings.warmup):
        fn()
    times = []
    for _ in range(settings.repeats):
        _sync(settings.device)
        start = time.perf_counter()
        fn()
        _sync(settings.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_size_for_tiles(config: Any, tiles: int, default: int = 336) -> tuple[int, int]:
    """(width, height) of an image that the anyres processor splits into ``tiles`` tiles (0: the tower's size;
    ``default`` for dynamic-resolution towers, which have none)."""
    side = getattr(config.vision_config, "image_size", None) or default
    if tiles == 0:
        return side, side
    for height, width in getattr(config, "image_grid_pinpoints", None) or []:
        if (height // side) * (width // side) == tiles:
            return width, height
    raise ValueError(f"no anyres grid of {tiles} tiles in this model's image_grid_pinpoints")


def make_inputs(
    processor: ProcessorMixin,
    batch: int,
    text_tokens: int,
    image_size: tuple[int, int],
    device: str,
    dtype: torch.dtype,
    image_marker: str = "<image>",
) -> dict[str, torch.Tensor]:
    """A batch of prompts (words, one image, words) expanded by ``processor``; random pixels; labels on text."""
    rng = np.random.default_rng(0)
    before = text_tokens // 3
    texts = []
    for _ in range(batch):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), text_tokens)]
        texts.append(" ".join(words[:before]) + f" {image_marker} " + " ".join(words[before:]))
    width, height = image_size
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(batch)]
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_id, -100)
    inputs["labels"] = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    out = {k: v.to(device) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def model_bytes(model: PreTrainedModel) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def kv_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


PHASES = ("inference", "train")


def measure(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    settings: BenchSettings,
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    """Time ``phases`` of one model: "inference" (prefill, generate, decode step, KV bytes), "train" (a step)."""
    prompt = {k: v for k, v in inputs.items() if k != "labels"}
    text_config = model.config.get_text_config()
    gen_kwargs = dict(
        do_sample=False,
        pad_token_id=text_config.pad_token_id or 0,
        suppress_tokens=[family_of(model).image_token_id(model.config)],
    )
    result: dict[str, Any] = {}
    model.eval()
    # the other variants' models stay on the device between interleaved rounds: not this model's memory
    others = torch.cuda.memory_allocated() - model_bytes(model) if settings.device.startswith("cuda") else 0
    with torch.no_grad():
        if "inference" in phases:
            result.update(_inference(model, prompt, settings, gen_kwargs, others))
    if settings.train and "train" in phases:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(**inputs, use_cache=False).loss.backward()
            optimizer.step()

        if settings.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result["train_step_seconds"] = median_seconds(step, settings)
        if settings.device.startswith("cuda"):
            result["peak_train_memory_bytes"] = torch.cuda.max_memory_allocated() - others
        del optimizer
        model.eval()
    return result


def _inference(model: PreTrainedModel, prompt: dict, settings: BenchSettings, gen_kwargs: dict, others: int) -> dict:
    result: dict[str, Any] = {}
    cache = model(**prompt, use_cache=True, logits_to_keep=1).past_key_values
    result["kv_cache_bytes"] = kv_cache_bytes(cache)
    del cache
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result["prefill_seconds"] = median_seconds(lambda: model(**prompt, use_cache=True, logits_to_keep=1), settings)
    n = settings.new_tokens
    result["generate_seconds"] = median_seconds(
        lambda: model.generate(**prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, **gen_kwargs), settings
    )
    result["decode_seconds_per_token"] = decode_seconds_per_token(model, prompt, settings)
    if settings.device.startswith("cuda"):
        result["peak_inference_memory_bytes"] = torch.cuda.max_memory_allocated() - others
    return result


def decode_seconds_per_token(model: PreTrainedModel, prompt: dict[str, torch.Tensor], settings: BenchSettings):
    """Median time of one greedy decode step (model forward with the cache), timed over ``new_tokens`` steps that
    start from one prefilled cache (copied, untimed, for each repeat); None if too small to resolve."""
    prefill = model(**prompt, use_cache=True, logits_to_keep=1)
    first = prefill.logits[:, -1:].argmax(-1)

    def steps(cache) -> None:
        mask, token = prompt["attention_mask"], first
        for _ in range(settings.new_tokens):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    times = []
    for i in range(settings.warmup + settings.repeats):
        cache = copy.deepcopy(prefill.past_key_values)
        _sync(settings.device)
        start = time.perf_counter()
        steps(cache)
        _sync(settings.device)
        if i >= settings.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times) / settings.new_tokens
    return seconds if seconds > 0 else None  # a clock that cannot resolve it gives None, never 0


RATIO_KEYS = (
    "prefill_seconds",
    "decode_seconds_per_token",
    "generate_seconds",
    "train_step_seconds",
    "kv_cache_bytes",
    "prefill_flops",
    "train_flops",
)


def measure_interleaved(
    built: dict[str, tuple[PreTrainedModel, dict[str, torch.Tensor]]], settings: BenchSettings
) -> dict[str, dict[str, Any]]:
    """:func:`measure` for several (model, inputs) at once, in interleaved rounds: phase by phase (all inference
    rounds, then all training rounds), each round times every model once after its warm-up, so a drift in the
    machine's speed hits all of them alike instead of whichever ran last. Times are medians over the rounds."""
    one = replace(settings, repeats=1)
    results: dict[str, dict[str, Any]] = {name: {} for name in built}
    for phase in PHASES:
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in built}
        for _ in range(settings.repeats):
            for name, (model, inputs) in built.items():
                samples[name].append(measure(model, inputs, one, (phase,)))
        for name, row in results.items():
            for key, first in samples[name][0].items():
                values = [sample[key] for sample in samples[name]]
                timed = key.endswith("seconds") or key.endswith("per_token")
                row[key] = median_or_none(values) if timed else first
    return results


def run(
    base: PreTrainedModel, processor: ProcessorMixin, skip: SkipVisionConfig, settings: BenchSettings
) -> list[dict[str, Any]]:
    """Benchmark every (dtype, tiles, batch, variant); rows carry ratios against vanilla of the same setting."""
    torch.manual_seed(0)
    rows = []
    for dtype_name in settings.dtypes:
        dtype = DTYPES[dtype_name]
        for tiles in settings.tiles:
            image_size = image_size_for_tiles(base.config, tiles, settings.image_size)
            for batch in settings.batch_sizes:
                measured, built = {}, {}
                for name, cfg in variants(skip).items():
                    model = convert(copy.deepcopy(base), cfg).to(settings.device, dtype)
                    variant_processor = configure_processor(copy.deepcopy(processor), cfg, base.config)
                    inputs = make_inputs(
                        variant_processor,
                        batch,
                        settings.text_tokens,
                        image_size,
                        settings.device,
                        dtype,
                        family_of(base).image_prompt(variant_processor, base.config),
                    )
                    if settings.freeze_tower:
                        family_of(model).vision_tower(model).requires_grad_(False)
                    analytic = F.batch_flops(model, inputs, train_tower=not settings.freeze_tower)
                    built[name] = (model, inputs)
                    measured[name] = {
                        "variant": name,
                        "batch": batch,
                        "dtype": dtype_name,
                        "tiles": tiles,
                        "image_size": list(image_size),
                        "device": settings.device,
                        "attention": model.config.get_text_config()._attn_implementation,
                        "sequence_length": int(inputs["input_ids"].shape[1]),
                        "prefill_flops": analytic["prefill"],
                        "train_flops": analytic["train"],
                    }
                for name, timing in measure_interleaved(built, settings).items():
                    measured[name].update(timing)
                del built
                if settings.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                vanilla = measured["vanilla"]
                for row in measured.values():
                    for key in RATIO_KEYS:
                        if row.get(key) is not None and vanilla.get(key):
                            row[f"{key}_ratio"] = row[key] / vanilla[key]
                    if row.get("train_step_seconds"):
                        row["train_tflops_per_second"] = row["train_flops"] / row["train_step_seconds"] / 1e12
                    row["prefill_tflops_per_second"] = row["prefill_flops"] / row["prefill_seconds"] / 1e12
                    rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    tiled = any(r.get("tiles") for r in rows)
    head = (
        "dtype",
        *(("tiles",) if tiled else ()),
        "B",
        "variant",
        "seq",
        "prefill ms",
        "x",
        "prefill flops x",
        "decode ms/tok",
        "x",
        "generate ms",
        "x",
        "train ms",
        "x",
        "train flops x",
        "KV MiB",
        "x",
        "train TF/s",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    ms = lambda v: f"{1e3 * v:.1f}" if v is not None else "-"  # noqa: E731
    rx = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for r in rows:
        lines.append(
            " | ".join(
                [
                    r["dtype"],
                    *((str(r["tiles"]),) if tiled else ()),
                    str(r["batch"]),
                    r["variant"],
                    str(r["sequence_length"]),
                    ms(r["prefill_seconds"]),
                    rx(r.get("prefill_seconds_ratio")),
                    rx(r.get("prefill_flops_ratio")),
                    ms(r["decode_seconds_per_token"]),
                    rx(r.get("decode_seconds_per_token_ratio")),
                    ms(r["generate_seconds"]),
                    rx(r.get("generate_seconds_ratio")),
                    ms(r.get("train_step_seconds")),
                    rx(r.get("train_step_seconds_ratio")),
                    rx(r.get("train_flops_ratio")),
                    f"{r['kv_cache_bytes'] / 2**20:.2f}",
                    rx(r.get("kv_cache_bytes_ratio")),
                    f"{r['train_tflops_per_second']:.3f}" if r.get("train_tflops_per_second") else "-",
                ]
            )
        )
    return "\n".join("| " + line + " |" for line in lines)


def scaling_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How prefill and training cost grow with tiles: per (dtype, batch), the growth from the fewest to each tile
    count, Skip-Vision's growth as a fraction of vanilla's, in analytic FLOPs and measured time."""
    out = []
    keys = {(r["dtype"], r["batch"]) for r in rows}
    for dtype, batch in sorted(keys):
        group = {(r["variant"], r["tiles"]): r for r in rows if r["dtype"] == dtype and r["batch"] == batch}
        tiles = sorted({t for _, t in group})
        if len(tiles) < 2:
            continue
        first = tiles[0]
        for t in tiles[1:]:
            entry = {"dtype": dtype, "batch": batch, "from_tiles": first, "to_tiles": t}
            for key in ("prefill_flops", "prefill_seconds", "train_flops", "train_step_seconds"):
                grow = {
                    v: group[(v, t)].get(key, 0) - group[(v, first)].get(key, 0)
                    for v in ("vanilla", "skip_vision")
                    if group[(v, t)].get(key) is not None
                }
                if grow.get("vanilla"):
                    entry[f"{key}_growth_ratio"] = grow.get("skip_vision", float("nan")) / grow["vanilla"]
            out.append(entry)
    return out
