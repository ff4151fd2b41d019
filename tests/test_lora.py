"""LoRA through PEFT: what trains, Skip-FFN under the wrapper, save/load/merge equality, resume, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair, prompts, run_cli
from test_training import config, logits_on_batch, train_cli
from test_training import setup as setup  # noqa: F401  (the module-scoped fixture)

import skipvision
from skipvision import SkipVisionConfig
from skipvision.harness.presets import MODEL_PRESETS
from skipvision.harness.train import RUN_MANIFEST, train
from skipvision.lora import DEFAULT_TARGETS, LoraSettings, apply_lora

peft = pytest.importorskip("peft")
CFG = SkipVisionConfig(num_retained=16, num_skipped=24)
SKIP = MODEL_PRESETS["tiny"].skip_vision
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def lora_model(settings: LoraSettings = LORA):
    _, model = pair(CFG)
    wrapped = apply_lora(model, settings)
    with torch.no_grad():  # a non-zero B, so the adapters change the outputs
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return wrapped.eval()


def test_trainable_parameters_are_adapters_projector_and_scorer():
    wrapped = lora_model()
    base = wrapped.get_base_model()
    text = base.config.text_config
    layers, hidden, inter = text.num_hidden_layers, text.hidden_size, text.intermediate_size
    kv = hidden // text.num_attention_heads * text.num_key_value_heads
    r = LORA.r
    # A (r x in) + B (out x r) for q, k, v, o, gate, up, down
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    per_layer = sum(r * (i + o) for i, o in shapes) + r * (inter + hidden)
    projector = sum(p.numel() for p in base.model.multi_modal_projector.parameters()) // 2  # original + copy
    scorer = sum(p.numel() for p in base.summary_scorer.parameters()) // 2  # original + trained copy
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == layers * per_layer + projector + scorer
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in names)
    assert {n.split(".")[-4] for n in names if "lora_" in n} == set(DEFAULT_TARGETS)


def test_skip_ffn_runs_the_mlp_on_non_skipped_rows_under_peft():
    wrapped = lora_model()
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    base = wrapped.get_base_model()
    rows = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
        for layer in base.model.language_model.layers
    ]
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    skipped = int(skipvision.skipped_token_mask(ids, IMAGE_TOKEN_ID, CFG).sum())
    padding = int((mask == 0).sum())
    assert rows == [ids.numel() - skipped - padding] * len(base.model.language_model.layers)


def test_save_load_and_merge_give_the_same_logits(tmp_path):
    wrapped = lora_model()
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 2])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        before = wrapped(**inputs).logits
        wrapped.save_pretrained(tmp_path / "adapter")
        _, fresh = pair(CFG)
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        assert (loaded(**inputs).logits - before).abs().max() <= 1e-5
        merged = loaded.merge_and_unload()
        assert isinstance(merged, skipvision.SkipVisionLlavaForConditionalGeneration)
        assert (merged(**inputs).logits - before).abs().max() <= 1e-5
        _, untouched = pair(CFG)
        assert (untouched(**inputs).logits - before).abs().max() > 1e-3  # the adapters matter


def test_lora_run_saves_adapter_and_merged_model_and_resumes(setup):  # noqa: F811
    full = train(config(setup, "lora-straight", skip_vision=SKIP, max_steps=4, save_steps=2, lora=LORA))
    root = setup[0]
    assert (root / "lora-straight" / "final_adapter" / "adapter_config.json").is_file()
    assert (root / "lora-straight" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    merged = skipvision.from_pretrained(full["final"])
    assert merged.skip_vision_config == SKIP
    # the merged final model == the saved adapter on the base model
    _, _, data = setup
    base = skipvision.from_pretrained(setup[1], skip_vision=SKIP)
    adapter = peft.PeftModel.from_pretrained(base, root / "lora-straight" / "final_adapter").merge_and_unload()
    adapter.save_pretrained(root / "lora-from-adapter")
    skipvision.api.save_processor(skipvision.load_processor(full["final"]), root / "lora-from-adapter")
    diff = logits_on_batch(full["final"], data) - logits_on_batch(root / "lora-from-adapter", data)
    assert diff.abs().max() <= 1e-5
    # crash after step 2, resume: same loss curve and parameters
    crashed = root / "lora-crashed"
    train(config(setup, "lora-crashed", skip_vision=SKIP, max_steps=4, save_steps=2, lora=LORA))
    for name in ("checkpoint-4", "final", "final_adapter"):
        shutil.rmtree(crashed / name)
    manifest = json.loads((crashed / RUN_MANIFEST).read_text())
    (crashed / RUN_MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    resumed = train(config(setup, "lora-crashed", skip_vision=SKIP, max_steps=4, save_steps=2, lora=LORA, resume=True))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["losses"][-2:] == pytest.approx(full["losses"][-2:], rel=1e-5)
    assert resumed["params_checksum"] == pytest.approx(full["params_checksum"], rel=1e-6)
    assert full["trainable_parameters"] < sum(p.numel() for p in merged.parameters()) // 5


def test_lora_cli_options(setup):  # noqa: F811
    root = setup[0]
    common = ["--max-steps", "1", "--batch-size", "2", "--vanilla"]
    bad = run_cli(*train_cli(setup, "cli-bad"), *common, "--lora-r", "4")
    assert bad.returncode == 2 and "need --lora" in bad.stderr
    bad = run_cli(*train_cli(setup, "cli-bad2"), *common, "--lora", "--lora-targets", "no_such_proj")
    assert bad.returncode == 2 and "no LoRA target" in bad.stderr
    ok = run_cli(*train_cli(setup, "cli-lora"), *common, "--lora", "--lora-r", "4")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (root / "cli-lora" / "final" / "config.json").is_file()


def test_bad_lora_settings_name_the_problem():
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValueError, match="module names such as q_proj"):
        LoraSettings(targets=("q_proj", "layers.*"))
