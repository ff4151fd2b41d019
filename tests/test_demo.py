"""The main job end to end on a tiny budget: data, two trainings, eval, measurements, report, plot."""

from __future__ import annotations

import json

import pytest

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
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the peers, training-free at Skip-Vision's prefill FLOPs budget
    peers = report["peers"]
    assert set(peers) == {"fastv", "pyramid_drop", "visionzip", "tome", "drop_random", "drop_position"}
    target = report["skip_vision"]["prefill_flops"] / report["vanilla"]["prefill_flops"]
    for name, peer in peers.items():
        assert 0 <= peer["accuracy"] <= 1 and peer["kv_cache_bytes"] < report["vanilla"]["kv_cache_bytes"], name
        assert abs(peer["prefill_flops"] / report["vanilla"]["prefill_flops"] - target) <= 0.05, name


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
