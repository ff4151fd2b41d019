"""``skipvision generate``: answers, timings and KV bytes from a saved model; clear errors for bad requests."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as cli

from skipvision.harness.data import make_dataset
from skipvision.harness.generate import Request, generate
from skipvision.harness.presets import MODEL_PRESETS, init_model
from skipvision.harness.train import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    train_json, _ = make_dataset(root / "data", n=12, seed=0, image_size=168)
    base = init_model("tiny", root / "base")
    run = train(
        TrainConfig(
            model=str(base),
            data=str(train_json),
            output_dir=str(root / "run"),
            max_steps=1,
            batch_size=2,
            save_steps=1,
            skip_vision=MODEL_PRESETS["tiny"].skip_vision,
        )
    )
    image = sorted((root / "data" / "images").iterdir())[0]
    return root, base, run["final"], image


def test_generate_skip_vision_prunes_and_matches_the_api(setup):
    root, base, final, image = setup
    request = [Request([str(image)], "What color is the shape?"), Request([str(image)], "Is it small or large?")]
    skip = generate(final, request, max_new_tokens=3)
    full = generate(final, request, max_new_tokens=3, skip_kv_cache=False)
    vanilla = generate(base, request, max_new_tokens=3)
    assert len(skip["answers"]) == 2 and skip["new_tokens"] <= 3
    per_position = full["kv_cache_bytes_after_prefill"] // full["prompt_tokens"]
    skipped = MODEL_PRESETS["tiny"].skip_vision.num_skipped
    assert skip["kv_cache_bytes_after_prefill"] == (full["prompt_tokens"] - skipped) * per_position
    assert full["prompt_tokens"] == vanilla["prompt_tokens"] - (144 - 74)  # 74 placeholders per image, not 144
    batch = root / "batch.json"
    batch.write_text(
        json.dumps(
            [
                {"image": str(image.relative_to(root)), "prompt": "What color is the shape?"},
                {"prompt": "What is two plus one?"},
            ]
        )
    )
    out = cli("generate", "--model", final, "--batch", str(batch), "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'What color is the shape?' -> " in out.stdout and "KV cache after prefill" in out.stdout


def test_generate_errors(setup):
    root, base, final, image = setup
    none = cli("generate", "--model", final)
    assert none.returncode == 2 and "give --prompt" in none.stderr
    missing = cli("generate", "--model", final, "--image", str(root / "nope.png"), "--prompt", "hi")
    assert missing.returncode == 2 and "cannot read image" in missing.stderr
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(final, [Request([], "hi")], max_new_tokens=0)


def test_pipeline_answers_like_the_generate_api(setup):
    """``transformers.pipeline`` loads a saved Skip-Vision model (Auto classes) with its configured processor."""
    from transformers import pipeline

    import skipvision

    _, _, final, image = setup
    question = "What color is the shape?"
    expected = generate(final, [Request([str(image)], question)], max_new_tokens=4)["answers"][0]
    pipe = pipeline("image-text-to-text", model=str(final))
    assert isinstance(pipe.model, skipvision.SkipVisionMixin)
    chat = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]
    options = dict(max_new_tokens=4, return_full_text=False, generate_kwargs={"do_sample": False})
    options["generate_kwargs"]["suppress_tokens"] = [pipe.model.config.image_token_id]
    out = pipe(text=chat, **options)
    assert out[0]["generated_text"].strip() == expected
