"""Training on HF Trainer: both variants, reload, resume after a crash, multi-process sync, CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_torchrun

import skipvision
from skipvision.harness.data import LlavaCollator, LlavaJsonDataset, make_dataset
from skipvision.harness.presets import MODEL_PRESETS, init_model
from skipvision.harness.train import RUN_MANIFEST, TrainConfig, train

SKIP = MODEL_PRESETS["tiny"].skip_vision
CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the configs README points to, as shipped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    train_json, test_json = make_dataset(root / "data", n=60, seed=0, image_size=168)
    return root, init_model("tiny", root / "base"), train_json


def config(setup, name, **overrides):
    root, base, data = setup
    return TrainConfig(
        **{
            "model": str(base),
            "data": str(data),
            "output_dir": str(root / name),
            "max_steps": 2,
            "batch_size": 2,
            "save_steps": 1,
            "logging_steps": 1,
            **overrides,
        }
    )


def train_cli(setup, name: str) -> list[str]:
    """``train`` arguments for the module's base model and data, into ``<root>/<name>``."""
    root, base, data = setup
    return ["train", "--model", str(base), "--data", str(data), "--out", str(root / name)]


def logits_on_batch(model_dir, data):
    model = skipvision.from_pretrained(model_dir).eval()
    processor = skipvision.load_processor(model_dir)
    ds = LlavaJsonDataset(data, None, processor)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("variant", ["vanilla", "skip_vision"])
def test_two_step_run_saves_a_reloadable_checkpoint(setup, variant):
    cfg = config(setup, f"smoke-{variant}", skip_vision=SKIP if variant == "skip_vision" else None)
    summary = train(cfg)
    assert summary["steps"] == 2 and len(summary["losses"]) == 2 and all(loss > 0 for loss in summary["losses"])
    final = summary["final"]
    model = skipvision.from_pretrained(final)
    if variant == "vanilla":
        assert model.skip_vision_config.num_skipped == 0 and model.summary_scorer is None
    else:
        assert model.skip_vision_config == SKIP
    out = setup[0] / f"smoke-{variant}"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / ".staging").exists()
    # the final save_pretrained directory and the last Trainer checkpoint hold the same model
    assert torch.equal(logits_on_batch(final, setup[2]), logits_on_batch(out / "checkpoint-2", setup[2]))


