"""``skipvision demo``: the whole story in minutes on a CPU.

Generate the embedded shapes dataset, build a tiny random model of the preset's family (LLaVA-1.5, LLaVA-NeXT for
the SV-LLaVA-HD setting, Qwen2.5-VL / Qwen3-VL), fine-tune a vanilla copy and a Skip-Vision copy (for Qwen-VL one
per layout: in place and full) with the same budget and seed,
evaluate both with ``generate``, measure FLOPs, latency and KV-cache size side by side, and write
``report.json`` plus a trade-off plot (accuracy vs FLOPs, marker size = latency). The peer methods (FastV,
PyramidDrop, VisionZip, ToMe, token drop) join training-free: each applied to the vanilla-trained model at
Skip-Vision's prefill-FLOPs budget (``skipvision compare`` also fine-tunes them and sweeps budgets). Each accuracy
comes with its binomial standard error on the test records, and the Skip-Vision/vanilla difference is called a
difference only when it is larger than 1.96 times the standard error of the difference (``accuracy_difference``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .. import flops as F
from ..api import family_of, from_pretrained, load_processor
from ..config import SkipVisionConfig, in_place_config
from . import measure
from .bench import BenchSettings, make_inputs, measure_interleaved, ratio
from .budgets import METHODS, match_budget, prefill_ratio
from .compare import BATCH1_METHODS, for_family, method_applies
from .data import first_batch, make_dataset, prior_accuracy
from .evaluate import evaluate
from .presets import QWEN_FAMILIES, get_preset, init_model
from .train import TrainConfig, load_for_training, save_atomically, train

DEFAULT_STEPS = {
    "tiny": 700,
    "small": 150,
    "tiny-next": 300,
    "tiny-onevision": 300,
    "tiny-qwen2.5-vl": 300,
    "tiny-qwen3-vl": 300,
}
COLORS = {"vanilla": "#888888", "skip_vision": "#1f77b4", "skip_vision_inplace": "#ff7f0e"}
PEER_COLOR = "#2ca02c"


def demo_variants(preset: str) -> dict[str, SkipVisionConfig | None]:
    """The runs the demo compares: vanilla and the preset's Skip-Vision setting; for families with both layouts
    (Qwen-VL), also the in-place layout at the same retained share."""
    spec = get_preset(preset)
    runs: dict[str, SkipVisionConfig | None] = {"vanilla": None}
    if spec.family in QWEN_FAMILIES:
        cfg = spec.skip_vision
        runs["skip_vision_inplace"] = in_place_config(cfg.num_retained, cfg.selection)
    runs["skip_vision"] = spec.skip_vision
    return runs


def demo_peers(vanilla: Any, skip: Any) -> list[tuple[str, SkipVisionConfig]]:
    """Each peer that applies to this model, set to Skip-Vision's prefill FLOPs ratio (matched on the demo's
    prompt with the analytic FLOPs model); the peers that do not apply (``compare.method_applies``) are named."""
    family = family_of(vanilla)
    shape = family.model_shape(vanilla.config)
    preset = skip.skip_vision_config
    target = prefill_ratio(shape, preset)
    peers = []
    for method in (m for m in METHODS if m != "skip_vision"):
        reason = method_applies(method, family, "training-free")
        if reason is not None:
            print(f"[4/5] not run here: {reason}")
            continue
        peers.append((method, for_family(match_budget(method, target, shape, preset)[0], family)))
    return peers


DEFAULT_EXAMPLES = 6000
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
#: a difference of two accuracies counts only when it is larger than Z times its standard error (95%, two-sided)
Z = 1.96


def standard_error(accuracy: float, count: int) -> float:
    """Binomial standard error of an accuracy on ``count`` test records: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1.0 - accuracy) / count) if count > 0 else 0.0


def accuracy_difference(accuracy: float, reference: float, count: int) -> dict[str, Any]:
    """``accuracy - reference`` (both on the same ``count`` records), the standard error of that difference,
    sqrt(se^2 + se_reference^2) (it leaves out that the records are shared, which would make it smaller: a cautious
    bound), and whether the difference is within ``Z`` times it (then it is not a difference)."""
    difference = accuracy - reference
    stderr = math.hypot(standard_error(accuracy, count), standard_error(reference, count))
    return {"difference": difference, "stderr": stderr, "z": Z, "within": abs(difference) <= Z * stderr}


