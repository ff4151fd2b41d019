"""``skipvision compare``: Skip-Vision against its peers (and its own ablations) in one harness.

For a preset's tiny model and the embedded dataset (or the user's LLaVA-format data), every method is set to each
inference-FLOPs budget (a fraction of vanilla's language-model prefill FLOPs, matched with the analytic FLOPs model
over the method's own knob) and, with ``budget_tokens``, to each visual-token budget (``visual_token_count``: the
layer-average number of visual tokens per image that run full decoder blocks, as the paper's comparison table
counts them), and evaluated in two regimes:

* ``training-free``: the method applied to the vanilla-trained checkpoint;
* ``fine-tuned``: the model trained from the same initialisation with the method on (same data, steps, seed).

Each row records exact-match accuracy (overall and per question type), analytic prefill / training FLOPs of real
batches, prefill / decode / train-step time and KV-cache bytes measured side by side with vanilla, and is written
to its own JSON file as soon as it is done, so an interrupted run resumes where it stopped. With ``seeds`` > 1 every
row (vanilla included) is trained and evaluated once per seed (``seed``, ``seed + 1``, ...), each seed's rows cached
apart; the table shows the mean and standard deviation over seeds (one seed: the binomial standard error of the
test sample) and calls a difference a difference only when it is larger than that spread (``compare_accuracies``).
The run ends with ``compare.json`` (every seed's result), ``compare.md`` and ``compare.png`` (accuracy vs prefill
FLOPs, one line per method and regime, with error bars).

This module plans and runs the rows; ``budgets.py`` sets a method to a budget, ``compare_report.py`` aggregates the
seeds and writes the table and plot.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import flops as F
from ..api import family_of, from_pretrained, load_processor
from ..config import SkipVisionConfig, vanilla_config
from ..families.base import Family
from . import measure
from .bench import BenchSettings, make_inputs, measure_interleaved, ratio
from .budgets import (
    METHODS,
    REGIMES,
    check_token_budgets,
    match_budget,
    match_tokens,
    prefill_ratio,
    visual_token_count,
)
from .compare_report import add_differences, add_relative, aggregate_seeds, markdown, plot
from .data import LlavaCollator, LlavaJsonDataset, first_batch, make_dataset, prior_accuracy
from .evaluate import evaluate
from .presets import QWEN_FAMILIES, get_preset, init_model
from .train import TrainConfig, load_for_training, read_manifest, save_atomically, train, write_json_atomically

#: methods before the projector (``tower_reduction``): only on families that run them (LLaVA-1.5)
TOWER_METHODS = ("visionzip", "fastervlm", "prumerge", "prumerge_plus", "tome", "tome_after_projector")
#: training-free methods whose official code runs one prompt at a time (batch 1, inference only)
BATCH1_METHODS = ("sparsevlm",)
DEFAULT_BUDGETS = (0.25, 0.4, 0.6)
#: Skip-Vision ablations (fine-tuned at the preset's own setting), method.md sections 6.6 and 7
ABLATIONS = (
    "no_skip_kv",
    "no_summary",
    "no_merge",
    "selection_position",
    "selection_grid",
    "skip_half_layers",
    "answer_blind",
    "equal_wall_clock",
)
BATCH_SIZE = 8
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class CompareSettings:
    out: Path
    preset: str = "tiny"
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    methods: tuple[str, ...] = METHODS
    regimes: tuple[str, ...] = REGIMES
    fine_tune_budgets: tuple[float, ...] | None = (0.4,)  # None: every budget; else each must be one of budgets
    fine_tune_methods: tuple[str, ...] | None = None  # methods with fine-tuned rows (None: every method)
    ablations: tuple[str, ...] = ()  # names from ABLATIONS
    steps: int = 400
    num_examples: int = 6000
    eval_limit: int | None = 300
    seed: int = 0
    timing_repeats: int = 3
    model: Path | None = None  # a checkpoint to start every training from (default: the preset's random init)
    train_data: Path | None = None  # LLaVA-format JSON (default: the embedded dataset, generated)
    test_data: Path | None = None
    notes: tuple[str, ...] = ()  # what this run leaves out of the full comparison (``quick``), printed and saved
    budget_tokens: tuple[int, ...] = ()  # visual-token budgets (``visual_token_count``), besides the FLOPs budgets
    seeds: int = 1  # every row trained and evaluated with seeds seed, seed + 1, ..., seed + seeds - 1


#: the full run's settings that ``--quick`` changes (the CLI shows both in ``--help``)
FULL_DEFAULTS: dict[str, Any] = {
    "budgets": DEFAULT_BUDGETS,
    "methods": METHODS,
    "regimes": REGIMES,
    "steps": 400,
    "num_examples": 6000,
    "eval_limit": 300,
}
#: ``--quick``: two trainings (vanilla and Skip-Vision) of 200 steps, 48 test records, one timing round; the
#: training-free rows (cheap: evaluation only) keep every method
QUICK: dict[str, Any] = {
    "budgets": (0.4,),
    "fine_tune_budgets": (0.4,),
    "fine_tune_methods": ("skip_vision",),
    "steps": 200,
    "num_examples": 1600,
    "eval_limit": 48,
    "timing_repeats": 1,
}


def quick(settings: CompareSettings, keep: frozenset[str] = frozenset()) -> CompareSettings:
    """A few-minute run: one budget, only vanilla and Skip-Vision trained, short training, a slice of the test set,
    one timing round. Fields named in ``keep`` (set by the caller) stay as they are. ``notes`` says what the run
    leaves out, so its table is never taken for the full comparison."""
    changes = {k: v for k, v in QUICK.items() if k not in keep}
    if "budgets" in keep:  # the fine-tuned budget follows the caller's budgets
        changes.pop("fine_tune_budgets", None)
    if "methods" in keep and "skip_vision" not in settings.methods:
        changes.pop("fine_tune_methods", None)
    fast = replace(settings, **changes)
    pct = lambda values: ", ".join(f"{v:.0%}" for v in values)  # noqa: E731
    notes = []
    if fast.budgets != settings.budgets:
        notes.append(f"budgets {pct(fast.budgets)} only (the full run: {pct(settings.budgets)})")
    if fast.fine_tune_methods != settings.fine_tune_methods:
        notes.append(
            f"fine-tuned rows for {', '.join(fast.fine_tune_methods or ())} only (the full run fine-tunes every "
            "method; the training-free rows keep every method)"
        )
    if fast.steps != settings.steps:
        notes.append(f"{fast.steps} training steps per run (the full run: {settings.steps}): far from converged")
    if fast.num_examples != settings.num_examples and settings.train_data is None:
        notes.append(f"{fast.num_examples} generated examples (the full run: {settings.num_examples})")
    if fast.eval_limit != settings.eval_limit:
        notes.append(
            f"accuracy on the first {fast.eval_limit} test records (the full run: {settings.eval_limit or 'all'}), "
            "a few points of sampling noise"
        )
    if fast.timing_repeats != settings.timing_repeats:
        notes.append(f"times from {fast.timing_repeats} round (the full run: median of {settings.timing_repeats})")
    if not fast.ablations:
        notes.append("no ablations (--ablations adds them)")
    return replace(fast, notes=tuple(notes))


def check_settings(settings: CompareSettings) -> None:
    """Refuse settings that would fail late or drop rows without a word, before any data, model or run is made."""
    unknown = sorted(set(settings.methods) - set(METHODS)) + sorted(set(settings.regimes) - set(REGIMES))
    if unknown:
        raise ValueError(f"unknown method or regime {unknown}; methods: {list(METHODS)}, regimes: {list(REGIMES)}")
    if not (settings.methods and settings.regimes) and not settings.ablations:
        raise ValueError("no method, regime or ablation to run: the table would hold only vanilla")
    if not settings.budgets or any(not 0.0 < b <= 1.0 for b in settings.budgets):
        raise ValueError(f"budgets are fractions of vanilla's prefill FLOPs in (0, 1], got {settings.budgets}")
    if settings.fine_tune_budgets is not None:
        missing = [b for b in settings.fine_tune_budgets if b not in settings.budgets]
        if missing or not settings.fine_tune_budgets:
            raise ValueError(
                f"fine-tune budgets {missing or '()'} are not among the budgets {settings.budgets}: no fine-tuned row "
                "would run at them"
            )
    if settings.fine_tune_methods is not None:
        missing = [m for m in settings.fine_tune_methods if m not in settings.methods]
        if missing or not settings.fine_tune_methods:
            raise ValueError(
                f"fine-tune methods {missing or '()'} are not among the methods {list(settings.methods)}: no "
                "fine-tuned row would run for them"
            )
    unknown = sorted(set(settings.ablations) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {ABLATIONS}")
    for name in ("steps", "timing_repeats", "seeds"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.num_examples < 2:
        raise ValueError(f"num_examples must be at least 2, got {settings.num_examples}")
    if settings.eval_limit is not None and settings.eval_limit < 1:
        raise ValueError(f"eval_limit must be at least 1 (or None for every record), got {settings.eval_limit}")
    if (settings.train_data is None) != (settings.test_data is None):
        raise ValueError("give both a training and a test LLaVA JSON (--data and --test-data), or neither")
    spec = get_preset(settings.preset)
    # a fixed-size preset's tokens per image are known before its model is built; tiled and dynamic-resolution
    # presets and a checkpoint of the user's are checked against the model's shape in ``plan_rows``
    fixed = settings.model is None and not spec.grid and spec.family not in QWEN_FAMILIES
    visual = spec.visual_tokens if fixed else None
    check_token_budgets(settings.budget_tokens, visual, visual, settings.methods)


def ablation_config(name: str, cfg: SkipVisionConfig, layers: int) -> SkipVisionConfig:
    """The preset's Skip-Vision setting with one thing changed."""
    changes: dict[str, dict[str, Any]] = {
        "no_skip_kv": {"skip_kv_cache": False},
        "no_summary": {"summary_tokens": False},
        # the candidates are skipped as they are (S = every candidate, unmerged): more tokens in attention
        "no_merge": {"num_skipped": None, "merge": "none"},
        "selection_position": {"selection": "position"},
        "selection_grid": {"selection": "grid"},
        "skip_half_layers": {"skip_layers": tuple(range(0, layers, 2))},
        "answer_blind": {"train_mask": "answer_blind"},
        "equal_wall_clock": {},
    }
    if name not in changes:
        raise ValueError(f"unknown ablation {name!r}; choose from {ABLATIONS}")
    return replace(cfg, **changes[name])


