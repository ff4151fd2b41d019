"""Every bad command line is one ``error: ...`` line on stderr with exit status 2: no traceback, no silent result.

The table below is run in-process through ``skipvision.harness.cli.main``; the checkpoints it needs (a tiny one and
damaged copies of it) are built once for the module. A few rows inject a failure (a full disk, a read-only folder)
that a test cannot otherwise cause.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from skipvision.harness import cli
from skipvision.harness import train as train_module
from skipvision.harness.data import make_dataset
from skipvision.harness.presets import init_model


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-errors")
    base = init_model("tiny", root / "base")
    train_json, test_json = make_dataset(root / "data", n=12, seed=0, image_size=168)
    files = {p.name for p in base.iterdir()}

    def copy(name: str, leave_out: set[str] = frozenset(), config: dict | None = None) -> Path:
        target = root / name
        target.mkdir()
        for file in files - set(leave_out):
            shutil.copy(base / file, target / file)
        if config is not None:
            original = json.loads((base / "config.json").read_text())
            (target / "config.json").write_text(json.dumps({**original, **config}))
        return target

    (copy("zero") / "model.safetensors").write_bytes(b"")
    truncated = copy("truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    copy("no-processor", leave_out=files - {"config.json", "model.safetensors"})
    copy("no-weights", leave_out={"model.safetensors"})
    copy("unknown-type", config={"model_type": "no_such_model"})
    copy("misfit-config", config={"model_type": "paligemma"})  # parses as another model type's config and fails
    copy("other-family", config={"model_type": "llava_next"})  # loads, but its weights do not fit that family
    (root / "a-file").write_text("not a folder")
    (root / "not-json.json").write_text("{oops")
    (root / "data" / "one-missing-image.json").write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "image": "nope.png",
                    "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}],
                }
            ]
        )
    )
    (root / "old-compare").mkdir()  # a folder of a full comparison (400 steps) that --quick must not mix into
    full = {"preset": "tiny", "steps": 400, "num_examples": 6000, "eval_limit": 300, "seed": 0, "timing_repeats": 3}
    (root / "old-compare" / "compare_settings.json").write_text(json.dumps(full))
    (root / "read-only").mkdir()
    os.chmod(root / "read-only", 0o555)
    return {
        "root": str(root),
        "base": str(base),
        "train": str(train_json),
        "test": str(test_json),
        "image": str(next((root / "data" / "images").iterdir())),
    }


def _train(extra: str) -> str:
    return "train --model {base} --data {train} --out {root}/run-x " + extra


def _eval(extra: str) -> str:
    return "eval --model {base} --data {test} " + extra


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up at the run's first write (its manifest), after the model has loaded."""

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(train_module, "write_json_atomically", full)


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder (root ignores permission bits, so for root the refusal is injected)."""
    if os.geteuid() != 0:
        return
    original = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "read-only":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


# (id, command line with {placeholders}, what the message must name, injected failure or None)
CASES = [
    # the command line itself
    ("no-command", "", "required: command", None),
    ("unknown-command", "fly", "invalid choice: 'fly'", None),
    ("unknown-option", _train("--vanilla --retain-ratio 2"), "unrecognized arguments: --retain-ratio", None),
    # init-model, make-data
    ("init-out-is-file", "init-model --out {root}/a-file", "is a file", None),
    ("init-out-under-file", "init-model --out {root}/a-file/sub", "cannot be written", None),
    ("init-unknown-preset", "init-model --preset huge --out {root}/m", "invalid choice: 'huge'", None),
    ("data-one-record", "make-data --out {root}/d --n 1", "needs n >= 2", None),
    ("data-tiny-images", "make-data --out {root}/d --image-size 4", "--image-size: must be at least 16", None),
    ("data-out-is-file", "make-data --out {root}/a-file", "is a file", None),
    # train: numbers
    ("train-grad-accum-0", _train("--vanilla --grad-accum 0"), "--grad-accum: must be at least 1", None),
    ("train-batch-0", _train("--vanilla --batch-size 0"), "--batch-size: must be at least 1", None),
    ("train-steps-0", _train("--vanilla --max-steps 0"), "--max-steps: must be at least 1", None),
    ("train-lr-0", _train("--vanilla --lr 0"), "--lr: must be a positive number", None),
    ("train-lr-text", _train("--vanilla --lr fast"), "--lr: expected a number", None),
    ("train-save-steps-0", _train("--vanilla --save-steps 0"), "--save-steps: must be at least 1", None),
    ("train-max-length-0", _train("--vanilla --max-length 0"), "--max-length: must be at least 1", None),
    ("train-lora-rank-0", _train("--vanilla --lora --lora-r 0"), "--lora-r: must be at least 1", None),
    ("train-lora-dropout", _train("--vanilla --lora --lora-dropout 1.5"), "LoRA dropout must be in [0, 1)", None),
    ("train-lora-options-alone", _train("--vanilla --lora-r 4"), "need --lora", None),
    # train: Skip-Vision settings
    (
        "train-inplace-num-skipped",
        _train("--layout inplace --num-retained 36 --num-skipped 36"),
        "takes no --num-skipped",
        None,
    ),
    ("train-inplace-merge", _train("--layout inplace --num-retained 36 --merge tome"), "takes no --merge", None),
    ("train-retained-alone", _train("--num-retained 36"), "go together", None),
    ("train-fraction-over-1", _train("--num-retained 1.5 --num-skipped 3"), "fraction in (0, 1]", None),
    ("train-vanilla-and-settings", _train("--vanilla --num-retained 36"), "--vanilla has no Skip-Vision", None),
    ("train-negative-skip-layer", _train("--vanilla --skip-layers -1"), "--skip-layers: must be at least 0", None),
    ("train-no-settings", _train(""), "give --num-retained and --num-skipped", None),
    (
        "train-too-many-tokens",
        _train("--num-retained 100 --num-skipped 100"),
        "larger than the 144 visual tokens",
        None,
    ),
    # train: runs and folders
    ("train-resume-and-overwrite", _train("--vanilla --resume --overwrite"), "give one of them", None),
    ("train-resume-nothing", _train("--vanilla --resume"), "nothing to resume", None),
    ("train-out-is-file", "train --model {base} --data {train} --out {root}/a-file --vanilla", "is a file", None),
    (
        "train-out-read-only",
        "train --model {base} --data {train} --out {root}/read-only --vanilla",
        "cannot be written: Permission denied",
        _read_only,
    ),
    (
        "train-disk-full",
        "train --model {base} --data {train} --out {root}/full --vanilla --max-steps 1",
        "No space left on device",
        _full_disk,
    ),
    ("train-unknown-training-arg", _train('--vanilla --training-args {{"nope":1}}'), "unknown TrainingArguments", None),
    ("train-training-args-file", _train("--vanilla --training-args no.json"), "neither a JSON object", None),
    ("train-image-folder-missing", _train("--vanilla --image-folder {root}/nope"), "is not a folder", None),
    # train: data and checkpoints
    (
        "train-data-missing",
        "train --model {base} --data {root}/no.json --out {root}/r --vanilla",
        "does not exist",
        None,
    ),
    (
        "train-data-not-json",
        "train --model {base} --data {root}/not-json.json --out {root}/r --vanilla",
        "is not valid JSON",
        None,
    ),
    ("train-no-checkpoint", _train("--vanilla").replace("{base}", "{root}/none"), "not a checkpoint directory", None),
    (
        "train-zero-byte-weights",
        _train("--vanilla").replace("{base}", "{root}/zero"),
        "not a complete safetensors",
        None,
    ),
    (
        "train-truncated-weights",
        _train("--vanilla").replace("{base}", "{root}/truncated"),
        "not a complete safetensors",
        None,
    ),
    ("train-no-weights", _train("--vanilla").replace("{base}", "{root}/no-weights"), "no weights", None),
    (
        "train-no-processor",
        _train("--vanilla").replace("{base}", "{root}/no-processor"),
        "cannot load its processor",
        None,
    ),
    (
        "train-unknown-model-type",
        _train("--vanilla").replace("{base}", "{root}/unknown-type"),
        "cannot read its config.json",
        None,
    ),
    (
        "train-misfit-config",
        _train("--vanilla").replace("{base}", "{root}/misfit-config"),
        "cannot read its config.json",
        None,
    ),
    # eval
    ("eval-out-under-file", _eval("--out {root}/a-file/x.json"), "is not an existing folder", None),
    ("eval-out-is-folder", _eval("--out {root}"), "is a folder", None),
    ("eval-limit-0", _eval("--limit 0"), "--limit: must be at least 1", None),
    ("eval-batch-0", _eval("--batch-size 0"), "--batch-size: must be at least 1", None),
    ("eval-other-family", "eval --model {root}/other-family --data {test} --limit 1", "does not match", None),
    ("eval-disk-full", _eval("--limit 1 --out /dev/full"), "No space left on device", None),
    # generate
    ("generate-new-tokens-0", "generate --model {base} --prompt hi --max-new-tokens 0", "must be at least 1", None),
    ("generate-no-prompt", "generate --model {base}", "give --prompt", None),
    ("generate-missing-image", "generate --model {base} --prompt hi --image {root}/no.png", "cannot read image", None),
    ("generate-batch-missing", "generate --model {base} --batch {root}/no.json", "does not exist", None),
    ("generate-batch-and-prompt", "generate --model {base} --batch {test} --prompt hi", "not both", None),
    ("generate-zero-weights", "generate --model {root}/zero --prompt hi", "not a complete safetensors", None),
    # flops
    ("flops-text-tokens", "flops --preset llava-1.5-7b --text-tokens -5", "--text-tokens: must be at least 0", None),
    ("flops-new-tokens", "flops --preset llava-1.5-7b --new-tokens -3", "--new-tokens: must be at least 0", None),
    ("flops-inplace-skipped", "flops --preset llava-1.5-7b --layout inplace --num-skipped 5", "takes no", None),
    ("flops-too-many", "flops --preset llava-1.5-7b --num-retained 999", "larger than", None),
    ("flops-tiles", "flops --preset llava-1.5-7b --tiles 9", "--tiles: invalid choice", None),
    # bench
    ("bench-batch-0", "bench --batch-sizes 0", "--batch-sizes: must be at least 1", None),
    ("bench-repeats-0", "bench --repeats 0", "--repeats: must be at least 1", None),
    ("bench-new-tokens-0", "bench --new-tokens 0", "--new-tokens: must be at least 1", None),
    ("bench-warmup", "bench --warmup -1", "--warmup: must be at least 0", None),
    ("bench-bad-device", "bench --device toaster", "not a torch device", None),
    ("bench-vanilla", "bench --vanilla", "nothing to compare", None),
    ("bench-out-is-folder", "bench --out {root}", "is a folder", None),
    ("bench-tiles", "bench --tiles 3 --no-train", "no anyres grid of 3 tiles", None),
    ("bench-truncated-model", "bench --model {root}/truncated", "not a complete safetensors", None),
    # demo
    ("demo-steps-0", "demo --out {root}/demo --steps 0", "--steps: must be at least 1", None),
    ("demo-n-1", "demo --out {root}/demo --n 1", "--n: must be at least 2", None),
    ("demo-out-is-file", "demo --out {root}/a-file", "is a file", None),
    # compare
    (
        "compare-fine-tune-budget",
        "compare --out {root}/c --fine-tune-budgets 0.33",
        "0.33 is not one of --budgets",
        None,
    ),
    ("compare-fine-tune-text", "compare --out {root}/c --fine-tune-budgets most", "takes budgets or 'all'", None),
    (
        "compare-fine-tune-no-regime",
        "compare --out {root}/c --regimes training-free --fine-tune-budgets 0.4",
        "needs the fine-tuned regime",
        None,
    ),
    (
        "compare-fine-tune-method",
        "compare --out {root}/c --methods fastv --fine-tune-methods skip_vision",
        "fine-tune methods ['skip_vision'] are not among the methods",
        None,
    ),
    ("compare-budget-0", "compare --out {root}/c --budgets 0", "in (0, 1]", None),
    ("compare-budget-over-1", "compare --out {root}/c --budgets 1.5", "in (0, 1]", None),
    ("compare-method", "compare --out {root}/c --methods magic", "unknown method", None),
    ("compare-regime", "compare --out {root}/c --regimes lucky", "unknown method or regime", None),
    ("compare-ablation", "compare --out {root}/c --ablations no_everything", "unknown ablation", None),
    ("compare-steps-0", "compare --out {root}/c --steps 0", "--steps: must be at least 1", None),
    ("compare-eval-limit", "compare --out {root}/c --eval-limit -1", "--eval-limit: must be at least 0", None),
    ("compare-nothing", "compare --out {root}/c --methods", "no method, regime or ablation", None),
    ("compare-data-alone", "compare --out {root}/c --data {train}", "give both", None),
    ("compare-other-run", "compare --out {root}/old-compare --quick", "steps 400 -> 200", None),
    ("compare-out-is-file", "compare --out {root}/a-file --quick", "is a file", None),
    # lmms-eval-task
    ("task-new-tokens-0", "lmms-eval-task --data {test} --out {root}/t --max-new-tokens 0", "must be at least 1", None),
    ("task-name", "lmms-eval-task --data {test} --out {root}/t --name a/b", "--name: expected letters", None),
    ("task-data-missing", "lmms-eval-task --data {root}/no.json --out {root}/t", "does not exist", None),
    ("task-out-is-file", "lmms-eval-task --data {test} --out {root}/a-file", "is a file", None),
    (
        "task-missing-image",
        "lmms-eval-task --data {root}/data/one-missing-image.json --out {root}/t",
        "no image file",
        None,
    ),
]
#: rows whose failure comes after the model has loaded (HF may print its progress bars and reports first)
AFTER_LOADING = {"train-too-many-tokens", "train-disk-full", "eval-other-family", "eval-disk-full", "bench-tiles"}


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len({c[1] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "command", "names", "inject"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(env, capsys, monkeypatch, name, command, names, inject):
    if name == "eval-disk-full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    if inject is not None:
        inject(monkeypatch)
    argv = command.format(**env).split()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if name not in AFTER_LOADING:  # checked before any work: nothing else was printed
        assert len(lines) == 1, err
    assert names in errors[0], errors[0]


def test_bench_without_cuda_names_the_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no cuda device is available") and err.count("\n") == 1


def test_eval_out_is_checked_before_the_evaluation(env, capsys, monkeypatch):
    """A bad --out is refused before the model loads, not after the whole evaluation."""
    import skipvision.harness.evaluate

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran although --out cannot be written")

    monkeypatch.setattr(skipvision.harness.evaluate, "evaluate", never)
    assert cli.main(_eval("--out /proc/skipvision-no/x.json").format(**env).split()) == 2
    assert "is not an existing folder" in capsys.readouterr().err


def test_failed_checks_leave_no_run_behind(env, capsys):
    """A checkpoint that cannot load is refused before the output folder is claimed: the same command with a good
    checkpoint then runs into the same folder without --overwrite."""
    out = Path(env["root"]) / "claimed"
    for model in ("zero", "no-processor"):
        argv = ["train", "--model", f"{env['root']}/{model}", "--data", env["train"], "--out", str(out), "--vanilla"]
        assert cli.main(argv) == 2
    assert not out.exists() or not any(out.iterdir())
    capsys.readouterr()


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only expected error types become messages; a bug (here a KeyError) still raises."""

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "cmd_flops", bug)  # the parser binds the command when main builds it
    with pytest.raises(KeyError):
        cli.main(["flops", "--preset", "llava-1.5-7b"])