def difference_line(name: str, difference: dict[str, Any], reference: str = "vanilla") -> str:
    """One printed line: the accuracy difference, its standard error and whether it is within ``z`` of them."""
    head = f"{name} - {reference} accuracy: {difference['difference']:+.3f} (standard error {difference['stderr']:.3f})"
    bound = f"{difference['z']:g} x {difference['stderr']:.3f} = {difference['z'] * difference['stderr']:.3f}"
    if difference["within"]:
        return f"{head}: within {bound}, not a difference on this test set"
    return f"{head}: larger than {bound}, a difference"


def _accuracy_cell(r: dict[str, Any]) -> str:
    """``0.503±0.016``: the accuracy and its standard error (without one: the accuracy alone)."""
    stderr = r.get("accuracy_stderr")
    return f"{r['accuracy']:.3f}" + ("" if stderr is None else f"±{stderr:.3f}")


def _train_flops(model_dir: Path, data: Path) -> dict[str, float]:
    """Analytic and measured FLOPs of one training step on the first batch of the training set."""
    model = from_pretrained(model_dir)
    batch = first_batch(data, load_processor(model_dir), BATCH_SIZE)
    model.train()
    family_of(model).vision_tower(model).requires_grad_(False)  # frozen in training too
    measured, _ = measure.measured_flops(lambda: model(**batch).loss.backward())
    analytic = measure.batch_flops(model, batch)["train"]
    return {"train_flops": float(analytic), "train_flops_measured": float(measured)}


