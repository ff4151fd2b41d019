"""The benchmark runs all three variants side by side and reports consistent ratios (no timing assertions)."""

from __future__ import annotations

import copy

import pytest
from conftest import vanilla_model

from skipvision import SkipVisionConfig
from skipvision.bench import BenchSettings, format_table, run


def test_bench_rows_and_exact_cache_sizes():
    cfg = SkipVisionConfig(num_retained=16, num_skipped=24)
    base = vanilla_model()
    settings = BenchSettings(batch_sizes=(1, 2), new_tokens=2, warmup=0, repeats=1, train=True, device="cpu")
    rows = run(copy.deepcopy(base), cfg, settings)
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("vanilla", "skip_vision_no_kv", "skip_vision")
    ]
    by = {(r["variant"], r["batch"]): r for r in rows}
    for batch in (1, 2):
        vanilla, no_kv, skip = (by[(v, batch)] for v in ("vanilla", "skip_vision_no_kv", "skip_vision"))
        prompt_full = 1 + 24 + 64  # BOS + text + 64 visual tokens
        prompt_skip = 1 + 24 + cfg.num_image_tokens
        per_entry = 2 * 3 * 2 * 16 * 4 * batch  # K+V, layers, kv heads, head dim, fp32 bytes, batch
        assert vanilla["kv_cache_bytes"] == prompt_full * per_entry
        assert no_kv["kv_cache_bytes"] == prompt_skip * per_entry
        assert skip["kv_cache_bytes"] == (prompt_skip - cfg.num_skipped) * per_entry
        assert skip["kv_cache_bytes_ratio"] == pytest.approx(skip["kv_cache_bytes"] / vanilla["kv_cache_bytes"])
        assert skip["train_flops_ratio"] < 1 and vanilla["prefill_seconds_ratio"] == 1
        assert all(r["train_step_seconds"] > 0 and r["decode_seconds_per_token"] >= 0 for r in (vanilla, skip))
    assert "skip_vision_no_kv" in format_table(rows)
