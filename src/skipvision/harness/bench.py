"""Side-by-side latency / memory benchmark: vanilla vs Skip-Vision without Skip KV-cache vs Skip-Vision.

All three variants share the same weights and inputs (built by the family's own processor from synthetic images)
and are measured in one run, with warm-up, repetitions and medians; each round takes one sample of every variant,
quantity by quantity, so compared samples are seconds apart. Timed: prefill (time to first token, vision tower
included), decode time per token, end-to-end ``generate`` of a fixed number of new tokens (EOS disabled), and a
training step (forward + backward + AdamW, fused as HF ``Trainer`` runs it). Also reported: KV-cache bytes after
prefill, peak CUDA memory (on a GPU), analytic FLOPs of the exact batch and achieved FLOP/s. For anyres families
(LLaVA-NeXT, OneVision) the image size sets the tile count, so the same run can show how cost grows with
resolution.
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

from ..api import configure_processor, convert, family_of
from ..config import SkipVisionConfig, vanilla_config
from . import measure
from .options import MIN_IMAGE_SIZE, int_at_least, non_negative_int, option, positive_int, torch_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: where the bench (and the latency protocol) runs unless told: the GPU when there is one
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORDS = "what color shape is the left right small large count how many square circle triangle".split()


@dataclass
class BenchSettings:
    """One benchmark; each field with help text is also a ``skipvision bench`` option (``options.py``)."""

    batch_sizes: tuple[int, ...] = option((1, 4), type=positive_int, nargs="+", help="batch sizes to measure")
    dtypes: tuple[str, ...] = option(("fp32",), nargs="+", choices=["fp32", "bf16"], help="dtypes to measure")
    tiles: tuple[int, ...] = option(
        (0,),
        type=non_negative_int,
        nargs="+",
        help="anyres families: tile counts to measure (image sized to give them); 0 = no tiling",
    )
    image_size: int = option(
        336, type=int_at_least(MIN_IMAGE_SIZE), help="image side for dynamic-resolution towers (Qwen-VL)"
    )
    new_tokens: int = option(16, type=positive_int, help="decode steps per generate / decode timing")
    text_tokens: int = 24  # prompt words around the image
    warmup: int = option(1, type=non_negative_int, help="untimed warm-up repetitions")
    repeats: int = option(
        3, type=positive_int, help="timed rounds, the variants interleaved in each (the median is reported)"
    )
    train: bool = option(True, flag="--no-train", negate=True, help="skip the training-step timing")
    freeze_tower: bool = option(False, help="train step: the vision tower frozen (LLM + projector trained)")
    device: str = option(DEFAULT_DEVICE, type=torch_device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def variants(skip: SkipVisionConfig) -> dict[str, SkipVisionConfig]:
    return {
        "vanilla": vanilla_config(),
        "skip_vision_no_kv": replace(skip, skip_kv_cache=False),
        "skip_vision": replace(skip, skip_kv_cache=True),
    }


def sync_device(device: str) -> None:
    """Wait for the device's queued work (a GPU's), so a clock reads what the work took."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn()`` takes on ``device``, its queued work included."""
    sync_device(device)
    start = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - start


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


#: a sampler: one timed sample of some quantities (seconds by name), its untimed setup excluded
Sampler = Callable[[], dict[str, float]]


