"""Side-by-side latency / memory benchmark: vanilla vs Skip-Vision without Skip KV-cache vs Skip-Vision.

All three variants share the same weights and inputs and are measured in one run, with warm-up, repetitions and
medians. Timed: prefill (time to first token, vision tower included), decode time per token, end-to-end
``generate`` of a fixed number of new tokens (EOS disabled), and a training step (forward + backward + AdamW).
Also reported: KV-cache bytes after prefill, peak CUDA memory (on a GPU), analytic FLOPs and achieved FLOP/s.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from . import flops as F
from .config import SkipVisionConfig, vanilla_config
from .llava import SkipVisionLlavaForConditionalGeneration, convert, num_visual_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4)
    dtypes: tuple[str, ...] = ("fp32",)
    new_tokens: int = 16
    text_tokens: int = 24  # prompt text around the image
    warmup: int = 1
    repeats: int = 3
    train: bool = True
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def variants(skip: SkipVisionConfig, visual_tokens: int) -> dict[str, SkipVisionConfig]:
    return {
        "vanilla": vanilla_config(visual_tokens),
        "skip_vision_no_kv": replace(skip, skip_kv_cache=False),
        "skip_vision": replace(skip, skip_kv_cache=True),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def make_inputs(model: SkipVisionLlavaForConditionalGeneration, batch: int, text_tokens: int, device: str):
    """A batch of identical-layout prompts: BOS, text, one image, text; random pixels; labels on the text."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    vocab = cfg.text_config.vocab_size
    image_id = cfg.image_token_id
    before = text_tokens // 3
    text_ids = torch.tensor([t for t in range(5, vocab) if t != image_id])
    pick = lambda n: text_ids[torch.randint(0, len(text_ids), (batch, n), generator=g)]  # noqa: E731
    ids = torch.cat([
        torch.full((batch, 1), cfg.text_config.bos_token_id or 1),
        pick(before),
        torch.full((batch, model.skip_vision_config.num_image_tokens), image_id),
        pick(text_tokens - before),
    ], dim=1)
    vision = cfg.vision_config
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=g)
    labels = ids.masked_fill(ids == image_id, -100)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, model.dtype),
        "labels": labels.to(device),
    }


def kv_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def measure(model: SkipVisionLlavaForConditionalGeneration, batch: int, settings: BenchSettings) -> dict[str, Any]:
    inputs = make_inputs(model, batch, settings.text_tokens, settings.device)
    prompt = {k: v for k, v in inputs.items() if k != "labels"}
    gen_kwargs = dict(do_sample=False, pad_token_id=model.config.text_config.pad_token_id or 0,
                      suppress_tokens=[model.config.image_token_id])
    result: dict[str, Any] = {}
    model.eval()
    with torch.no_grad():
        cache = model(**prompt, use_cache=True, logits_to_keep=1).past_key_values
        result["kv_cache_bytes"] = kv_cache_bytes(cache)
        del cache
        if settings.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result["prefill_seconds"] = median_seconds(
            lambda: model(**prompt, use_cache=True, logits_to_keep=1), settings
        )
        n = settings.new_tokens
        one = median_seconds(lambda: model.generate(**prompt, max_new_tokens=1, min_new_tokens=1, **gen_kwargs),
                             settings)
        full = median_seconds(lambda: model.generate(**prompt, max_new_tokens=n + 1, min_new_tokens=n + 1,
                                                     **gen_kwargs), settings)
        result["generate_seconds"] = full
        result["decode_seconds_per_token"] = max(full - one, 0.0) / n
        if settings.device.startswith("cuda"):
            result["peak_inference_memory_bytes"] = torch.cuda.max_memory_allocated()
    if settings.train:
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
            result["peak_train_memory_bytes"] = torch.cuda.max_memory_allocated()
        del optimizer
        model.eval()
    return result


def analytic(model: SkipVisionLlavaForConditionalGeneration, batch: int, settings: BenchSettings) -> dict[str, float]:
    shape = F.shape_of(model.config)
    text = settings.text_tokens + 1
    rep = F.report(shape, model.skip_vision_config, text_tokens=text, images=1, new_tokens=settings.new_tokens)
    vision = sum(rep["vision"].values())
    counts = F.sequence_counts(shape, text, 1, model.skip_vision_config)
    train_lm = rep["train_step_total"]
    return {
        "prefill_flops": batch * (rep["prefill_total"] + vision),
        "decode_flops_per_token": batch * rep["decode_total"] / max(1, settings.new_tokens),
        # trained tower: 3x its forward too (the bench trains every parameter)
        "train_flops": batch * (train_lm + 3 * vision),
        "attention_length": counts.attention_length,
    }


def run(base: LlavaForConditionalGeneration, skip: SkipVisionConfig, settings: BenchSettings) -> list[dict[str, Any]]:
    """Benchmark every (dtype, batch, variant); rows carry ratios against vanilla of the same dtype and batch."""
    torch.manual_seed(0)
    rows = []
    visual = num_visual_tokens(base.config)
    for dtype_name in settings.dtypes:
        for batch in settings.batch_sizes:
            measured = {}
            for name, cfg in variants(skip, visual).items():
                model = convert(copy.deepcopy(base), cfg).to(settings.device, DTYPES[dtype_name])
                row = {"variant": name, "batch": batch, "dtype": dtype_name, "device": settings.device,
                       "attention": model.config.text_config._attn_implementation}
                row.update(measure(model, batch, settings))
                row.update(analytic(model, batch, settings))
                measured[name] = row
                del model
                if settings.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            vanilla = measured["vanilla"]
            for row in measured.values():
                for key in ("prefill_seconds", "decode_seconds_per_token", "generate_seconds", "train_step_seconds",
                            "kv_cache_bytes", "prefill_flops", "train_flops"):
                    if key in row and vanilla.get(key):
                        row[f"{key}_ratio"] = row[key] / vanilla[key]
                if row.get("train_step_seconds"):
                    row["train_tflops_per_second"] = row["train_flops"] / row["train_step_seconds"] / 1e12
                row["prefill_tflops_per_second"] = row["prefill_flops"] / row["prefill_seconds"] / 1e12
                rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("dtype", "B", "variant", "prefill ms", "x", "decode ms/tok", "x", "generate ms", "x",
            "train ms", "x", "flops x", "KV MiB", "x", "train TF/s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    ms = lambda v: f"{1e3 * v:.1f}" if v is not None else "-"  # noqa: E731
    rx = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for r in rows:
        lines.append(" | ".join([
            r["dtype"], str(r["batch"]), r["variant"],
            ms(r["prefill_seconds"]), rx(r.get("prefill_seconds_ratio")),
            ms(r["decode_seconds_per_token"]), rx(r.get("decode_seconds_per_token_ratio")),
            ms(r["generate_seconds"]), rx(r.get("generate_seconds_ratio")),
            ms(r.get("train_step_seconds")), rx(r.get("train_step_seconds_ratio")),
            rx(r.get("train_flops_ratio")),
            f"{r['kv_cache_bytes'] / 2**20:.2f}", rx(r.get("kv_cache_bytes_ratio")),
            f"{r['train_tflops_per_second']:.3f}" if r.get("train_tflops_per_second") else "-",
        ]))
    return "\n".join("| " + line + " |" for line in lines)
