"""``train --resume`` continues a run only with the settings it started with, and says when there is nothing to do.

One 1-step run is trained for the module; "unfinished" copies of it (the manifest says not finished) stand for a
run that crashed. Every refusal happens before the model loads and leaves the run's files as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from skipvision.harness import cli
from skipvision.harness.data import make_dataset
from skipvision.harness.presets import init_model
from skipvision.harness.train import RUN_MANIFEST, TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    base = init_model("tiny", root / "base")
    train_json, _ = make_dataset(root / "data", n=12, seed=0, image_size=168)
    out = root / "run"
    assert cli.main(command(base, train_json, out, "36", "36")) == 0
    return {"root": root, "base": base, "data": train_json, "out": out}


def command(base: Path, data: Path, out: Path, retained: str | None, skipped: str | None, *extra: str) -> list[str]:
    """The run's command line: 1 step of batch 2, N_r/N_s as given (None: --vanilla)."""
    settings = ["--vanilla"] if retained is None else ["--num-retained", retained, "--num-skipped", skipped]
    common = ["--max-steps", "1", "--batch-size", "2", "--save-steps", "1"]
    return ["train", "--model", str(base), "--data", str(data), "--out", str(out), *common, *settings, *extra]


def unfinished_copy(run: dict[str, Path], name: str) -> Path:
    """The run as a crash leaves it: its checkpoint, no final model, the manifest not finished."""
    copy = run["root"] / name
    shutil.copytree(run["out"], copy)
    shutil.rmtree(copy / "final")
    manifest = json.loads((copy / RUN_MANIFEST).read_text())
    (copy / RUN_MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    return copy


def stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(run, out, capsys, retained, skipped, *extra) -> tuple[int, str, str]:
    code = cli.main(command(run["base"], run["data"], out, retained, skipped, "--resume", *extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_manifest_records_the_run_settings(run):
    settings = json.loads((run["out"] / RUN_MANIFEST).read_text())["settings"]
    assert settings["skip_vision"]["num_retained"] == 36 and settings["max_steps"] == 1
    assert settings["batch_size"] == 2 and settings["model"] == str(run["base"].resolve())


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "crashed"])
def test_resume_with_another_num_retained_is_refused(run, capsys, finished):
    """(a) a 36/36 run resumed with --num-retained 72 must not end as a 72/36 model under a 36/36 manifest."""
    out = run["out"] if finished else unfinished_copy(run, "crashed-a")
    before = stamps(out)
    code, _, err = resume(run, out, capsys, "72", "36")
    assert code == 2 and err.startswith("error: cannot resume the run") and err.count("\n") == 1
    assert "num_retained 36 -> 72" in err and "--overwrite" in err
    assert stamps(out) == before


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "crashed"])
def test_resume_as_vanilla_is_refused(run, capsys, finished):
    """(b) --resume --vanilla on a Skip-Vision run: a message, not a RuntimeError from loading the checkpoint."""
    out = run["out"] if finished else unfinished_copy(run, "crashed-b")
    code, _, err = resume(run, out, capsys, None, None)
    assert code == 2 and "Traceback" not in err
    assert "Skip-Vision settings: N_r=36 N_s=36 (full layout) -> vanilla" in err


def test_more_steps_on_a_finished_run_are_refused(run, capsys):
    """(c) a larger --max-steps on a finished run is not silently ignored."""
    before = stamps(run["out"])
    code, _, err = resume(run, run["out"], capsys, "36", "36", "--max-steps", "3")
    assert code == 2 and "finished at step 1" in err and "start a new run with --max-steps 3" in err
    assert stamps(run["out"]) == before


def test_other_batch_size_is_refused_on_a_crashed_run(run, capsys):
    out = unfinished_copy(run, "crashed-c")
    code, _, err = resume(run, out, capsys, "36", "36", "--batch-size", "4")
    assert code == 2 and "--batch-size: 2 -> 4" in err


def test_resuming_a_finished_run_says_there_is_nothing_to_do(run, capsys):
    before = stamps(run["out"])
    code, out, err = resume(run, run["out"], capsys, "36", "36", "--save-steps", "5")  # saving is not a setting
    assert code == 0 and "already finished (step 1, the same settings); nothing to do" in out
    assert json.loads(out[out.index("{") :])["already_finished"] is True
    assert stamps(run["out"]) == before


def test_a_manifest_without_recorded_settings_is_checked_on_what_it_has(run):
    """Runs written before the settings were recorded still refuse a changed Skip-Vision setting."""
    out = run["root"] / "old-manifest"
    shutil.copytree(run["out"], out)
    manifest = json.loads((out / RUN_MANIFEST).read_text())
    del manifest["settings"]
    (out / RUN_MANIFEST).write_text(json.dumps(manifest))
    base = TrainConfig(
        model=str(run["base"]), data=str(run["data"]), output_dir=str(out), max_steps=1, batch_size=2, resume=True
    )
    with pytest.raises(ValueError, match="Skip-Vision settings: N_r=36 N_s=36 \\(full layout\\) -> vanilla"):
        train(base)
