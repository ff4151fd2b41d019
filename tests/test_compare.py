"""``skipvision compare``: budgets matched with the FLOPs model, every ablation a valid config, and a tiny run end
to end that writes its table and resumes without recomputing a finished row."""

from __future__ import annotations

import json

import pytest

import skipvision
from skipvision.harness import compare as C
from skipvision.harness.presets import get_preset, init_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = init_model("tiny", tmp_path_factory.mktemp("base") / "base")
    model = skipvision.from_pretrained(path, skip_vision=skipvision.vanilla_config())
    return skipvision.family_of(model).model_shape(model.config)


@pytest.mark.parametrize("method", C.METHODS)
def test_budget_matching_picks_the_closest_setting(tiny, method):
    preset = get_preset("tiny").skip_vision
    cfg, ratio = C.match_budget(method, 0.45, tiny, preset, text_tokens=30)
    assert ratio == pytest.approx(C.prefill_ratio(tiny, cfg, 30))
    assert abs(ratio - 0.45) <= 0.03
    others = [abs(C.prefill_ratio(tiny, c, 30) - 0.45) for c in C.method_configs(method, tiny, preset)]
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