def trainer_optimizer(model: PreTrainedModel) -> torch.optim.Optimizer:
    """The optimizer of a timed training step: AdamW as HF ``Trainer`` (so ``skipvision train``) runs it by default
    with torch >= 2.8 (``adamw_torch_fused``), so the timed step is the step users' runs take."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)


class ModuleClock:
    """Time spent inside groups of modules during the forwards run under it (forward hooks, removed on exit):
    ``seconds[part]`` sums the calls of every module of that part. The bench splits a prefill into the vision tower,
    identical in every variant, and the rest, which Skip-Vision changes."""

    def __init__(self, parts: dict[str, list[torch.nn.Module]], device: str) -> None:
        self.parts, self.device = parts, device
        self.seconds = dict.fromkeys(parts, 0.0)
        self._starts: dict[str, list[float]] = {part: [] for part in parts}

    def _enter(self, part: str) -> None:
        sync_device(self.device)
        self._starts[part].append(time.perf_counter())

    def _exit(self, part: str) -> None:
        sync_device(self.device)
        self.seconds[part] += time.perf_counter() - self._starts[part].pop()

    def __enter__(self) -> ModuleClock:
        self._handles = []
        for part, modules in self.parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(lambda *_, part=part: self._enter(part)))
                self._handles.append(module.register_forward_hook(lambda *_, part=part: self._exit(part)))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()


def _inference_samplers(
    model: PreTrainedModel, prompt: dict[str, torch.Tensor], prefilled: Any, settings: BenchSettings
) -> list[Sampler]:
    """Samplers of prefill, generate and decode steps; ``prefilled`` is one untimed prefill, whose cache seeds the
    decode steps."""
    text_config = model.config.get_text_config()
    n = settings.new_tokens
    gen_kwargs = dict(
        do_sample=False,
        pad_token_id=text_config.pad_token_id or 0,
        suppress_tokens=[family_of(model).image_token_id(model.config)],
        max_new_tokens=n + 1,
        min_new_tokens=n + 1,
    )
    first = prefilled.logits[:, -1:].argmax(-1)
    tower = {"tower": [family_of(model).vision_tower(model)]}

    def prefill() -> dict[str, float]:
        with ModuleClock(tower, settings.device) as clock:
            seconds = timed(lambda: model(**prompt, use_cache=True, logits_to_keep=1), settings.device)
        return {"prefill_seconds": seconds, "prefill_tower_seconds": clock.seconds["tower"]}

    def generate() -> dict[str, float]:
        return {"generate_seconds": timed(lambda: model.generate(**prompt, **gen_kwargs), settings.device)}

    def decode() -> dict[str, float]:
        """``new_tokens`` greedy decode steps from a copy (untimed) of one prefilled cache, per step."""
        cache = copy.deepcopy(prefilled.past_key_values)
        mask, token = prompt["attention_mask"], first

        def steps() -> None:
            nonlocal mask, token
            for _ in range(n):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)

        return {"decode_seconds_per_token": timed(steps, settings.device) / n}

    return [prefill, generate, decode]


def _train_sampler(model: PreTrainedModel, inputs: dict[str, torch.Tensor], settings: BenchSettings) -> Sampler:
    def sample() -> dict[str, float]:
        """One optimizer step (forward, backward, AdamW) after an untimed one that allocates the optimizer state;
        the optimizer lives for this sample only, so the variants never hold their states at once."""
        optimizer = trainer_optimizer(model)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(**inputs, use_cache=False).loss.backward()
            optimizer.step()

        step()
        seconds = timed(step, settings.device)
        optimizer.zero_grad(set_to_none=True)
        return {"train_step_seconds": seconds}

    return sample


def measure_interleaved(
    built: dict[str, tuple[PreTrainedModel, dict[str, torch.Tensor]]],
    settings: BenchSettings,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several (model, inputs) side by side: KV-cache bytes after prefill, then each timed quantity in turn
    (prefill with its tower time, generate, decode step, training step) in ``repeats`` rounds that take one sample
    of every model, so the samples compared are seconds apart and a drift in the machine's speed hits all models
    alike. Medians over the rounds (a duration too short for the clock gives None, never 0); on CUDA, the peak
    memory of inference and of a training step, net of the other models on the device. ``log`` gets a line per
    sample taken (a large batch can take minutes per sample: the run is never silent for long)."""
    cuda = settings.device.startswith("cuda")
    quantities = ("prefill", "generate", "decode")
    results: dict[str, dict[str, Any]] = {name: {} for name in built}

    def logged(name: str, sampler: Sampler, memory_key: str, what: str) -> dict[str, float]:
        model, start = built[name][0], time.perf_counter()
        # the other models stay on the device between rounds: not this model's memory
        others = torch.cuda.memory_allocated() - model_bytes(model) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sample = sampler()
        if cuda:
            peak = torch.cuda.max_memory_allocated() - others
            results[name][memory_key] = max(results[name].get(memory_key, 0), peak)
        if log is not None:
            log(f"  {what} {name}: {time.perf_counter() - start:.1f} s")
        return sample

    def rounds(samplers: dict[str, list[Sampler]], memory_key: str, labels: tuple[str, ...]) -> None:
        for index in range(len(next(iter(samplers.values())))):
            for name, own in samplers.items():
                for w in range(settings.warmup):
                    logged(name, own[index], memory_key, f"{labels[index]} warm-up {w + 1}/{settings.warmup}")
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in samplers}
            for r in range(settings.repeats):
                for name, own in samplers.items():
                    samples[name].append(
                        logged(name, own[index], memory_key, f"{labels[index]} round {r + 1}/{settings.repeats}")
                    )
            for name, taken in samples.items():
                for key in taken[0]:
                    values = [sample[key] for sample in taken]
                    median = statistics.median(values)
                    results[name][key] = median if median > 0 else None
                    results[name].setdefault("rounds", {})[key] = values

    with torch.no_grad():
        samplers = {}
        for name, (model, inputs) in built.items():
            model.eval()
            prompt = {k: v for k, v in inputs.items() if k != "labels"}
            prefilled = model(**prompt, use_cache=True, logits_to_keep=1)
            results[name]["kv_cache_bytes"] = kv_cache_bytes(prefilled.past_key_values)
            samplers[name] = _inference_samplers(model, prompt, prefilled, settings)
        rounds(samplers, "peak_inference_memory_bytes", quantities)
    if settings.train:
        for model, _ in built.values():
            model.train()
        rounds(
            {name: [_train_sampler(model, inputs, settings)] for name, (model, inputs) in built.items()},
            "peak_train_memory_bytes",
            ("train step",),
        )
        for model, _ in built.values():
            model.eval()
    return results


