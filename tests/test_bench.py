"""The benchmark runs all three variants side by side and reports consistent ratios (no timing assertions)."""

from __future__ import annotations

import pytest
from families import FAMILIES, processor, vanilla_model

from skipvision.harness.bench import (
    BenchSettings,
    format_table,
    round_ratio_quartiles,
    run,
    scaling_summary,
    trainer_optimizer,
)

SETTINGS = dict(new_tokens=2, warmup=0, repeats=1, device="cpu")


def test_bench_rows_and_exact_cache_sizes():
    cfg = FAMILIES["llava"][1]
    base = vanilla_model("llava")
    rows = run(base, processor("llava", None), cfg, BenchSettings(batch_sizes=(1, 2), train=True, **SETTINGS))
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("vanilla", "skip_vision_no_kv", "skip_vision")
    ]
    by = {(r["variant"], r["batch"]): r for r in rows}
    text = base.config.get_text_config()
    for batch in (1, 2):
        vanilla, no_kv, skip = (by[(v, batch)] for v in ("vanilla", "skip_vision_no_kv", "skip_vision"))
        assert vanilla["sequence_length"] - no_kv["sequence_length"] == 16 - cfg.num_image_tokens  # V=16 per image
        head_dim = text.hidden_size // text.num_attention_heads
        per_entry = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4 * batch  # K+V, fp32
        assert vanilla["kv_cache_bytes"] == vanilla["sequence_length"] * per_entry
        assert no_kv["kv_cache_bytes"] == no_kv["sequence_length"] * per_entry
        assert skip["kv_cache_bytes"] == (no_kv["sequence_length"] - cfg.num_skipped) * per_entry
        assert skip["kv_cache_bytes_ratio"] == pytest.approx(skip["kv_cache_bytes"] / vanilla["kv_cache_bytes"])
        assert skip["train_flops_ratio"] < 1 and vanilla["prefill_seconds_ratio"] == 1
        for r in (vanilla, skip):  # a duration is positive, or None when too small to resolve, never 0
            assert r["train_step_seconds"] > 0
            # the prefill splits into the tower (timed by hooks, removed afterwards) and the rest
            assert 0 < r["prefill_tower_seconds"] < r["prefill_seconds"]
            assert r["prefill_without_tower_seconds"] == pytest.approx(
                r["prefill_seconds"] - r["prefill_tower_seconds"]
            )
            assert r["decode_seconds_per_token"] is None or r["decode_seconds_per_token"] > 0
        assert skip["prefill_language_model_flops_ratio"] < skip["prefill_flops_ratio"] < 1
        assert len(skip["rounds"]["prefill_seconds"]) == 1  # one sample per round (repeats=1): no quartiles
        assert "prefill_seconds_ratio_quartiles" not in skip
    assert "skip_vision_no_kv" in format_table(rows)
    tower = base.model.vision_tower
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    # the timed step's optimizer is HF Trainer's default (adamw_torch_fused), over the trainable parameters only
    tower.requires_grad_(False)
    optimizer = trainer_optimizer(base)
    assert optimizer.defaults["fused"] is True
    trainable = {id(p) for p in base.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable


def test_round_ratio_quartiles_pair_each_round_with_vanillas():
    # each round's ratio is taken against vanilla's sample of the same round: a drift shared by both cancels
    vanilla = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert round_ratio_quartiles([0.5 * v for v in vanilla], vanilla) == pytest.approx([0.5, 0.5])
    assert round_ratio_quartiles([0.5, 1.0, 2.0], [1.0, 2.0, 4.0]) is None  # too few rounds
    first, third = round_ratio_quartiles([1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 8)
    assert first <= 1.0 < third <= 5.0


def test_bench_tiles_scale_for_anyres():
    cfg = FAMILIES["llava-next"][1]
    base = vanilla_model("llava-next")
    settings = BenchSettings(batch_sizes=(1,), tiles=(1, 4), train=False, **{**SETTINGS, "repeats": 4})
    rows = run(base, processor("llava-next", None), cfg, settings)
    for r in rows:  # four rounds give each Skip-Vision row its per-round quartiles; vanilla's ratio is 1 by definition
        quartiles = r.get("prefill_seconds_ratio_quartiles")
        assert (quartiles is None) == (r["variant"] == "vanilla")
        assert quartiles is None or 0 < quartiles[0] <= quartiles[1]
    by = {(r["variant"], r["tiles"]): r for r in rows}
    base_tokens = 16
    # vanilla: base + tiles + one newline per grid row; Skip-Vision: N_r + merged N_s + 2 whatever the tiles
    assert by[("vanilla", 4)]["sequence_length"] - by[("vanilla", 1)]["sequence_length"] == 3 * base_tokens + 8 - 4
    assert by[("skip_vision", 4)]["sequence_length"] == by[("skip_vision", 1)]["sequence_length"]
    (entry,) = scaling_summary(rows)
    assert entry["from_tiles"] == 1 and entry["to_tiles"] == 4
    assert 0 < entry["prefill_flops_growth_ratio"] < 0.5
    assert "tiles" in format_table(rows)


def test_gpu_command_runs_on_the_cpu_at_a_tiny_preset():
    """The commands of scripts/gpu_check.sh, at a tiny preset on the CPU: op counts (deterministic, so checked)
    and the paper's latency protocol (a decode step per variant and cache; timings not checked). The paper-size
    presets are refused on the CPU by name."""
    from conftest import run_cli

    counts = run_cli("bench", "--preset", "tiny", "--count-ops", "--batch-sizes", "2")
    assert counts.returncode == 0, counts.stderr
    lines = {line.split("|")[2].strip(): line for line in counts.stdout.splitlines() if line.startswith("| 2 ")}
    assert set(lines) == {"vanilla", "skip_vision_no_kv", "skip_vision"}
    decode_syncs = lines["skip_vision"].split("|")[6]
    assert decode_syncs.strip().endswith("(+0)")  # no host sync added to a decode step
    latency = run_cli(
        "bench", "--preset", "tiny", "--latency", "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1"
    )
    assert latency.returncode == 0, latency.stderr
    rows = [line for line in latency.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 6  # 2 caches x 3 variants
    refused = run_cli("bench", "--preset", "llava-1.5-7b", "--device", "cpu")
    assert refused.returncode == 2 and "paper-size model" in refused.stderr


def test_paper_presets_have_the_papers_geometry():
    """Parameter counts of the paper-size presets, built on the meta device (no memory): LLaVA-1.5-7B is 7.06 B,
    Qwen2.5-VL-7B 8.29 B."""
    from skipvision.harness.presets import MODEL_PRESETS, build_model, build_tokenizer, tokenizer_corpus

    expected = {"llava-1.5-7b": 7.06, "llava-next-7b": 7.06, "qwen2.5-vl-7b": 8.29}
    for name, billions in expected.items():
        preset = MODEL_PRESETS[name]
        model = build_model(preset, build_tokenizer(tokenizer_corpus(), family=preset.family), device="meta")
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions, name