def test_help_shows_each_default_once(capsys):
    for command in ("train", "bench", "compare", "demo", "flops", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "default: the checkpoint's) (default" not in text and "(default 6000) (default" not in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "(default: 100)" in capsys.readouterr().out


def test_quick_compare_says_what_it_leaves_out_and_keeps_given_options():
    from skipvision.harness.compare import QUICK, CompareSettings, quick

    fast = quick(CompareSettings(out=Path("unused")))
    assert fast.steps == QUICK["steps"] and fast.budgets == (0.4,) and fast.fine_tune_methods == ("skip_vision",)
    notes = "; ".join(fast.notes)
    left_out = ["budgets 40% only", "fine-tuned rows for skip_vision only", "training steps per run (the full"]
    left_out += ["first 48 test records", "no ablations"]
    assert all(part in notes for part in left_out), notes
    given = quick(CompareSettings(out=Path("unused"), steps=100), keep=frozenset({"steps"}))
    assert given.steps == 100 and "training steps" not in "; ".join(given.notes)


def test_fine_tuned_rows_follow_the_budgets_given():
    """Budgets without 0.4 used to drop every fine-tuned row silently (the default fine-tune budget was 0.4)."""
    assert cli._fine_tune_budgets(None, (0.25, 0.4, 0.6)) == (0.4,)
    assert cli._fine_tune_budgets(None, (0.3, 0.5)) == (0.5,)
    assert cli._fine_tune_budgets(["all"], (0.3, 0.5)) is None
    assert cli._fine_tune_budgets(["0.30"], (0.3, 0.5)) == (0.3,)


def test_bench_reports_progress_on_stderr(capsys):
    argv = ["bench", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--no-train"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "bench fp32, tiles 0, batch 1: building the 3 variants" in err
    for quantity in ("prefill", "generate", "decode"):
        assert f"{quantity} round 1/1 skip_vision:" in err