RATIO_KEYS = (
    "prefill_seconds",
    "decode_seconds_per_token",
    "generate_seconds",
    "train_step_seconds",
    "kv_cache_bytes",
    "prefill_flops",
    "train_flops",
    "prefill_without_tower_seconds",
    "prefill_language_model_flops",
)


def build_variant(
    base: PreTrainedModel,
    processor: ProcessorMixin,
    cfg: SkipVisionConfig,
    settings: BenchSettings,
    batch: int,
    image_size: tuple[int, int],
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """One variant of the bench: a copy of ``base`` converted to ``cfg`` on the bench's device and dtype, and its
    batch of ``batch`` prompts, built by the processor set up for ``cfg``."""
    model = convert(copy.deepcopy(base), cfg).to(settings.device, dtype)
    variant_processor = configure_processor(copy.deepcopy(processor), cfg, base.config)
    marker = family_of(base).image_prompt(variant_processor, base.config)
    inputs = make_inputs(variant_processor, batch, settings.text_tokens, image_size, settings.device, dtype, marker)
    return model, inputs


def check_settings(settings: BenchSettings) -> None:
    """Refuse settings that measure nothing or fail deep inside a run, by name."""
    for name in ("new_tokens", "repeats", "text_tokens"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {settings.warmup}")
    for name in ("batch_sizes", "dtypes", "tiles"):
        if not getattr(settings, name):
            raise ValueError(f"{name} is empty: nothing to measure")
    if any(b < 1 for b in settings.batch_sizes) or any(t < 0 for t in settings.tiles):
        raise ValueError(f"batch sizes must be >= 1 and tiles >= 0, got {settings.batch_sizes}, {settings.tiles}")
    unknown = sorted(set(settings.dtypes) - set(DTYPES))
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")


def run(
    base: PreTrainedModel,
    processor: ProcessorMixin,
    skip: SkipVisionConfig | None,
    settings: BenchSettings,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (dtype, tiles, batch, variant); rows carry ratios against vanilla of the same setting.
    ``log`` gets a line per setting and per timed sample (progress; the CLI prints it to stderr)."""
    if skip is None:
        raise ValueError("the bench measures a Skip-Vision setting against vanilla; give one (not None)")
    check_settings(settings)
    torch.manual_seed(0)
    clock = time.perf_counter()
    rows = []
    for dtype_name in settings.dtypes:
        dtype = DTYPES[dtype_name]
        for tiles in settings.tiles:
            image_size = image_size_for_tiles(base.config, tiles, settings.image_size)
            for batch in settings.batch_sizes:
                if log is not None:
                    log(
                        f"bench {dtype_name}, tiles {tiles}, batch {batch}: building the 3 variants "
                        f"({time.perf_counter() - clock:.0f} s so far)"
                    )
                measured, built = {}, {}
                for name, cfg in variants(skip).items():
                    model, inputs = build_variant(base, processor, cfg, settings, batch, image_size, dtype)
                    if settings.freeze_tower:
                        family_of(model).vision_tower(model).requires_grad_(False)
                    analytic = measure.batch_flops(model, inputs, train_tower=not settings.freeze_tower)
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
                        "prefill_language_model_flops": analytic["prefill_language_model"],
                        "train_flops": analytic["train"],
                    }
                for name, timing in measure_interleaved(built, settings, log).items():
                    measured[name].update(timing)
                    # the part of the prefill that Skip-Vision changes: all but the tower, which every variant runs
                    # alike (time including the embedding, selection and cache pruning; FLOPs of the language model)
                    tower = timing.get("prefill_tower_seconds") or 0.0
                    measured[name]["prefill_without_tower_seconds"] = timing["prefill_seconds"] - tower
                del built
                if settings.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                vanilla = measured["vanilla"]
                for row in measured.values():
                    for key in RATIO_KEYS:
                        if row.get(key) is not None and vanilla.get(key):
                            row[f"{key}_ratio"] = row[key] / vanilla[key]
                    for key in ("prefill_seconds", "train_step_seconds"):
                        rounds, vanilla_rounds = row.get("rounds", {}), vanilla.get("rounds", {})
                        spread = round_ratio_quartiles(rounds.get(key), vanilla_rounds.get(key))
                        if spread is not None and row is not vanilla:
                            row[f"{key}_ratio_quartiles"] = spread
                    if row.get("train_step_seconds"):
                        row["train_tflops_per_second"] = row["train_flops"] / row["train_step_seconds"] / 1e12
                    row["prefill_tflops_per_second"] = row["prefill_flops"] / row["prefill_seconds"] / 1e12
                    rows.append(row)
    return rows


def round_ratio_quartiles(samples: list[float] | None, vanilla: list[float] | None) -> list[float] | None:
    """First and third quartiles of the per-round ratios (each round's sample over vanilla's of the same round, taken
    seconds apart): how far one run's ratio moves with the machine's noise. None below 4 rounds."""
    if not samples or not vanilla or len(samples) != len(vanilla) or len(samples) < 4:
        return None
    ratios = [a / b for a, b in zip(samples, vanilla, strict=True) if b > 0]
    if len(ratios) < 4:
        return None
    first, _, third = statistics.quantiles(ratios, n=4)
    return [first, third]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side was too small to measure."""
    return a / b if a is not None and b else None


def format_table(rows: list[dict[str, Any]]) -> str:
    tiled = any(r.get("tiles") for r in rows)
    head = (
        "dtype",
        *(("tiles",) if tiled else ()),
        "B",
        "variant",
        "seq",
        "prefill ms",
        "x (q1-q3)",
        "prefill flops x",
        "tower ms",
        "rest x",
        "LM flops x",
        "decode ms/tok",
        "x",
        "generate ms",
        "x",
        "train ms",
        "x (q1-q3)",
        "train flops x",
        "KV MiB",
        "x",
        "train TF/s",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    ms = lambda v: f"{1e3 * v:.1f}" if v is not None else "-"  # noqa: E731
    rx = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    spread = lambda q: f" ({q[0]:.2f}-{q[1]:.2f})" if q else ""  # noqa: E731
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
                    rx(r.get("prefill_seconds_ratio")) + spread(r.get("prefill_seconds_ratio_quartiles")),
                    rx(r.get("prefill_flops_ratio")),
                    ms(r.get("prefill_tower_seconds")),
                    rx(r.get("prefill_without_tower_seconds_ratio")),
                    rx(r.get("prefill_language_model_flops_ratio")),
                    ms(r["decode_seconds_per_token"]),
                    rx(r.get("decode_seconds_per_token_ratio")),
                    ms(r["generate_seconds"]),
                    rx(r.get("generate_seconds_ratio")),
                    ms(r.get("train_step_seconds")),
                    rx(r.get("train_step_seconds_ratio")) + spread(r.get("train_step_seconds_ratio_quartiles")),
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


def count_variant_ops(
    base: PreTrainedModel, processor: ProcessorMixin, skip: SkipVisionConfig, settings: BenchSettings
) -> list[dict[str, Any]]:
    """``--count-ops``: aten ops and host syncs (``skipvision.opcount``) of a prefill, a decode step and a training
    step of every variant, on the bench's batches (first dtype and tile count). Deterministic: what the same code
    launches on a GPU, counted wherever it runs."""
    from .opcount import count_model_ops

    check_settings(settings)
    dtype_name, tiles = settings.dtypes[0], settings.tiles[0]
    dtype = DTYPES[dtype_name]
    image_size = image_size_for_tiles(base.config, tiles, settings.image_size)
    rows = []
    for batch in settings.batch_sizes:
        for name, cfg in variants(skip).items():
            model, inputs = build_variant(base, processor, cfg, settings, batch, image_size, dtype)
            inputs.pop("labels")
            counts = count_model_ops(model, inputs, train=settings.train)
            rows.append({"variant": name, "batch": batch, "dtype": dtype_name, "tiles": tiles, **counts})
            del model
    return rows


def format_op_counts(rows: list[dict[str, Any]], layers: int) -> str:
    """Markdown table of ``count_variant_ops`` rows, each with its difference to vanilla at the same batch."""
    phases = [p for p in ("prefill", "decode", "train") if p in rows[0]]
    head = ["B", "variant"] + [f"{p} {k}" for p in phases for k in ("ops", "syncs")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        vanilla = next(r for r in rows if r["variant"] == "vanilla" and r["batch"] == row["batch"])
        cells = [str(row["batch"]), row["variant"]]
        for phase in phases:
            for key in ("ops", "syncs"):
                value, delta = row[phase][key], row[phase][key] - vanilla[phase][key]
                cells.append(f"{value}" if row is vanilla else f"{value} ({delta:+d})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"(ops: kernel-launching aten ops; syncs: host waits for the device; {layers} decoder layers)")
    return "\n".join(lines)
