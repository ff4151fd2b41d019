"""What ``skipvision compare`` reports from its rows: FLOPs ratios to vanilla, the seeds aggregated into a mean and a
spread (standard deviation over seeds; one seed: the binomial standard error), the differences that are larger than
that spread, and the markdown table and plot.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .budgets import REGIMES


# --- FLOPs ratios ---------------------------------------------------------------------------------------------------
def add_relative(results: list[dict[str, Any]]) -> None:
    """Each row's prefill / training FLOPs as a fraction of the vanilla row's."""
    vanilla = next(r for r in results if r["key"] == "vanilla")
    for r in results:
        r["prefill_flops_ratio"] = r["prefill_flops"] / vanilla["prefill_flops"]
        r["train_flops_ratio"] = r["train_flops"] / vanilla["train_flops"]


# --- seeds and spread -------------------------------------------------------------------------------------------
def binomial_stderr(accuracy: float, count: int) -> float:
    """Standard error of an accuracy measured on ``count`` test records: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1.0 - accuracy) / count) if count > 0 else 0.0


def aggregate_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per key (in the order first seen) from every seed's result.

    A row keeps its first seed's fields (config, FLOPs, times, checkpoint); ``accuracy`` and ``per_type`` become
    means over the seeds, ``seeds`` / ``accuracies`` list each seed's, ``accuracy_std`` is the standard deviation
    over seeds (n - 1 in the denominator; None with one seed), ``accuracy_stderr`` the binomial standard error of
    the mean accuracy on the n test records, ``accuracy_spread`` what the table shows and differences are judged by
    (the std with two seeds or more, else the standard error), and ``per_seed`` every seed's result as saved."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["key"], []).append(r)
    rows = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.get("seed") or 0)
        accuracies = [r["accuracy"] for r in runs]
        mean = statistics.fmean(accuracies)
        types = sorted({t for r in runs for t in r["per_type"]})
        std = statistics.stdev(accuracies) if len(runs) > 1 else None
        stderr = binomial_stderr(mean, runs[0]["count"])
        row = {k: v for k, v in runs[0].items() if k != "seed"}
        row.update(
            accuracy=mean,
            per_type={t: statistics.fmean(r["per_type"][t] for r in runs if t in r["per_type"]) for t in types},
            seeds=[r.get("seed") for r in runs],
            accuracies=accuracies,
            accuracy_std=std,
            accuracy_stderr=stderr,
            accuracy_spread=stderr if std is None else std,
            per_seed=runs,
        )
        rows.append(row)
    return rows


