"""The lmms-eval plugin: a real lmms-eval evaluation (entry-point model, local task, no download) scores exactly as
``skipvision eval``; loglikelihood scores a continuation as decoding sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import skipvision
from skipvision.harness.data import make_dataset
from skipvision.harness.evaluate import evaluate
from skipvision.harness.lmms_eval_task import write_task
from skipvision.harness.presets import MODEL_PRESETS, init_model

pytest.importorskip("lmms_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data are local files; never reach for the hub

SKIP = MODEL_PRESETS["tiny"].skip_vision
TASK = "skipvision_shapes"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    _, test_json = make_dataset(root / "data", n=60, seed=0, image_size=168)
    base = init_model("tiny", root / "base")
    model_dir = root / "skip"
    torch.manual_seed(0)
    skipvision.from_pretrained(base, skip_vision=SKIP).save_pretrained(model_dir)
    skipvision.api.save_processor(skipvision.load_processor(base, SKIP), model_dir)
    task = write_task(test_json, root / "tasks", TASK)
    assert task["kept"] > 0 and task["kept"] + task["left_out"] == len(json.loads(test_json.read_text()))
    return root, model_dir, task["records"], test_json.parent / "images"


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("skipvision").__name__ == "SkipVisionLMM"


def test_simple_evaluate_equals_skipvision_eval(setup):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    root, model_dir, records, images = setup
    out = simple_evaluate(
        model="skipvision",
        model_args=f"pretrained={model_dir}",
        tasks=[TASK],
        batch_size=3,  # batched generate_until, left-padded
        device="cpu",
        task_manager=TaskManager(include_path=str(root / "tasks")),
        log_samples=True,
    )
    reference = evaluate(model_dir, records, image_folder=images, progress=False)
    assert out["results"][TASK]["exact_match,none"] == pytest.approx(reference["accuracy"])
    predictions = {p["id"]: p["prediction"].strip() for p in reference["predictions"]}
    samples = {s["doc"]["id"]: s["filtered_resps"][0].strip() for s in out["samples"][TASK]}
    assert len(samples) == reference["count"] == len(predictions)
    assert samples == predictions  # the same answer, record by record


def test_cli_run_with_model_args(setup):
    """The command line as README gives it, with Skip-Vision settings as model args (Skip KV-cache off)."""
    root, model_dir, _, _ = setup
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "skipvision", "--tasks", TASK, "--batch_size", "4"]
    cmd += ["--model_args", f"pretrained={model_dir},skip_kv_cache=false", "--include_path", str(root / "tasks")]
    cmd += ["--device", "cpu", "--output_path", str(root / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr  # the table on stdout; loguru's metric summary where it logs
    assert "exact_match" in result.stdout
    assert "ttft:" in printed and "tpot:" in printed and "'skip_kv_cache': False" in printed
    files = list((root / "out").rglob("*_results.json"))
    assert files and TASK in json.loads(files[0].read_text())["results"]


def test_loglikelihood_scores_a_continuation_as_decoding_does(setup):
    """log p(continuation) and is-greedy equal what ``generate`` sees when forced along the continuation (with Skip
    KV-cache the continuation does not see the skipped tokens)."""
    from lmms_eval.api.instance import Instance

    from skipvision.harness.lmms_eval_model import SkipVisionLMM
    from skipvision.harness.lmms_eval_task import doc_to_text, doc_to_visual

    root, model_dir, _, _ = setup
    lmm = SkipVisionLMM(pretrained=str(model_dir))
    doc = json.loads((root / "tasks" / f"{TASK}.jsonl").read_text().splitlines()[0])
    lmm.task_dict = {TASK: {"test": [doc]}}
    inputs = lmm._inputs([lmm._prompt(doc_to_text(doc), 1)], doc_to_visual(doc))
    for continuation in (" red", " five shapes"):
        target = lmm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        forced = lmm.model.generate(
            **inputs,
            max_new_tokens=len(target),
            prefix_allowed_tokens_fn=lambda _b, ids, target=target: [
                target[ids.shape[0] - inputs["input_ids"].shape[1]]
            ],
            output_logits=True,
            return_dict_in_generate=True,
        )
        raw = [step[0].float() for step in forced.logits]
        expected = sum(float(step.log_softmax(-1)[t]) for step, t in zip(raw, target))
        expected_greedy = all(int(step.argmax()) == t for step, t in zip(raw, target))
        args = (doc_to_text(doc), continuation, doc_to_visual, 0, TASK, "test")
        request = Instance("loglikelihood", args, 0, {"task": TASK, "doc_id": 0, "repeats": 1})
        [(logprob, greedy)] = lmm.loglikelihood([request])
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_bad_model_args_are_refused(setup):
    from skipvision.harness.lmms_eval_model import SkipVisionLMM

    _, model_dir, _, _ = setup
    with pytest.raises(ValueError, match="unknown skipvision model args"):
        SkipVisionLMM(pretrained=str(model_dir), num_retaind=4)
    with pytest.raises(ValueError, match="both num_retained and num_skipped"):
        SkipVisionLMM(pretrained=str(model_dir), num_retained=4)
    with pytest.raises(ValueError, match="true or false"):
        SkipVisionLMM(pretrained=str(model_dir), skip_kv_cache="maybe")


def test_a_task_needs_single_question_records(tmp_path):
    record = {"id": "r", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}] * 2}
    data = tmp_path / "multi.json"
    data.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match="no record has exactly one question and one answer"):
        write_task(data, tmp_path / "task")
