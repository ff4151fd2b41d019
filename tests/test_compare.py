"""``skipvision compare``: budgets matched with the FLOPs model and to visual-token counts, every ablation a valid
config, seeds aggregated with the within-spread rule, the CLI's refusals, and a tiny run end to end that writes its
table and resumes without recomputing a finished row."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from peer_checks import COARSE

import skipvision
from skipvision import flops as F
from skipvision.config import SkipVisionConfig
from skipvision.harness import budgets as B
from skipvision.harness import cli
from skipvision.harness import compare as C
from skipvision.harness import compare_report as R
from skipvision.harness.presets import get_preset, init_model
from skipvision.peers import fastv, pyramid_drop, token_drop, tome, visionzip

#: the tiny preset's analytic shape (144 visual tokens, 4 layers), no weights
TINY = F.ModelShape(
    F.TextShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, head_dim=32, vocab=512),
    F.VisionShape(hidden=64, intermediate=256, layers=2, image_size=168, patch=14),
    visual_tokens=144,
)
#: LLaVA-1.5-7B (576 visual tokens, 32 layers), the paper's comparison table
LLAVA_7B = F.ModelShape(F.VICUNA_7B, F.CLIP_L_336, visual_tokens=576)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = init_model("tiny", tmp_path_factory.mktemp("base") / "base")
    model = skipvision.from_pretrained(path, skip_vision=skipvision.vanilla_config())
    return skipvision.family_of(model).model_shape(model.config)


@pytest.mark.parametrize("method", B.METHODS)
def test_budget_matching_picks_the_closest_setting(tiny, method):
    preset = get_preset("tiny").skip_vision
    cfg, ratio = B.match_budget(method, 0.45, tiny, preset, text_tokens=30)
    assert ratio == pytest.approx(B.prefill_ratio(tiny, cfg, 30))
    assert method in COARSE or abs(ratio - 0.45) <= 0.03
    others = [abs(B.prefill_ratio(tiny, c, 30) - 0.45) for c in B.method_configs(method, tiny, preset)]
    assert abs(ratio - 0.45) == pytest.approx(min(others))


def test_every_ablation_changes_one_thing(tiny):
    preset = get_preset("tiny").skip_vision
    for name in C.ABLATIONS:
        cfg = C.ablation_config(name, preset, tiny.text.layers)
        changed = {k for k, v in cfg.to_dict().items() if preset.to_dict()[k] != v}
        assert len(changed) == (0 if name == "equal_wall_clock" else 1 if name != "no_merge" else 2), name
    with pytest.raises(ValueError, match="unknown ablation"):
        C.ablation_config("no_everything", preset, 4)


def test_a_tiny_run_writes_its_table_and_resumes(tmp_path, monkeypatch):
    settings = C.CompareSettings(
        out=tmp_path / "cmp",
        budgets=(0.45,),
        methods=("skip_vision", "fastv"),
        fine_tune_budgets=(0.45,),
        steps=2,
        num_examples=48,
        eval_limit=4,
        timing_repeats=1,
    )
    report = C.compare(settings, progress=False, log=lambda _: None)
    keys = [r["key"] for r in report["rows"]]
    assert keys == [
        "vanilla",
        "training-free-skip_vision-0.45",
        "training-free-fastv-0.45",
        "fine-tuned-skip_vision-0.45",
        "fine-tuned-fastv-0.45",
    ]
    for row in report["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["count"] == 4
        if row["key"] == "vanilla":
            assert row["prefill_seconds_ratio"] == row["kv_cache_bytes_ratio"] == 1.0
        if row["key"] != "vanilla":  # the real prompts' FLOPs are near the matched budget
            assert abs(row["prefill_flops_ratio"] - row["matched_prefill_ratio"]) <= 0.05
            assert row["prefill_seconds_ratio"] > 0 and row["kv_cache_bytes_ratio"] < 1
    out = settings.out
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == len(keys) and (out / "compare.png").stat().st_size > 0
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]

    def recompute(self, row):
        raise AssertionError(f"row {row.key} was recomputed")

    monkeypatch.setattr(C.Harness, "run_row", recompute)
    monkeypatch.setattr(C, "measure_interleaved", recompute)  # every setting's times are saved too
    again = C.compare(settings, progress=False, log=lambda _: None)
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]


def test_ablations_run_and_change_what_they_say(tmp_path):
    settings = C.CompareSettings(
        out=tmp_path / "abl",
        methods=(),
        regimes=(),
        ablations=("no_skip_kv", "no_merge", "equal_wall_clock"),
        steps=1,
        num_examples=24,
        eval_limit=2,
        timing_repeats=1,
    )
    report = C.compare(settings, progress=False, log=lambda _: None)
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"vanilla", "ablation-preset", *(f"ablation-{a}" for a in settings.ablations)}
    preset = rows["ablation-preset"]
    # no Skip KV-cache: the same fine-tuned weights, a full cache; the others are trainings of their own
    assert rows["ablation-no_skip_kv"]["checkpoint"] == preset["checkpoint"]
    assert preset["kv_cache_bytes"] < rows["ablation-no_skip_kv"]["kv_cache_bytes"] < rows["vanilla"]["kv_cache_bytes"]
    assert rows["ablation-no_merge"]["prefill_flops"] > preset["prefill_flops"]
    assert rows["ablation-equal_wall_clock"]["steps"] >= 1
    assert len({r["checkpoint"] for r in rows.values()}) == len(rows) - 1


# --- visual-token budgets (pure: analytic shapes, no model) ---------------------------------------------------------
def test_visual_token_count_follows_its_definition():
    preset = get_preset("tiny").skip_vision  # N_r = 36, N_s = 36
    count = lambda cfg: B.visual_token_count(TINY, cfg)  # noqa: E731
    assert count(None) == count(skipvision.vanilla_config()) == 144
    assert count(preset) == 36  # Skip-Vision: N_r (not the summaries, not the skipped tokens)
    assert B.visual_tokens_per_layer(TINY, C.ablation_config("skip_half_layers", preset, 4)) == [36, 72, 36, 72]
    assert count(visionzip(54, 10)) == count(tome(64)) == count(token_drop(64, "random")) == 64  # what the LLM gets
    assert B.visual_tokens_per_layer(TINY, fastv(0.25, layer=1)) == [144, 36, 36, 36]  # in-LLM: present per layer
    assert count(fastv(0.25, layer=1)) == 63
    schedule = pyramid_drop(0.5, 4)
    assert B.visual_tokens_per_layer(TINY, schedule) == [144, 72, 36, 18]
    assert count(schedule) == (144 + 72 + 36 + 18) / 4


@pytest.mark.parametrize("method", B.METHODS)
def test_token_budget_matching_picks_the_closest_setting(method):
    preset = get_preset("tiny").skip_vision
    cfg, count = B.match_tokens(method, 64, TINY, preset)
    assert count == B.visual_token_count(TINY, cfg)
    if method == "skip_vision":  # the paper's row: N_r = the budget, the preset's N_s
        assert (cfg.num_retained, cfg.num_skipped, count) == (64, preset.num_skipped, 64)
        return
    others = [abs(B.visual_token_count(TINY, c) - 64) for c in B.method_configs(method, TINY, preset)]
    assert abs(count - 64) == min(others)
    assert method in COARSE or abs(count - 64) <= 1.0


def test_the_papers_64_token_row_on_llava_7b():
    preset = SkipVisionConfig(num_retained=100, num_skipped=156)
    cfg, count = B.match_tokens("skip_vision", 64, LLAVA_7B, preset)
    assert (cfg.num_retained, cfg.num_skipped, count) == (64, 156, 64)
    for method in ("fastv", "visionzip", "tome"):
        assert abs(B.match_tokens(method, 64, LLAVA_7B, preset)[1] - 64) <= 1, method
    # PyramidDrop's first stage (8 of 32 layers) keeps all 576 tokens: its layer average cannot go below 144
    assert 144 <= B.match_tokens("pyramid_drop", 64, LLAVA_7B, preset)[1] < 150
    # near the top, Skip-Vision keeps N_r and skips only what is left
    assert B.match_tokens("skip_vision", 500, LLAVA_7B, preset)[0].num_skipped == 76


def test_token_budgets_beyond_the_image_are_refused(tmp_path):
    with pytest.raises(ValueError, match="above the 144 visual tokens"):
        B.check_token_budgets((64, 145), 144, 144, B.METHODS)
    with pytest.raises(ValueError, match="leaves none to skip"):
        B.check_token_budgets((144,), 144, 144, B.METHODS)
    B.check_token_budgets((144,), 144, 144, ("fastv", "tome"))  # the peers may keep every token
    with pytest.raises(ValueError, match="whole number"):
        B.check_token_budgets((0,), None, None, B.METHODS)
    with pytest.raises(ValueError, match="above the 144"):  # the tiny preset, before any model or data is made
        C.check_settings(C.CompareSettings(out=tmp_path / "c", budget_tokens=(200,)))
    with pytest.raises(ValueError, match="above the 144"):
        B.match_tokens("fastv", 145, TINY, get_preset("tiny").skip_vision)
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        C.check_settings(C.CompareSettings(out=tmp_path / "c", seeds=0))
    assert not (tmp_path / "c").exists()


def test_token_budget_rows_have_their_own_keys():
    settings = C.CompareSettings(
        out=None, budgets=(0.4,), methods=("skip_vision", "fastv"), budget_tokens=(64, 16), fine_tune_budgets=(0.4,)
    )
    rows = C.plan_rows(settings, TINY, get_preset("tiny").skip_vision, text_tokens=17)
    token_rows = [r for r in rows if r.tokens is not None]
    assert [r.key for r in token_rows] == [
        f"{regime}-{method}-{n}tok"
        for regime in ("training-free", "fine-tuned")
        for n in (64, 16)
        for method in ("skip_vision", "fastv")
    ]
    assert all(r.budget is None and r.matched_ratio == B.prefill_ratio(TINY, r.cfg, 17) for r in token_rows)
    assert len({r.key for r in rows}) == len(rows)
    assert C.run_seeds(C.CompareSettings(out=None, seed=5, seeds=3)) == [5, 6, 7]


# --- seeds and the within-spread rule (pure: fake rows) -------------------------------------------------------------
def _fake(key, method, seed, accuracy, regime="fine-tuned", budget=0.4, tokens=None, count=300):
    return {
        "key": key,
        "method": method,
        "regime": regime,
        "budget": budget,
        "budget_tokens": tokens,
        "seed": seed,
        "accuracy": accuracy,
        "per_type": {"count": accuracy / 2, "shape": accuracy},
        "count": count,
        "prefill_flops_ratio": 0.4,
        "train_flops_ratio": 0.5,
    }


def _three_seeds():
    accuracies = {
        "vanilla": (0.40, 0.44, 0.42),
        "fine-tuned-skip_vision-0.4": (0.55, 0.53, 0.54),
        "fine-tuned-fastv-0.4": (0.43, 0.47, 0.45),
        "fine-tuned-tome-64tok": (0.50, 0.60, 0.40),
        "fine-tuned-skip_vision-64tok": (0.52, 0.52, 0.52),
    }
    results = []
    for seed in (0, 1, 2):  # the harness's order: seed by seed
        for key, values in accuracies.items():
            method = "vanilla" if key == "vanilla" else key.split("-")[2]
            tokens = 64 if key.endswith("tok") else None
            results.append(_fake(key, method, seed, values[seed], budget=None if tokens else 0.4, tokens=tokens))
    return accuracies, results


def test_seeds_are_aggregated_per_row():
    accuracies, results = _three_seeds()
    rows = R.aggregate_seeds(results)
    assert [r["key"] for r in rows] == list(accuracies)
    for row in rows:
        values = accuracies[row["key"]]
        assert row["seeds"] == [0, 1, 2] and row["accuracies"] == list(values)
        assert row["accuracy"] == pytest.approx(statistics.fmean(values))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(values))
        assert row["accuracy_spread"] == row["accuracy_std"]
        assert row["per_type"]["count"] == pytest.approx(row["accuracy"] / 2)
        assert [r["seed"] for r in row["per_seed"]] == [0, 1, 2] and "seed" not in row
    one = R.aggregate_seeds([_fake("vanilla", "vanilla", 0, 0.4)])[0]  # one seed: the binomial standard error
    assert one["accuracy_std"] is None and one["accuracy_spread"] == pytest.approx(math.sqrt(0.4 * 0.6 / 300))


def test_a_difference_must_be_larger_than_the_spread():
    _, results = _three_seeds()
    rows = {r["key"]: r for r in R.aggregate_seeds(results)}
    R.add_differences(list(rows.values()))
    sv, fastv_row, tome_row = (
        rows["fine-tuned-skip_vision-0.4"],
        rows["fine-tuned-fastv-0.4"],
        rows["fine-tuned-tome-64tok"],
    )
    assert rows["vanilla"]["vs_vanilla"] is None and sv["vs_skip_vision"] is None
    assert sv["vs_vanilla"]["difference"] == pytest.approx(0.12) and not sv["vs_vanilla"]["within_spread"]
    # FastV vs vanilla: +0.03, each std 0.02: larger than the spread, a difference
    assert fastv_row["vs_vanilla"]["spread"] == pytest.approx(0.02) and not fastv_row["vs_vanilla"]["within_spread"]
    assert fastv_row["vs_skip_vision"]["reference"] == "fine-tuned-skip_vision-0.4"
    # ToMe at 64 tokens: -0.02 vs Skip-Vision at 64 tokens, but its seeds spread 0.1: within spread
    assert tome_row["vs_skip_vision"]["reference"] == "fine-tuned-skip_vision-64tok"
    assert tome_row["vs_skip_vision"]["within_spread"] and tome_row["vs_skip_vision"]["spread"] == pytest.approx(0.1)
    rule = R.compare_accuracies({"key": "a", "accuracy": 0.5, "accuracy_spread": 0.03}, sv | {"accuracy_spread": 0.01})
    assert rule["within_spread"] == (abs(0.5 - sv["accuracy"]) <= 0.03)
    table = R.markdown(list(rows.values()), 0.3, seeds=3)
    assert "0.540 ± 0.010" in table and "+0.030 |" in table and "-0.020 within spread" in table
    assert (
        "### At equal visual-token counts" in table and "| 64 tok |" in table and "standard deviation over 3" in table
    )
    assert "binomial standard error" in R.markdown(R.aggregate_seeds(results[:5]), seeds=1)


def test_a_seed_whose_vanilla_did_not_learn_is_named():
    rows = R.aggregate_seeds([_fake("vanilla", "vanilla", seed, a) for seed, a in enumerate((0.41, 0.43, 0.29))])
    notes = R.vanilla_seed_notes(rows, chance=0.33)
    assert notes[0] == "Vanilla per seed: seed 0 0.410, seed 1 0.430, seed 2 0.290."
    assert notes[1].startswith("On seed 2 vanilla is at or below the answer prior")
    assert R.vanilla_seed_notes(rows, chance=0.2) == notes[:1]
    one = R.aggregate_seeds([_fake("vanilla", "vanilla", 0, 0.4)])
    assert R.vanilla_seed_notes(one, chance=0.3) == [] and "answer prior" in R.vanilla_seed_notes(one, 0.5)[0]


# --- the command line's refusals (before any data, model or folder is made) -----------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--budget-tokens 0", "argument --budget-tokens: must be at least 1, got 0"),
        ("--budget-tokens 64 x", "argument --budget-tokens: expected a whole number, got 'x'"),
        ("--budget-tokens", "argument --budget-tokens: expected at least one argument"),
        ("--budget-tokens 64 145", "--budget-tokens 145 is above the 144 visual tokens of one image"),
        ("--budget-tokens 144", "Skip-Vision's row retains N_r = 144"),
        ("--seeds 0", "argument --seeds: must be at least 1, got 0"),
        ("--seeds two", "argument --seeds: expected a whole number"),
    ],
)
def test_compare_cli_refuses_bad_token_budgets_and_seeds(tmp_path, capsys, args, message):
    out = tmp_path / "c"
    assert cli.main(["compare", "--out", str(out), *args.split()]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_compare_cli_passes_token_budgets_and_seeds(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(C, "compare", lambda settings: seen.append(settings))
    argv = ["compare", "--out", str(tmp_path / "c"), "--budget-tokens", "64", "16", "64", "--seeds", "3"]
    assert cli.main(argv + ["--methods", "fastv", "tome"]) == 0
    assert seen[0].budget_tokens == (64, 16) and seen[0].seeds == 3 and seen[0].methods == ("fastv", "tome")
    assert cli.main(["compare", "--out", str(tmp_path / "d")]) == 0
    assert seen[1].budget_tokens == () and seen[1].seeds == 1
