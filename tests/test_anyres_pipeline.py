"""The training/evaluation pipeline on the anyres families (variable image sizes, 5-D pixels, image_sizes)."""

from __future__ import annotations

import pytest
import torch

import skipvision
from skipvision.harness.data import LlavaCollator, LlavaJsonDataset, make_dataset
from skipvision.harness.evaluate import evaluate
from skipvision.harness.presets import MODEL_PRESETS, init_model
from skipvision.harness.train import TrainConfig, train


@pytest.mark.parametrize("preset", ["tiny-next", "tiny-onevision"])
def test_init_train_reload_and_eval(tmp_path, preset):
    spec = MODEL_PRESETS[preset]
    train_json, test_json = make_dataset(tmp_path / "data", n=20, seed=1, image_size=spec.data_image_size)
    base = init_model(preset, tmp_path / "base")
    assert skipvision.checkpoint_skip_vision(base) is None  # init-model writes a vanilla checkpoint
    vanilla_processor = skipvision.load_processor(base)
    summary = train(
        TrainConfig(
            model=str(base),
            data=str(train_json),
            output_dir=str(tmp_path / "run"),
            skip_vision=spec.skip_vision,
            max_steps=2,
            batch_size=2,
            save_steps=2,
            logging_steps=1,
        )
    )
    assert summary["steps"] == 2 and all(loss > 0 for loss in summary["losses"])
    final = summary["final"]
    model = skipvision.from_pretrained(final).eval()
    assert type(model) is skipvision.family_of(model).skip_class and model.skip_vision_config == spec.skip_vision
    processor = skipvision.load_processor(final)
    # the dataset expands each image to the model's own per-image count; the collator pads anyres pixels
    dataset = LlavaJsonDataset(train_json, None, processor)
    items = [dataset[i] for i in range(len(dataset)) if "pixel_values" in dataset[i]][:3]
    batch = LlavaCollator(processor.tokenizer.pad_token_id)(items)
    image_id = model.config.image_token_id
    with torch.no_grad():
        _, skipped = model.embed_multimodal(
            batch["input_ids"],
            batch["pixel_values"],
            **{k: batch[k] for k in skipvision.family_of(model).image_input_names if k in batch},
        )
        model(**{k: v for k, v in batch.items() if k != "labels"})
    counts = (batch["input_ids"] == image_id).sum(1)
    assert (counts == spec.skip_vision.num_image_tokens).all()  # 336 px scenes: 4 tiles, merged to N_s
    assert (skipped.sum(1) == spec.skip_vision.num_skipped).all()
    first = next(i for i, r in enumerate(dataset.records) if "image" in r)
    vanilla_item = LlavaJsonDataset(train_json, None, vanilla_processor)[first]
    assert len(vanilla_item["input_ids"]) > len(dataset[first]["input_ids"])  # vanilla keeps every tile token
    result = evaluate(final, test_json, limit=2, progress=False)
    assert result["count"] == 2 and 0 <= result["accuracy"] <= 1
    # the vanilla checkpoint evaluates as the baseline
    assert evaluate(base, test_json, limit=2, progress=False)["count"] == 2
