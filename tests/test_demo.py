"""The main job end to end on a tiny budget: data, two trainings, eval, measurements, report, plot; and the
accuracies' standard errors and the within-the-standard-error verdict on the Skip-Vision/vanilla difference."""

from __future__ import annotations

import json
import math

import pytest
from peer_checks import COARSE

from skipvision.harness import budgets as B
from skipvision.harness import demo as D
from skipvision.harness.demo import demo

FIELDS = (
    "accuracy",
    "train_seconds",
    "train_step_seconds",
    "train_flops",
    "prefill_seconds",
    "decode_seconds_per_token",
    "kv_cache_bytes",
)


@pytest.mark.slow
def test_demo_writes_report_and_plot(tmp_path):
    demo(out=tmp_path, steps=3, num_examples=60)
    report = json.loads((tmp_path / "report.json").read_text())
    for variant in ("vanilla", "skip_vision"):
        for field in FIELDS:
            assert isinstance(report[variant][field], (int, float)), (variant, field)
    assert report["skip_vision"]["kv_cache_bytes"] < report["vanilla"]["kv_cache_bytes"]
    assert report["skip_vision"]["train_flops"] < report["vanilla"]["train_flops"]
    assert 0 < report["chance_accuracy"] < 1
    n = report["vanilla"]["test_records"]
    assert report["vanilla"]["accuracy_stderr"] == pytest.approx(D.standard_error(report["vanilla"]["accuracy"], n))
    assert set(report["accuracy_differences"]) == {"skip_vision"}
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the peers, training-free at Skip-Vision's prefill FLOPs budget
    peers = report["peers"]
    assert set(peers) == set(B.METHODS) - {"skip_vision"}  # every peer applies to LLaVA-1.5
    target = report["skip_vision"]["prefill_flops"] / report["vanilla"]["prefill_flops"]
    for name, peer in peers.items():
        assert 0 <= peer["accuracy"] <= 1 and peer["kv_cache_bytes"] < report["vanilla"]["kv_cache_bytes"], name
        assert name in COARSE or abs(peer["prefill_flops"] / report["vanilla"]["prefill_flops"] - target) <= 0.05, name


@pytest.mark.slow
def test_qwen_demo_compares_both_layouts(tmp_path):
    demo(out=tmp_path, preset="tiny-qwen2.5-vl", steps=2, num_examples=40)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["variants"] == ["vanilla", "skip_vision_inplace", "skip_vision"]
    assert report["configs"]["skip_vision_inplace"]["layout"] == "inplace"
    for variant in report["variants"][1:]:
        for field in FIELDS:
            assert isinstance(report[variant][field], (int, float)), (variant, field)
        assert report[variant]["kv_cache_bytes"] < report["vanilla"]["kv_cache_bytes"]
        assert report["ratios_by_variant"][variant]["prefill_flops"] < 1


def test_standard_error_and_the_difference_verdict():
    assert D.standard_error(0.5, 100) == pytest.approx(0.05)
    assert D.standard_error(0.0, 100) == 0.0 and D.standard_error(0.5, 0) == 0.0
    # the demo's README numbers: vanilla 0.503, Skip-Vision 0.455 on 1000 test records
    apart = D.accuracy_difference(0.455, 0.503, 1000)
    stderr = math.sqrt(0.455 * 0.545 / 1000 + 0.503 * 0.497 / 1000)
    assert apart["difference"] == pytest.approx(-0.048) and apart["stderr"] == pytest.approx(stderr)
    assert not apart["within"] and apart["z"] == 1.96  # 0.048 > 1.96 x 0.0223
    line = D.difference_line("skip_vision", apart)
    assert line.startswith("skip_vision - vanilla accuracy: -0.048 (standard error 0.022)")
    assert line.endswith("larger than 1.96 x 0.022 = 0.044, a difference")
    close = D.accuracy_difference(0.49, 0.503, 300)
    assert close["within"] and "within 1.96 x" in D.difference_line("skip_vision", close)


def test_the_printed_table_has_each_accuracy_with_its_standard_error():
    timing = dict.fromkeys(FIELDS[1:] + ("train_flops_measured", "prefill_flops", "generate_seconds"), 1.0)
    evaluation = lambda p: {"accuracy": p, "count": 400, "per_type": {}}  # noqa: E731
    report = {
        "variants": ["vanilla", "skip_vision"],
        "chance_accuracy": 0.3,
        "vanilla": timing | D._accuracy_fields(evaluation(0.5)),
        "skip_vision": timing | D._accuracy_fields(evaluation(0.45)),
        "peers": {"fastv": timing | D._accuracy_fields(evaluation(0.4))},
        "accuracy_differences": {"skip_vision": D.accuracy_difference(0.45, 0.5, 400)},
    }
    assert report["vanilla"]["accuracy_stderr"] == pytest.approx(0.025) and report["vanilla"]["test_records"] == 400
    text = D.format_report(report)
    assert "0.500±0.025" in text and "0.450±0.025" in text and "0.400±0.024" in text and "n = 400 test records" in text
    assert "skip_vision - vanilla accuracy: -0.050 (standard error 0.035): within 1.96 x 0.035 = 0.069" in text
