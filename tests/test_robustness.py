"""Nothing lost, nothing silent: bad inputs, output folders, empty runs and CLI mistakes get clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pair, prompts
from conftest import run_cli as cli
from PIL import Image

import skipvision
from skipvision import SkipVisionConfig
from skipvision.harness.data import DataError, LlavaJsonDataset, make_dataset
from skipvision.harness.demo import format_report
from skipvision.harness.evaluate import evaluate
from skipvision.harness.presets import MODEL_PRESETS, init_model
from skipvision.harness.train import RUN_MANIFEST, TrainConfig, train

CFG = SkipVisionConfig(num_retained=16, num_skipped=24)
SKIP = MODEL_PRESETS["tiny"].skip_vision


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    train_json, test_json = make_dataset(root / "data", n=12, seed=0, image_size=168)
    return root, init_model("tiny", root / "base"), train_json, test_json


@pytest.fixture(scope="module")
def processor(tiny):
    return skipvision.load_processor(tiny[1], SKIP)


def record(rid, image=None, question="<image>\nWhat color is the shape?", answer="red"):
    out = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        out["image"] = image
    return out


def write(folder, records, images=(), size=(40, 30)):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", size, (200, 10, 10)).save(folder / "images" / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


# --- timing never divides by zero --------------------------------------------------------------------------------
def test_demo_table_survives_an_unresolved_decode_time():
    row = {
        "accuracy": 0.5,
        "train_seconds": 1.0,
        "train_step_seconds": 0.1,
        "train_flops": 1e9,
        "train_flops_measured": 1e9,
        "prefill_flops": 1e8,
        "prefill_seconds": 0.01,
        "decode_seconds_per_token": None,
        "generate_seconds": 0.1,
        "kv_cache_bytes": 1024,
    }
    table = format_report({"vanilla": dict(row), "skip_vision": dict(row), "chance_accuracy": 0.3})
    assert "decode per token" in table and " - " in table


# --- output folders --------------------------------------------------------------------------------------------
def run_config(tiny, out, **overrides):
    root, base, data, _ = tiny
    return TrainConfig(
        **{
            "model": str(base),
            "data": str(data),
            "output_dir": str(out),
            "max_steps": 1,
            "batch_size": 2,
            "save_steps": 1,
            "logging_steps": 1,
            "skip_vision": SKIP,
            **overrides,
        }
    )


def test_a_foreign_non_empty_out_is_refused_and_kept(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-50").mkdir()
    with pytest.raises(ValueError, match="is not empty.*--overwrite"):
        train(run_config(tiny, tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoint-50").is_dir()
    with pytest.raises(ValueError, match="nothing to resume: .* holds no skipvision run"):
        train(run_config(tiny, tmp_path, resume=True))
    with pytest.raises(ValueError, match="nothing to resume"):
        train(run_config(tiny, tmp_path / "empty", resume=True))


def test_rerun_refused_resume_of_a_finished_run_changes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    first = train(run_config(tiny, out))
    manifest = json.loads((out / RUN_MANIFEST).read_text())
    assert manifest["finished"] and manifest["checkpoints"] == ["checkpoint-1"]
    with pytest.raises(ValueError, match="already holds a skipvision run; pass --resume"):
        train(run_config(tiny, out))
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    again = train(run_config(tiny, out, resume=True))
    assert again["already_finished"] and again["steps"] == first["steps"] == 1
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    replaced = train(run_config(tiny, out, overwrite=True))
    assert replaced["steps"] == 1 and not replaced.get("already_finished")


def test_runs_that_would_do_nothing_are_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        train(run_config(tiny, tmp_path / "zero", max_steps=0))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        train(run_config(tiny, tmp_path / "e", data=str(empty)))
    for n in (0, -5, 1):
        with pytest.raises(ValueError, match="needs n >= 2"):
            make_dataset(tmp_path / "d", n=n)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        evaluate(tiny[1], tiny[3], limit=0)


# --- data ------------------------------------------------------------------------------------------------------
def test_every_record_bad_is_an_error_not_a_recursion(tmp_path, processor):
    path = write(tmp_path, [record("gone", "missing.png")])
    with pytest.raises(DataError, match="every record is bad"):
        LlavaJsonDataset(path, None, processor, skip_bad_records=True)
    with pytest.raises(DataError, match="1 bad record.*gone"):
        LlavaJsonDataset(path, None, processor)
    path = write(tmp_path, [record("ok", "a.png"), record("gone", "missing.png")], ["a.png"])
    with pytest.warns(UserWarning, match="skipping 1 bad record"):
        dataset = LlavaJsonDataset(path, None, processor, skip_bad_records=True)
    assert [r["id"] for r in dataset.records] == ["ok"]


def test_image_paths_are_confined_to_the_image_folder(tmp_path, processor):
    secret = tmp_path / "outside.png"
    Image.new("RGB", (40, 30)).save(secret)
    for name in ("../outside.png", str(secret)):
        path = write(tmp_path, [record("escape", name)])
        with pytest.raises(DataError, match="outside the image folder"):
            LlavaJsonDataset(path, None, processor)
        dataset = LlavaJsonDataset(path, None, processor, allow_outside_image_folder=True)
        assert dataset[0]["pixel_values"].shape[0] == 1


def test_huge_images_and_lost_answers_are_reported(tmp_path, processor):
    path = write(tmp_path, [record("big", "a.png")], ["a.png"], size=(40, 30))
    with pytest.raises(DataError, match="big.*40x30, more than max_image_pixels=100"):
        LlavaJsonDataset(path, None, processor, max_image_pixels=100)
    path = write(tmp_path, [record("long", "a.png", question="<image>\n" + "what " * 60)], ["a.png"])
    with pytest.raises(DataError, match="long: its answer does not fit in max_length=110"):  # found up front
        LlavaJsonDataset(path, None, processor, max_length=110)


def test_bad_json_files_name_the_file(tmp_path, processor):
    bad = tmp_path / "bad.json"
    bad.write_text("")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        LlavaJsonDataset(bad, None, processor)
    with pytest.raises(DataError, match="nope.json does not exist"):
        LlavaJsonDataset(tmp_path / "nope.json", None, processor)


# --- model inputs ------------------------------------------------------------------------------------------------
def test_bad_pixel_values_and_input_ids():
    _, model = pair(CFG)
    ids, mask, pixels = prompts([1], CFG, [3], [4])
    with pytest.raises(ValueError, match="NaN or inf"):
        model(input_ids=ids, pixel_values=pixels.masked_fill(torch.rand_like(pixels) > 0.5, float("nan")))
    with pytest.raises(ValueError, match="dtype torch.uint8.*normalised"):
        model(input_ids=ids, pixel_values=(pixels.abs() * 50).to(torch.uint8))
    with pytest.raises(ValueError, match="must be a torch.Tensor.*list"):
        model(input_ids=ids, pixel_values=[pixels[0]])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=ids, pixel_values=pixels[0])
    with pytest.raises(ValueError, match="input_ids must be a \\(batch, sequence\\) tensor"):
        model(input_ids=ids[0], pixel_values=pixels)
    split = ids.clone()
    first = int((split[0] == 4).nonzero()[0, 0])
    split[0, first + 5 :] = torch.roll(split[0, first + 5 :], 3)  # text moved into the middle of the image span
    with pytest.raises(ValueError, match="split by other tokens"):
        model(input_ids=split, pixel_values=pixels)


def test_config_misuse_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="skip_layers must be a list"):
        SkipVisionConfig(num_retained=2, num_skipped=3, skip_layers=3)
    with pytest.raises(ValueError, match="must be a dict"):
        SkipVisionConfig.from_dict("yes")
    vanilla, _ = pair(CFG)
    vanilla.save_pretrained(tmp_path)
    model = skipvision.from_pretrained(tmp_path, skip_vision=CFG.to_dict())  # a dict works like the config
    assert model.skip_vision_config == CFG
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "skip_vision": "yes"}))
    with pytest.raises(ValueError, match="must be a dict of SkipVisionConfig options, got 'yes'"):
        skipvision.from_pretrained(tmp_path)


# --- CLI -------------------------------------------------------------------------------------------------------
def test_cli_errors_help_and_version(tiny, tmp_path):
    root, base, data, _ = tiny
    missing = cli(
        "train", "--model", str(base), "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"), "--vanilla"
    )
    assert missing.returncode == 2 and "nope.json does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "o").exists()
    no_model = cli("eval", "--model", str(tmp_path / "nothing"), "--data", str(data))
    assert no_model.returncode == 2 and "is not a checkpoint directory" in no_model.stderr
    zero = cli("make-data", "--out", str(tmp_path / "d"), "--n", "0")
    assert zero.returncode == 2 and "needs n >= 2" in zero.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("skipvision ")
    helptext = cli("train", "--help").stdout
    assert "(default: 100)" in helptext and "--overwrite" in helptext and "peak learning rate" in helptext
    assert "tiny-next" in cli("init-model", "--help").stdout
