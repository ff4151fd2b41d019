"""Decode latency by the paper's protocol: greedy ``generate`` of a fixed number of new tokens (256), batch 1 and
64, with HF's dynamic cache (eager) and its static cache (which HF compiles on a GPU), vanilla next to Skip-Vision
without and with Skip KV-cache, each variant timed in turn in every round so compared samples are seconds apart.

Reported per variant: milliseconds per decode step, ``(generate(N) - generate(1)) / (N - 1)`` (the prefill and the
first token cancel), the end-to-end ``generate`` time, and ratios against vanilla. ``profile=True`` also records a
``torch.profiler`` table of a few decode steps per variant (device time by op, host syncs and copies), the evidence
for where a decode step's time goes on a GPU.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from ..api import configure_processor, convert, family_of
from ..config import SkipVisionConfig
from .bench import DEFAULT_DEVICE, DTYPES, make_inputs, sync_device, timed, variants

CACHES = ("dynamic", "static")


@dataclass
class LatencySettings:
    batch_sizes: tuple[int, ...] = (1, 64)
    new_tokens: int = 256
    caches: tuple[str, ...] = CACHES
    dtype: str = "bf16"
    text_tokens: int = 24
    image_size: int = 336  # for dynamic-resolution towers (Qwen-VL)
    repeats: int = 3
    profile: bool = False
    device: str = DEFAULT_DEVICE


def check_latency_settings(settings: LatencySettings) -> None:
    if settings.new_tokens < 2:
        raise ValueError(
            f"new_tokens must be at least 2 (a decode step after the first token), got {settings.new_tokens}"
        )
    if settings.repeats < 1 or any(b < 1 for b in settings.batch_sizes) or not settings.batch_sizes:
        raise ValueError("repeats and every batch size must be positive")
    unknown = set(settings.caches) - set(CACHES)
    if unknown or not settings.caches:
        raise ValueError(f"caches must be among {CACHES}, got {sorted(settings.caches)}")
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")


def _generate_seconds(model: PreTrainedModel, inputs: dict[str, torch.Tensor], tokens: int, cache: str, device: str):
    kwargs = dict(
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        suppress_tokens=[family_of(model).image_token_id(model.config)],
        pad_token_id=model.config.get_text_config().pad_token_id or 0,
    )
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        return timed(lambda: model.generate(**inputs, **kwargs), device)


def _profile_decode(model: PreTrainedModel, inputs: dict[str, torch.Tensor], device: str, steps: int = 4) -> str:
    """Device time by op and the host waits of ``steps`` eager decode steps on a prefilled cache."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, token, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), inputs["attention_mask"]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        sync_device(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                token = model(input_ids=token, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
            sync_device(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    waits = [
        e
        for e in prof.key_averages()
        if any(word in e.key for word in ("Synchronize", "Memcpy", "_local_scalar_dense", "aten::item"))
    ]
    lines = [f"{e.key}: {e.count} calls" for e in waits]
    return table + "\nhost waits and copies over the steps:\n" + ("\n".join(lines) or "none")


def run_latency(
    base: PreTrainedModel,
    processor: ProcessorMixin,
    skip: SkipVisionConfig,
    settings: LatencySettings,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{variant, batch, cache, decode_ms_per_token, generate_seconds, ..._ratio}``; ``profile`` rows carry
    the profiler table of their variant."""
    check_latency_settings(settings)
    dtype = DTYPES[settings.dtype]
    side = getattr(base.config.vision_config, "image_size", None) or settings.image_size
    rows: list[dict[str, Any]] = []
    built = {}
    for name, cfg in variants(skip).items():
        model = convert(copy.deepcopy(base), cfg).to(settings.device, dtype).eval()
        variant_processor = configure_processor(copy.deepcopy(processor), cfg, base.config)
        built[name] = (model, variant_processor)
    for batch in settings.batch_sizes:
        inputs = {}
        for name, (model, variant_processor) in built.items():
            marker = family_of(model).image_prompt(variant_processor, model.config)
            made = make_inputs(
                variant_processor, batch, settings.text_tokens, (side, side), settings.device, dtype, marker
            )
            made.pop("labels")
            inputs[name] = made
        for cache in settings.caches:
            samples: dict[str, dict[str, list[float]]] = {name: {"full": [], "one": []} for name in built}
            for round_index in range(settings.repeats + 1):  # the first round warms up (and compiles) every variant
                for name, (model, _) in built.items():
                    full = _generate_seconds(model, inputs[name], settings.new_tokens, cache, settings.device)
                    one = _generate_seconds(model, inputs[name], 1, cache, settings.device)
                    if round_index:
                        samples[name]["full"].append(full)
                        samples[name]["one"].append(one)
                if log is not None:
                    log(f"latency batch {batch}, {cache} cache: round {round_index}/{settings.repeats} done")
            for name in built:
                full = statistics.median(samples[name]["full"])
                one = statistics.median(samples[name]["one"])
                rows.append(
                    {
                        "variant": name,
                        "batch": batch,
                        "cache": cache,
                        "dtype": settings.dtype,
                        "device": settings.device,
                        "new_tokens": settings.new_tokens,
                        "prompt_tokens": int(inputs[name]["input_ids"].shape[1]),
                        "generate_seconds": full,
                        "decode_ms_per_token": 1000 * (full - one) / (settings.new_tokens - 1),
                    }
                )
            vanilla = next(r for r in rows if r["variant"] == "vanilla" and r["batch"] == batch and r["cache"] == cache)
            for row in rows[-len(built) :]:
                for key in ("generate_seconds", "decode_ms_per_token"):
                    row[f"{key}_ratio"] = row[key] / vanilla[key] if vanilla[key] > 0 else None
        if settings.profile:
            for name, (model, _) in built.items():
                table = _profile_decode(model, inputs[name], settings.device)
                rows.append({"variant": name, "batch": batch, "cache": "dynamic", "profile": table})
    return rows


def format_latency(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the timing rows, then each profile."""
    head = "| batch | cache | variant | prompt | decode ms/token | x | generate s | x |"
    lines = [head, "|" + " --- |" * 8]

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in rows:
        if "profile" in r:
            continue
        lines.append(
            f"| {r['batch']} | {r['cache']} | {r['variant']} | {r['prompt_tokens']} | "
            f"{number(r['decode_ms_per_token'], 2)} | {number(r.get('decode_ms_per_token_ratio'), 3)} | "
            f"{number(r['generate_seconds'], 3)} | {number(r.get('generate_seconds_ratio'), 3)} |"
        )
    for r in rows:
        if "profile" in r:
            lines += ["", f"profile: {r['variant']}, batch {r['batch']}, dynamic cache, 4 decode steps", r["profile"]]
    return "\n".join(lines)