def test_resume_after_a_crash_reproduces_the_loss_curve(setup):
    full = train(config(setup, "straight", skip_vision=SKIP, max_steps=4, save_steps=2))
    crashed = setup[0] / "crashed"
    partial = train(config(setup, "crashed", skip_vision=SKIP, max_steps=4, save_steps=2))
    shutil.rmtree(crashed / "checkpoint-4")  # the crash: step 4 never reached disk, nor the end of the run
    shutil.rmtree(crashed / "final")
    manifest = json.loads((crashed / RUN_MANIFEST).read_text())
    (crashed / RUN_MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    (crashed / ".staging" / "checkpoint-6").mkdir(parents=True)  # a half-written checkpoint is never resumed
    resumed = train(config(setup, "crashed", skip_vision=SKIP, max_steps=4, save_steps=2, resume=True))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert partial["losses"] == full["losses"]
    assert resumed["losses"][-2:] == pytest.approx(full["losses"][-2:], rel=1e-5)
    assert resumed["params_checksum"] == pytest.approx(full["params_checksum"], rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(setup):
    out = setup[0] / "ddp"
    args = ["-m", "skipvision", *train_cli(setup, "ddp")]
    args += ["--max-steps", "2", "--batch-size", "2", "--save-steps", "2", "--train-vision-tower"]
    result = run_torchrun(*args, "--num-retained", "36", "--num-skipped", "36")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["steps"] == 2


def test_cli_rejects_unknown_options_and_bad_settings(setup):
    bad = run_cli(*train_cli(setup, "x"), "--retain-ratio", "2")
    assert bad.returncode == 2 and "unrecognized arguments: --retain-ratio" in bad.stderr
    too_many = run_cli(*train_cli(setup, "x"), "--num-retained", "100", "--num-skipped", "100")
    assert too_many.returncode == 2 and "larger than the 144 visual tokens" in too_many.stderr


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_match_one_process(setup):
    """FSDP2 (``fully_shard`` on the family's decoder and vision blocks, gloo) trains a Skip-Vision model like one
    process on the same global batches, and its gathered checkpoint loads and generates."""
    import fsdp_worker

    root, base, data = setup
    out = root / "fsdp2"
    result = run_torchrun(fsdp_worker.__file__, str(base), str(data), str(out), "4", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "fsdp.json").read_text())
    assert report["sharded_blocks"] > 0 and report["local_params"] < report["params"]  # really sharded
    model, processor = fsdp_worker.load(str(base))
    examples, collate = fsdp_worker.batches(processor, str(data), 4, 3)
    losses = fsdp_worker.train_steps(model, examples, collate)
    # same updates up to float reduction order (sharded all-gathers, a 2-way gradient average): fp32 noise
    assert report["losses"] == pytest.approx(losses, abs=1e-4)
    sharded = skipvision.from_pretrained(out / "final").eval()
    reference = model.state_dict()
    assert max(float((p - reference[k]).abs().max()) for k, p in sharded.state_dict().items()) <= 1e-4
    assert sharded.skip_vision_config == fsdp_worker.SKIP
    batch = collate(examples[0][:2])
    batch.pop("labels")
    generated = sharded.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.slow
def test_fsdp_request_is_filled_from_the_model_and_never_silently_dropped(setup):
    from skipvision.harness.train import with_fsdp_wrap_classes

    model = skipvision.from_pretrained(setup[1], skip_vision=SKIP)
    blocks = skipvision.family_of(model).block_class_names(model)
    assert blocks == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    filled = with_fsdp_wrap_classes(json.loads((CONFIGS / "fsdp.json").read_text()), blocks)
    assert filled["fsdp_config"]["transformer_layer_cls_to_wrap"] == blocks
    # on this CPU-only machine accelerate would quietly run plain DDP under torchrun; the run refuses instead
    args = '{"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}'
    result = run_torchrun("-m", "skipvision", *train_cli(setup, "fsdp-cpu"), "--vanilla", "--training-args", args)
    assert result.returncode != 0 and "FSDP was requested but accelerate set up" in result.stderr


@pytest.fixture(scope="module")
def one_process_reference(setup):
    """One process, the global batch of the two-process runs (2 ranks x 2)."""
    return train(config(setup, "one-process-b4", skip_vision=SKIP, max_steps=3, batch_size=4, save_steps=3))


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_zero_two_cpu_processes_match_one_process(setup, one_process_reference, zero):
    """DeepSpeed's CPU accelerator (gloo) through Trainer: same losses and final weights as one process, and the
    gathered final checkpoint loads and generates (ZeRO-3 holds one sharded copy, gathered at save)."""
    pytest.importorskip("deepspeed")
    root, _, data = setup
    out = root / f"ds-{zero}"
    run = ["-m", "skipvision", *train_cli(setup, f"ds-{zero}"), "--max-steps", "3"]
    run += ["--batch-size", "2", "--save-steps", "3", "--logging-steps", "1", "--num-retained", "36"]
    run += ["--num-skipped", "36", "--training-args", json.dumps({"deepspeed": str(CONFIGS / f"{zero}.json")})]
    result = run_torchrun(*run, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["engine"]["distributed_type"] == "DEEPSPEED" and summary["world_size"] == 2
    assert summary["losses"] == pytest.approx(one_process_reference["losses"], abs=1e-4)
    sharded = skipvision.from_pretrained(out / "final").eval()
    reference = skipvision.from_pretrained(one_process_reference["final"]).state_dict()
    assert max(float((p - reference[k]).abs().max()) for k, p in sharded.state_dict().items()) <= 1e-5
    processor = skipvision.load_processor(out / "final")
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([LlavaJsonDataset(data, None, processor)[0]])
    batch.pop("labels")
    generated = sharded.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_a_torchrun_train_ends_its_process_group(tmp_path):
    """`skipvision train` under torchrun tears the rank's process group down before the process exits (left to
    interpreter shutdown, gloo's threads can abort a rank whose run succeeded); outside torchrun it does nothing."""
    import torch.distributed as dist

    from skipvision.harness.cli import _end_process_group

    _end_process_group()  # no process group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