def compare_accuracies(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``row``'s accuracy minus ``reference``'s, and whether that is a difference. The rule: a difference only when
    the absolute difference of the means is larger than the larger of the two rows' spreads (the standard deviation
    over seeds; with one seed, the binomial standard error of the test sample); otherwise "within spread"."""
    difference = row["accuracy"] - reference["accuracy"]
    spread = max(row["accuracy_spread"], reference["accuracy_spread"])
    return {
        "reference": reference["key"],
        "difference": difference,
        "spread": spread,
        "within_spread": abs(difference) <= spread,
    }


def skip_vision_key(row: dict[str, Any]) -> str | None:
    """The key of the Skip-Vision row ``row`` is held against: Skip-Vision at the same FLOPs or token budget in the
    same regime (an ablation: the preset's own row); None for vanilla and Skip-Vision's rows."""
    if row["key"].startswith("ablation-"):
        return None if row["key"] == "ablation-preset" else "ablation-preset"
    if row["method"] in ("vanilla", "skip_vision"):
        return None
    tokens = row.get("budget_tokens")
    budget = f"{tokens}tok" if tokens is not None else f"{row['budget']:g}"
    return f"{row['regime']}-skip_vision-{budget}"


def add_differences(rows: list[dict[str, Any]]) -> None:
    """``vs_vanilla`` and ``vs_skip_vision`` (``compare_accuracies``; None where there is nothing to hold against)."""
    by_key = {r["key"]: r for r in rows}
    vanilla = by_key["vanilla"]
    for r in rows:
        r["vs_vanilla"] = None if r is vanilla else compare_accuracies(r, vanilla)
        reference = by_key.get(skip_vision_key(r) or "")
        r["vs_skip_vision"] = None if reference is None else compare_accuracies(r, reference)


# --- report ---------------------------------------------------------------------------------------------------------
def _difference_cell(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return "-"
    text = f"{comparison['difference']:+.3f}"
    return f"{text} within spread" if comparison["within_spread"] else text


def _table(rows: list[dict[str, Any]], types: list[str]) -> list[str]:
    head = (
        "| regime | method | budget | visual tokens | prefill FLOPs | train FLOPs | accuracy | vs vanilla | "
        "vs skip_vision | " + " | ".join(types) + " | prefill time | decode time | train step time | KV cache |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
    for r in rows:
        if r.get("budget_tokens") is not None:
            budget = f"{r['budget_tokens']} tok"
        else:
            budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        spread = r.get("accuracy_spread")
        cells = [
            r["regime"],
            r["method"],
            budget,
            fmt(r.get("visual_tokens"), "{:.1f}"),
            fmt(r["prefill_flops_ratio"]),
            fmt(r["train_flops_ratio"]),
            fmt(r["accuracy"]) + ("" if spread is None else f" ± {spread:.3f}"),
            _difference_cell(r.get("vs_vanilla")),
            _difference_cell(r.get("vs_skip_vision")),
            *(fmt(r["per_type"].get(t)) for t in types),
            fmt(r.get("prefill_seconds_ratio")),
            fmt(r.get("decode_seconds_per_token_ratio")),
            fmt(r.get("train_step_seconds_ratio")),
            fmt(r.get("kv_cache_bytes_ratio")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def spread_note(seeds: int) -> str:
    """What the ± and "within spread" of the table mean."""
    if seeds > 1:
        spread = (
            f"Accuracy: mean ± standard deviation over {seeds} seeds (each seed its own random initialisation and "
            "training order, same data; n - 1 in the denominator); per-type columns are means."
        )
        larger = "the larger of the two rows' standard deviations"
    else:
        spread = (
            "Accuracy ± the binomial standard error sqrt(p(1 - p) / n) of the n test records: one seed, so the spread "
            "between trainings (often larger) is not in it; `--seeds 3` measures it."
        )
        larger = "the larger of the two rows' standard errors"
    return (
        f"{spread} A difference (vs vanilla; vs Skip-Vision at the same budget and regime; an ablation vs the preset) "
        f"counts only when the absolute difference of the accuracies is larger than {larger}; otherwise it reads "
        '"within spread".'
    )


def vanilla_seed_notes(results: list[dict[str, Any]], chance: float | None) -> list[str]:
    """Vanilla's accuracy on each seed, and the seeds on which it did not rise above the answer prior: every
    training-free row of such a seed starts from a model that has not learned the task, so it ranks nothing."""
    vanilla = next((r for r in results if r["key"] == "vanilla"), None)
    if vanilla is None:
        return []
    seeds, accuracies = vanilla.get("seeds") or [], vanilla.get("accuracies") or [vanilla["accuracy"]]
    notes = []
    if len(accuracies) > 1:
        notes.append("Vanilla per seed: " + ", ".join(f"seed {s} {a:.3f}" for s, a in zip(seeds, accuracies)) + ".")
    if chance is not None:
        unlearned = [str(s) for s, a in zip(seeds or [None], accuracies) if a <= chance]
        if unlearned:
            which = f"seed {', '.join(unlearned)}" if seeds else "this run"
            notes.append(
                f"On {which} vanilla is at or below the answer prior: it has not learned the task in these steps, "
                "and the training-free rows of that seed (applied to it) rank nothing."
            )
    return notes


def markdown(
    results: list[dict[str, Any]],
    chance: float | None = None,
    notes: tuple[str, ...] = (),
    seeds: int = 1,
    not_run: tuple[str, ...] = (),
) -> str:
    """The table of (seed-aggregated, ``aggregate_seeds``) rows: FLOPs budgets and ablations first, then the rows at
    visual-token budgets in a section of their own (with vanilla), then what the columns mean."""
    types = sorted({t for r in results for t in r["per_type"]})
    tokens = [r for r in results if r.get("budget_tokens") is not None]
    lines = _table([r for r in results if r.get("budget_tokens") is None], types)
    if tokens:
        vanilla = [r for r in results if r["key"] == "vanilla"]
        lines += ["", "### At equal visual-token counts", "", *_table(vanilla + tokens, types)]
    lines_notes = [
        "",
        "FLOPs and times are ratios to the vanilla row (FLOPs: analytic, language model prefill of one prompt and a "
        "training step of 8 examples; times: every setting measured in one interleaved run at batch 4, medians of "
        "rounds). Accuracy: exact match on the test split, with greedy `generate`.",
        spread_note(seeds),
        "Visual tokens: the layer-average number of visual tokens per image that run full decoder blocks (Skip-Vision: "
        "its N_r; peers before the LLM: the tokens they hand it; FastV / PyramidDrop: the mean over decoder layers "
        "of the visual tokens present in each).",
    ]
    if tokens:
        lines_notes.append(
            "Token budgets: each method at its setting whose visual-token count is closest to the budget; "
            "Skip-Vision at N_r = the budget and the preset's N_s."
        )
    if chance is not None:
        lines_notes.append(f"Answer-prior baseline accuracy: {chance:.3f}.")
    lines_notes += vanilla_seed_notes(results, chance)
    if notes:
        lines_notes.append(f"Quick run, not the full comparison: {'; '.join(notes)}.")
    if not_run:
        lines_notes.append(f"Not run on this model: {'; '.join(not_run)}.")
    return "\n".join(lines + lines_notes) + "\n"


def plot(results: list[dict[str, Any]], path: Path, chance: float | None = None) -> None:
    """Accuracy vs prefill FLOPs at the FLOPs budgets, one line per method and regime, with error bars (the rows'
    ``accuracy_spread``: std over seeds, or the binomial standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [g for g in REGIMES if any(r["regime"] == g and r["budget"] is not None for r in results)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(7.0 * len(regimes), 4.6), dpi=120, squeeze=False)
    # one colour and marker per method, the same in every panel (the default cycle repeats after 10)
    every = sorted({r["method"] for r in results if r["key"] != "vanilla"})
    palette = plt.get_cmap("tab20")
    style = {m: (palette(i % 20), "osD^v<>ph"[i % 9]) for i, m in enumerate(every)}
    vanilla = next(r for r in results if r["key"] == "vanilla")
    spread = lambda r: 100 * (r.get("accuracy_spread") or 0.0)  # noqa: E731
    for ax, regime in zip(axes[0], regimes):
        methods = sorted({r["method"] for r in results if r["regime"] == regime and r["key"] != "vanilla"})
        for method in methods:
            if method.startswith("ablation") or method.endswith("(preset)"):
                continue
            points = sorted(
                (r["prefill_flops_ratio"], r["accuracy"], spread(r))
                for r in results
                if r["regime"] == regime and r["method"] == method and r["budget"] is not None
            )
            if points:
                xs, ys, errors = zip(*points)
                ys = [100 * y for y in ys]
                color, marker = style[method]
                ax.errorbar([100 * x for x in xs], ys, yerr=errors, color=color, marker=marker, capsize=3, label=method)
        ax.errorbar(
            [100], [100 * vanilla["accuracy"]], yerr=[spread(vanilla)], color="black", marker="*", ms=11, capsize=3
        )
        ax.scatter([], [], color="black", marker="*", s=120, label="vanilla")
        if chance is not None:
            ax.axhline(100 * chance, color="red", lw=0.8, ls="--", label="answer-prior baseline")
        ax.set_title(f"{regime}", fontsize=10)
        ax.set_xlabel("prefill FLOPs, % of vanilla (language model)")
        ax.set_ylabel("exact-match accuracy, %")
        ax.set_xlim(0, 110)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    bars = "± std over seeds" if any(len(r.get("accuracies") or ()) > 1 for r in results) else "± standard error"
    fig.suptitle(f"skipvision compare: accuracy vs FLOPs (bars: {bars})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