def prompt_text_tokens(base: Path, test_json: Path, model: Any, sample: int = 32) -> int:
    """Median count of non-image prompt tokens over the first test records: the budgets are matched there."""
    processor = load_processor(base, vanilla_config())
    dataset = LlavaJsonDataset(test_json, None, processor)
    image_token = family_of(model).image_token_id(model.config)
    counts = sorted(
        int((dataset.encode_prompt(r)[0]["input_ids"] != image_token).sum()) for r in dataset.records[:sample]
    )
    return counts[len(counts) // 2]


# --- rows -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    key: str  # file name of the row's result
    method: str
    regime: str
    budget: float | None  # a FLOPs budget; None: a token budget's or an ablation's row
    cfg: SkipVisionConfig | None  # None: vanilla
    matched_ratio: float | None = None
    steps: int | None = None  # training steps, when not the run's own
    tokens: int | None = None  # the visual-token budget of a token budget's row


def method_applies(method: str, family: Family, regime: str) -> str | None:
    """Why ``method`` does not run on this family in this regime, or None when it does (refused rows are listed in
    the run's output and its table, never dropped without a word)."""
    if method in TOWER_METHODS and not family.supports_tower_reduction:
        return f"{method}: reduces before the projector on one-pass towers (LLaVA-1.5), not on {family.name}"
    if method in BATCH1_METHODS and regime == "fine-tuned":
        return f"{method} fine-tuned: a training-free method (its official code has no training path)"
    if method == "sparsevlm" and family.uses_mrope:
        return f"{method}: renumbers 1-D positions as its official code does; {family.name} has M-RoPE positions"
    return None


def for_family(cfg: SkipVisionConfig, family: Family | None) -> SkipVisionConfig:
    """A method's setting as it runs on ``family``: PyramidDrop takes its named true-positions departure on M-RoPE
    families, whose 3-D positions the official code has no renumbering rule for."""
    if family is not None and family.uses_mrope and cfg.llm_drop_rule == "pyramid_drop":
        return replace(cfg, llm_drop_rule="pyramid_drop_true_positions")
    return cfg


def left_out(settings: CompareSettings, family: Family) -> list[str]:
    """The (method, regime) pairs of these settings that do not run on ``family``, with the reason."""
    reasons = {method_applies(m, family, r) for r in settings.regimes for m in _regime_methods(settings, r)}
    return sorted(reason for reason in reasons if reason is not None)


def _regime_methods(settings: CompareSettings, regime: str) -> tuple[str, ...]:
    if regime == "fine-tuned" and settings.fine_tune_methods is not None:
        return tuple(m for m in settings.methods if m in settings.fine_tune_methods)
    return settings.methods


def _applicable(settings: CompareSettings, regime: str, family: Family | None) -> tuple[str, ...]:
    methods = _regime_methods(settings, regime)
    return methods if family is None else tuple(m for m in methods if method_applies(m, family, regime) is None)


def plan_rows(
    settings: CompareSettings,
    shape: F.ModelShape,
    preset_cfg: SkipVisionConfig,
    text_tokens: int,
    family: Family | None = None,
) -> list[Row]:
    """Vanilla; each regime's methods at each FLOPs budget (fine-tuned: at ``fine_tune_budgets``); each regime's
    methods at each token budget (``<regime>-<method>-<N>tok``, fine-tuned at every token budget); the ablations."""
    rows = [Row("vanilla", "vanilla", "fine-tuned", 1.0, None, 1.0)]
    for regime in settings.regimes:
        budgets = settings.budgets
        if regime == "fine-tuned" and settings.fine_tune_budgets is not None:
            budgets = tuple(b for b in budgets if b in settings.fine_tune_budgets)
        for budget in budgets:
            for method in _applicable(settings, regime, family):
                cfg, matched = match_budget(method, budget, shape, preset_cfg, text_tokens)
                rows.append(
                    Row(f"{regime}-{method}-{budget:g}", method, regime, budget, for_family(cfg, family), matched)
                )
    check_token_budgets(settings.budget_tokens, shape.visual_tokens, shape.eligible, settings.methods)
    for regime in settings.regimes:
        for target in settings.budget_tokens:
            for method in _applicable(settings, regime, family):
                cfg, _ = match_tokens(method, target, shape, preset_cfg)
                cfg = for_family(cfg, family)
                ratio = prefill_ratio(shape, cfg, text_tokens)
                rows.append(Row(f"{regime}-{method}-{target}tok", method, regime, None, cfg, ratio, tokens=target))
    unknown = sorted(set(settings.ablations) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {ABLATIONS}")
    if settings.ablations:
        base_ratio = prefill_ratio(shape, preset_cfg, text_tokens)
        rows.append(Row("ablation-preset", "skip_vision (preset)", "fine-tuned", None, preset_cfg, base_ratio))
        for name in (a for a in ABLATIONS if a in settings.ablations):
            cfg = ablation_config(name, preset_cfg, shape.text.layers)
            rows.append(
                Row(f"ablation-{name}", f"ablation: {name}", "fine-tuned", None, cfg, prefill_ratio(shape, cfg))
            )
    return rows


#: settings that every row depends on: a folder's rows are reused only under the same ones
ROW_SETTINGS = (
    "preset",
    "steps",
    "num_examples",
    "eval_limit",
    "seed",
    "timing_repeats",
    "model",
    "train_data",
    "test_data",
)


def run_seeds(settings: CompareSettings) -> list[int]:
    """The seeds every row runs with: ``seed``, ``seed + 1``, ..., ``seed + seeds - 1``."""
    return [settings.seed + i for i in range(settings.seeds)]


class Harness:
    """Runs rows into ``out/rows/<key>.json``; a row whose file exists is not recomputed.

    A harness runs one seed (``self.seed``): the first seed's rows, runs and random initialisation live in ``out``
    itself (as a one-seed comparison's), every other seed's in ``out/seed-<seed>`` (``for_seed``). A seed sets the
    tiny model's random initialisation and the training order; the data and the test records are the first seed's
    for all of them (a checkpoint given with ``--model`` is every seed's start)."""

    def __init__(self, settings: CompareSettings) -> None:
        self.s = settings
        self.out = Path(settings.out)
        self.spec = get_preset(settings.preset)
        check_settings(settings)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_comparison()
        if settings.train_data is not None:
            self.train_json, self.test_json = Path(settings.train_data), Path(settings.test_data)
        else:
            self.train_json, self.test_json = make_dataset(
                self.out / "data", n=settings.num_examples, seed=settings.seed, image_size=self.spec.data_image_size
            )
        self.seed, self.folder = settings.seed, self.out
        self.base = self._base()

    def _base(self) -> Path:
        """Where this seed's trainings start: ``--model``, or the preset's random initialisation with this seed."""
        (self.folder / "rows").mkdir(parents=True, exist_ok=True)
        base = self.folder / "base"
        if self.s.model is not None:
            return Path(self.s.model)
        if (base / "config.json").exists():
            return base
        return init_model(self.s.preset, base, seed=self.seed)

    def for_seed(self, seed: int) -> Harness:
        """The same comparison with ``seed``: its rows and runs in ``out/seed-<seed>`` (the first seed: ``out``)."""
        if seed == self.seed:
            return self
        other = copy.copy(self)
        other.seed = seed
        other.folder = self.out if seed == self.s.seed else self.out / f"seed-{seed}"
        other.base = other._base()
        return other

    def _check_same_comparison(self) -> None:
        """A folder's finished rows are reused, so they must come from the same comparison: settings that change
        every row (steps, data, evaluation slice, seed, ...) are saved with the first run and a rerun with others is
        refused. Adding methods, budgets or ablations to a folder is fine: those are new rows."""
        path = self.out / "compare_settings.json"
        now = {
            key: str(Path(value).resolve()) if isinstance(value, Path) else value
            for key, value in ((k, getattr(self.s, k)) for k in ROW_SETTINGS)
        }
        if not path.exists():
            write_json_atomically(path, now)
            return
        saved = json.loads(path.read_text())
        changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in ROW_SETTINGS if saved.get(k) != now[k]]
        if changed:
            raise ValueError(
                f"{self.out} holds a comparison made with other settings ({'; '.join(changed)}); its finished rows "
                "would be mixed into this table: use another --out (or the same settings to resume it)"
            )

    def row_path(self, row: Row) -> Path:
        return self.folder / "rows" / f"{row.key}.json"

    def train(self, name: str, cfg: SkipVisionConfig | None, steps: int) -> dict[str, Any]:
        """Train (or, when this run already finished, read back) ``runs/<name>``; an unfinished one restarts."""
        folder = self.folder / "runs" / name
        finished = bool((read_manifest(folder) or {}).get("finished"))
        return train(
            TrainConfig(
                model=str(self.base),
                data=str(self.train_json),
                output_dir=str(folder),
                skip_vision=cfg,
                max_steps=steps,
                batch_size=BATCH_SIZE,
                learning_rate=LEARNING_RATE,
                seed=self.seed,
                save_steps=steps,
                logging_steps=max(steps // 10, 1),
                resume=finished,
                overwrite=not finished,
            )
        )

    def vanilla_checkpoint(self) -> Path:
        return Path(self.train("vanilla", None, self.s.steps)["final"])

    def training_free_checkpoint(self, row: Row) -> Path:
        """The vanilla-trained weights with the method's settings (and its processor's image-token count)."""
        path = self.folder / "runs" / row.key / "final"
        if not path.exists():  # written whole or not at all
            save_atomically(*load_for_training(str(self.vanilla_checkpoint()), row.cfg), path)
        return path

    def run_row(self, row: Row) -> dict[str, Any]:
        start = time.perf_counter()
        result: dict[str, Any] = {
            "key": row.key,
            "method": row.method,
            "regime": row.regime,
            "budget": row.budget,
            "budget_tokens": row.tokens,
            "seed": self.seed,
            "matched_prefill_ratio": row.matched_ratio,
            "config": (row.cfg or vanilla_config()).to_dict(),
        }
        skip_kv = None
        if row.regime == "training-free":
            checkpoint, summary = self.training_free_checkpoint(row), None
        elif row.key == "ablation-no_skip_kv":  # a decode-time switch: the preset's fine-tuned model, unpruned
            summary = self.train("ablation-preset", replace(row.cfg, skip_kv_cache=True), self.s.steps)
            checkpoint, skip_kv = Path(summary["final"]), False
        elif row.key == "ablation-equal_wall_clock":
            steps = self._equal_wall_clock_steps(row.cfg)
            summary = self.train(row.key, row.cfg, steps)
            checkpoint = Path(summary["final"])
            result["steps"] = steps
        else:
            summary = self.train(row.key, row.cfg, self.s.steps)
            checkpoint = Path(summary["final"])
        if summary is not None:
            result["train_seconds"] = summary["train_seconds"]
            result["train_step_seconds_in_training"] = summary["train_step_seconds"]
        one_at_a_time = row.method in BATCH1_METHODS  # as its official code runs: one prompt per forward
        evaluation = evaluate(
            checkpoint,
            self.test_json,
            limit=self.s.eval_limit,
            progress=False,
            skip_kv_cache=skip_kv,
            **({"batch_size": 1} if one_at_a_time else {}),
        )
        result.update(accuracy=evaluation["accuracy"], per_type=evaluation["per_type"], count=evaluation["count"])
        result["checkpoint"] = str(checkpoint)
        result.update(self._flops(checkpoint, result["config"]))
        result["row_seconds"] = time.perf_counter() - start
        return result

    def _equal_wall_clock_steps(self, cfg: SkipVisionConfig) -> int:
        """Steps of the preset's Skip-Vision setting that take the time of vanilla's run: the run's steps times the
        ratio of their train-step times, measured side by side (interleaved) on the same training batch."""
        models = {
            "vanilla": self.vanilla_checkpoint(),
            "skip": Path(self.train("ablation-preset", cfg, self.s.steps)["final"]),
        }
        built = {
            name: (from_pretrained(checkpoint), first_batch(self.train_json, load_processor(checkpoint), BATCH_SIZE))
            for name, checkpoint in models.items()
        }
        timed = measure_interleaved(built, BenchSettings(new_tokens=1, repeats=5, device="cpu"))
        ratio = timed["vanilla"]["train_step_seconds"] / timed["skip"]["train_step_seconds"]
        return max(1, round(self.s.steps * ratio))

    def _model(self, checkpoint: Path, config: dict[str, Any]) -> Any:
        """A row's model: its checkpoint with the row's settings (``ablation-no_skip_kv`` decodes unpruned)."""
        return from_pretrained(checkpoint, skip_vision=SkipVisionConfig.from_dict(config))

    def _flops(self, checkpoint: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Analytic FLOPs of real batches: one test prompt (prefill) and one training batch of 8."""
        model = self._model(checkpoint, config)
        processor = load_processor(checkpoint)
        batch = first_batch(self.train_json, processor, BATCH_SIZE)
        test = LlavaJsonDataset(self.test_json, None, processor)
        record = next(r for r in test.records if test.load_images(r))  # the first test prompt with an image
        single = LlavaCollator(processor.tokenizer.pad_token_id)([test.encode_prompt(record)[0]])
        single.pop("labels")
        prefill = measure.batch_flops(model, single)
        return {
            "prefill_flops": prefill["prefill_language_model"],
            "prefill_flops_total": prefill["prefill"],
            "train_flops": measure.batch_flops(model, batch)["train"],
        }

    def time_settings(self, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Prefill, decode, train-step time and KV bytes of every distinct setting, measured side by side in one
        interleaved run (each round times every model once; medians), as ratios to vanilla's. Saved to
        ``timings.json``; rerun only when a setting is missing."""
        path = self.out / "timings.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        settings_rows = {}
        for r in results:
            if r["method"] not in BATCH1_METHODS:  # the timing runs a batch of 4 and a training step
                settings_rows.setdefault(json.dumps(r["config"], sort_keys=True), r)
        if set(settings_rows) <= set(saved):
            return saved
        size = (self.spec.data_image_size, self.spec.data_image_size)
        built = {}
        for key, r in settings_rows.items():
            checkpoint = Path(r["checkpoint"])
            model = self._model(checkpoint, r["config"])
            processor = load_processor(checkpoint, model.skip_vision_config)
            prompt = family_of(model).image_prompt(processor, model.config)
            built[key] = (model, make_inputs(processor, 4, F.DEFAULT_TEXT_TOKENS, size, "cpu", model.dtype, prompt))
        vanilla_key = json.dumps(next(r for r in results if r["key"] == "vanilla")["config"], sort_keys=True)
        settings = BenchSettings(new_tokens=8, repeats=self.s.timing_repeats, device="cpu")
        timed = measure_interleaved(built, settings)
        keys = ("prefill_seconds", "decode_seconds_per_token", "train_step_seconds", "kv_cache_bytes")
        timings = {
            key: {
                **{k: row.get(k) for k in keys},
                **{f"{k}_ratio": ratio(row.get(k), timed[vanilla_key].get(k)) for k in keys},
            }
            for key, row in timed.items()
        }
        write_json_atomically(path, timings)
        return timings

    def run(self, rows: list[Row], progress: bool = True) -> list[dict[str, Any]]:
        """Every row with every seed (seed by seed), each read back when its file exists, else run and saved."""
        results = []
        seeds = run_seeds(self.s)
        bar = tqdm(total=len(rows) * len(seeds), desc="compare", disable=not progress)
        for seed in seeds:
            harness = self.for_seed(seed)
            for row in rows:
                bar.set_postfix_str(row.key if len(seeds) == 1 else f"{row.key} (seed {seed})")
                results.append(harness.run_one(row))
                bar.update()
        bar.close()
        return results

    def run_one(self, row: Row) -> dict[str, Any]:
        path = self.row_path(row)
        if path.exists():
            result = json.loads(path.read_text())
            result.setdefault("seed", self.seed)  # rows saved before seeds were recorded: a one-seed run's
            return result
        result = self.run_row(row)
        write_json_atomically(path, result)
        return result


def compare(settings: CompareSettings, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    start = time.perf_counter()
    check_settings(settings)
    if settings.notes:
        log(f"compare --quick leaves out: {'; '.join(settings.notes)}")
    harness = Harness(settings)
    model = from_pretrained(harness.base, skip_vision=vanilla_config())
    shape = family_of(model).model_shape(model.config)
    text_tokens = prompt_text_tokens(harness.base, harness.test_json, model)
    family = family_of(model)
    rows = plan_rows(settings, shape, harness.spec.skip_vision, text_tokens, family)
    skipped = left_out(settings, family)
    if skipped:
        log(f"compare: not run here: {'; '.join(skipped)}")
    seeds = run_seeds(settings)
    log(
        f"compare: {len(rows)} rows x {len(seeds)} seed(s) {seeds} into {harness.out / 'rows'} (finished rows are "
        f"kept); budgets matched at {text_tokens} prompt text tokens + 1 image"
    )
    results = harness.run(rows, progress)
    log(f"compare: timing {len({json.dumps(r['config'], sort_keys=True) for r in results})} settings side by side")
    timings = harness.time_settings(results)
    for r in results:
        r.update(timings.get(json.dumps(r["config"], sort_keys=True), {}))
        r["visual_tokens"] = visual_token_count(shape, SkipVisionConfig.from_dict(r["config"]))
    add_relative(results)
    table = aggregate_seeds(results)
    add_differences(table)
    chance = prior_accuracy(harness.train_json, harness.test_json)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        "seeds": seeds,
        "text_tokens": text_tokens,
        "chance_accuracy": chance,
        "rows": table,
        "total_seconds": time.perf_counter() - start,
    }
    out = harness.out
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    text = markdown(table, chance, settings.notes, len(seeds), tuple(skipped))
    (out / "compare.md").write_text(text)
    plot(table, out / "compare.png", chance)
    log(text)
    log(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.png'}")
    return report