def _prefill_inputs(checkpoint: str | Path, image_size: int) -> tuple[Any, dict[str, Any]]:
    """A checkpoint's model and one prompt (words, one image, words) expanded by its own processor: the input
    whose prefill the demo counts and times."""
    model = from_pretrained(checkpoint)
    processor = load_processor(checkpoint)
    prompt = family_of(model).image_prompt(processor, model.config)
    size = (image_size, image_size)
    return model, make_inputs(processor, 1, F.DEFAULT_TEXT_TOKENS, size, "cpu", model.dtype, prompt)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    base_flops = report["vanilla"]["prefill_flops"]
    base_latency = report["vanilla"]["generate_seconds"]
    for name in report.get("variants", ["vanilla", "skip_vision"]):
        r, color = report[name], COLORS.get(name, "#2ca02c")
        x = 100 * r["prefill_flops"] / base_flops
        size = 600 * r["generate_seconds"] / base_latency
        ax.scatter([x], [100 * r["accuracy"]], s=size, color=color, alpha=0.6, edgecolors="black")
        ax.annotate(
            f"{name}\n{1e3 * r['generate_seconds']:.0f} ms",
            (x, 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(14, -4),
            fontsize=8,
        )
    for name, r in report.get("peers", {}).items():
        x = 100 * r["prefill_flops"] / base_flops
        ax.scatter([x], [100 * r["accuracy"]], s=40, color=PEER_COLOR, marker="s", alpha=0.7, edgecolors="black")
        ax.annotate(name, (x, 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    if report.get("peers"):
        ax.scatter([], [], s=40, color=PEER_COLOR, marker="s", label="peers, training-free at Skip-Vision's budget")
    ax.axhline(100 * report["chance_accuracy"], color="red", lw=0.8, ls="--", label="answer-prior baseline")
    ax.set_xlabel("inference FLOPs, % of vanilla (prefill, language model)")
    ax.set_ylabel("exact-match accuracy, %")
    ax.set_title("skipvision demo: accuracy vs FLOPs (marker size = generate latency)", fontsize=9)
    ax.set_xlim(0, 120)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    names = report.get("variants", ["vanilla", "skip_vision"])
    vanilla = report["vanilla"]
    rows = [
        ("accuracy (exact match) ± SE", "accuracy", "{:.3f}", 1),
        ("train wall time (s)", "train_seconds", "{:.1f}", 1),
        ("train step time (s, median)", "train_step_seconds", "{:.3f}", 1),
        ("train FLOPs / step, analytic (G)", "train_flops", "{:.2f}", 1e-9),
        ("train FLOPs / step, measured (G)", "train_flops_measured", "{:.2f}", 1e-9),
        ("prefill FLOPs, analytic (G)", "prefill_flops", "{:.3f}", 1e-9),
        ("prefill latency (ms)", "prefill_seconds", "{:.1f}", 1e3),
        ("decode per token (ms)", "decode_seconds_per_token", "{:.2f}", 1e3),
        ("generate 16 tokens (ms)", "generate_seconds", "{:.1f}", 1e3),
        ("KV cache after prefill (KiB)", "kv_cache_bytes", "{:.1f}", 1 / 1024),
    ]
    others = [n for n in names if n != "vanilla"]
    head = f"{'':34}{'vanilla':>12}" + "".join(f"{n:>22}{'ratio':>8}" for n in others)
    lines = [head, "-" * len(head)]
    for label, key, fmt, scale in rows:
        line = f"{label:34}{_cell(vanilla, key, fmt, scale):>12}"
        for name in others:
            relative = ratio(report[name][key], vanilla[key])
            line += f"{_cell(report[name], key, fmt, scale):>22}{'-' if relative is None else f'{relative:.3f}':>8}"
        lines.append(line)
    count = vanilla.get("test_records")
    if count:
        lines.append(f"(accuracy ± its binomial standard error sqrt(p(1 - p) / n), n = {count} test records)")
    for name, difference in report.get("accuracy_differences", {}).items():
        lines.append(difference_line(name, difference))
    lines += _peer_lines(report)
    lines.append(f"answer-prior baseline accuracy: {report['chance_accuracy']:.3f}")
    lines.append(
        "(measured FLOPs come from torch's FlopCounterMode, which charges full T x T attention and 2.5x for"
        " the flash backward; the analytic count uses causal pairs)"
    )
    return "\n".join(lines)


def _cell(r: dict[str, Any], key: str, fmt: str, scale: float) -> str:
    if key == "accuracy":
        return _accuracy_cell(r)
    return "-" if r[key] is None else fmt.format(r[key] * scale)  # None: not resolved


def _peer_lines(report: dict[str, Any]) -> list[str]:
    peers, vanilla = report.get("peers"), report["vanilla"]
    if not peers:
        return []
    lines = ["", "peers, training-free on the vanilla-trained model at skip_vision's prefill FLOPs budget:"]
    head = f"{'':34}{'accuracy ± SE':>14}{'prefill FLOPs':>15}{'prefill time':>14}{'KV cache':>10}"
    lines += [head, "-" * len(head)]
    for name, r in peers.items():
        ratios = [ratio(r[k], vanilla[k]) for k in ("prefill_flops", "prefill_seconds", "kv_cache_bytes")]
        cells = "".join(f"{'-' if x is None else f'{x:.3f}':>{w}}" for x, w in zip(ratios, (15, 14, 10)))
        lines.append(f"{name:34}{_accuracy_cell(r):>14}{cells}")
    lines.append("(FLOPs, time and KV cache as ratios to vanilla)")
    return lines


def _accuracy_fields(result: dict[str, Any]) -> dict[str, Any]:
    """What ``report.json`` keeps of an evaluation: accuracy, its standard error, per type, the test records."""
    return {
        "accuracy": result["accuracy"],
        "accuracy_stderr": standard_error(result["accuracy"], result["count"]),
        "test_records": result["count"],
        "per_type": result["per_type"],
    }


def _train_variant(
    base: Path, train_json: Path, output_dir: Path, cfg: SkipVisionConfig | None, steps: int, seed: int
) -> dict[str, Any]:
    summary = train(
        TrainConfig(
            model=str(base),
            data=str(train_json),
            output_dir=str(output_dir),
            skip_vision=cfg,
            max_steps=steps,
            batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            seed=seed,
            save_steps=max(steps // 2, 1),
            logging_steps=max(steps // 10, 1),
            overwrite=True,
        )
    )
    return {
        "train_seconds": summary["train_seconds"],
        "train_step_seconds": summary["train_step_seconds"],
        "final_loss": summary["losses"][-1] if summary["losses"] else None,
        "checkpoint": summary["final"],
    }


def _evaluate_runs(
    report: dict[str, Any], runs: dict[str, Any], test_json: Path, train_json: Path, image_size: int
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Accuracy and FLOPs of each trained run into ``report``; returns each run's model and prefill inputs."""
    built = {}
    for name in runs:
        final = Path(report[name]["checkpoint"])
        print(f"[4/5] evaluating {name} on {test_json}")
        result = evaluate(final, test_json)
        report[name].update(_accuracy_fields(result))
        report[name].update(_train_flops(final, train_json))
        model, inputs = _prefill_inputs(final, image_size)
        report[name]["prefill_flops"] = measure.batch_flops(model, inputs)["prefill_language_model"]
        built[name] = (model, inputs)
    vanilla = report["vanilla"]
    report["accuracy_differences"] = {  # each Skip-Vision run against vanilla, on the same test records
        name: accuracy_difference(report[name]["accuracy"], vanilla["accuracy"], vanilla["test_records"])
        for name in runs
        if name != "vanilla"
    }
    return built


def _evaluate_peers(report: dict[str, Any], built: dict[str, Any], out: Path, test_json: Path, image_size: int) -> None:
    """Each peer, training-free on the vanilla-trained model, into ``report["peers"]`` and ``built``."""
    report["peers"] = {}
    for name, cfg in demo_peers(built["vanilla"][0], built["skip_vision"][0]):
        print(f"[4/5] evaluating peer {name} (training-free, on the vanilla-trained model)")
        path = out / "runs" / f"peer-{name}"
        save_atomically(*load_for_training(report["vanilla"]["checkpoint"], cfg), path)
        # SparseVLM's official code runs one prompt at a time (batch 1)
        result = evaluate(path, test_json, batch_size=1 if name in BATCH1_METHODS else 16)
        model, inputs = _prefill_inputs(path, image_size)
        report["peers"][name] = {
            **_accuracy_fields(result),
            "config": cfg.to_dict(),
            "prefill_flops": measure.batch_flops(model, inputs)["prefill_language_model"],
        }
        built[f"peer-{name}"] = (model, inputs)


def demo(
    out: str | Path = "./skipvision-demo",
    preset: str = "tiny",
    steps: int | None = None,
    seed: int = 0,
    num_examples: int | None = None,
) -> dict[str, Any]:
    spec = get_preset(preset)
    start = time.perf_counter()
    out = Path(out)
    steps = steps or DEFAULT_STEPS[preset]
    print(f"[1/5] data: {out / 'data'}")
    train_json, test_json = make_dataset(
        out / "data", n=num_examples or DEFAULT_EXAMPLES, seed=seed, image_size=spec.data_image_size
    )
    print(f"[2/5] tiny {spec.family} ({preset}, random init): {out / 'base'}")
    base = init_model(preset, out / "base", seed=seed)
    runs = demo_variants(preset)
    report: dict[str, Any] = {
        "preset": preset,
        "family": spec.family,
        "steps": steps,
        "seed": seed,
        "batch_size": BATCH_SIZE,
        "image_size": spec.data_image_size,
        "skip_vision_config": spec.skip_vision.to_dict(),
        "variants": list(runs),
        "configs": {name: None if cfg is None else cfg.to_dict() for name, cfg in runs.items()},
    }
    for name, cfg in runs.items():
        print(f"[3/5] training {name}: {steps} steps, batch {BATCH_SIZE}")
        report[name] = _train_variant(base, train_json, out / "runs" / name, cfg, steps, seed)
    built = _evaluate_runs(report, runs, test_json, train_json, spec.data_image_size)
    _evaluate_peers(report, built, out, test_json, spec.data_image_size)
    print(f"[5/5] measuring {', '.join(built)} side by side: latency, KV cache")
    settings = BenchSettings(new_tokens=16, repeats=5, train=False, device="cpu")
    for name, timing in measure_interleaved(built, settings).items():
        if name.startswith("peer-"):
            report["peers"][name.removeprefix("peer-")].update(timing)
        else:
            report[name].update(timing)
    report["chance_accuracy"] = prior_accuracy(train_json, test_json)
    keys = (
        "train_step_seconds",
        "train_flops",
        "train_flops_measured",
        "prefill_seconds",
        "decode_seconds_per_token",
        "kv_cache_bytes",
        "prefill_flops",
    )
    ratios = {name: {k: ratio(report[name][k], report["vanilla"][k]) for k in keys} for name in runs}
    report["ratios"] = ratios["skip_vision"]  # the preset's own setting, as before
    report["ratios_by_variant"] = ratios
    report["total_seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "tradeoff.png")
    print()
    print(format_report(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'tradeoff.png'} in {report['total_seconds']:.0f} s")
    return report
