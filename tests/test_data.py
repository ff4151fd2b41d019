"""LLaVA JSON loading, label masking, the embedded dataset generator, processor configuration, bad records."""

from __future__ import annotations

import json

import pytest
import torch

import skipvision
from skipvision import SkipVisionConfig
from skipvision.harness.data import IGNORE_INDEX, DataError, LlavaCollator, LlavaJsonDataset, RecordError, make_dataset
from skipvision.harness.presets import init_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return skipvision.load_processor(checkpoint, skipvision.harness.presets.MODEL_PRESETS["tiny"].skip_vision)


def write(tmp_path, records, images=()):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images:
        from PIL import Image

        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_labels_supervise_only_assistant_answers(tmp_path, processor):
    record = {
        "id": "r1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "two"},
        ],
    }
    ds = LlavaJsonDataset(write(tmp_path, [record], ["a.png"]), None, processor)
    item = ds[0]
    tok = processor.tokenizer
    ids, labels = item["input_ids"], item["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    tiny = skipvision.harness.presets.MODEL_PRESETS["tiny"].skip_vision
    assert int((ids == image_id).sum()) == skipvision.num_image_tokens(tiny)
    assert (labels[ids == image_id] == IGNORE_INDEX).all()
    supervised = tok.decode(labels[labels != IGNORE_INDEX])
    assert supervised == " red</s> two</s>"
    assert "USER" not in supervised and "color" not in supervised
    assert item["pixel_values"].shape == (1, 3, 168, 168)


def test_text_only_multi_turn_truncation_and_collate(tmp_path, processor):
    records = [
        {
            "id": "t1",
            "conversations": [{"from": "human", "value": "What is two plus one?"}, {"from": "gpt", "value": "three"}],
        },
        {
            "id": "t2",
            "image": "b.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red " * 50}],
        },
    ]
    with pytest.warns(UserWarning, match="1 record\\(s\\) are longer than max_length=100 and will be cut.*t2"):
        ds = LlavaJsonDataset(write(tmp_path, records, ["b.png"]), None, processor, max_length=100)
    assert "pixel_values" not in ds[0]
    assert len(ds[1]["input_ids"]) == 100  # truncated after the image, inside the answer
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 100) and batch["pixel_values"].shape == (1, 3, 168, 168)
    assert batch["attention_mask"][0].sum() == len(ds[0]["input_ids"])
    with pytest.raises(DataError, match="record t2: its answer does not fit in max_length=20"):  # found up front
        LlavaJsonDataset(ds.image_folder.parent / "data.json", None, processor, max_length=20)
    with pytest.raises(RecordError, match="record t2: max_length=20 would cut an image"):  # and at encoding
        ds.max_length = 20
        ds[1]


def test_bad_records_name_their_id(tmp_path, processor):
    records = [
        {
            "id": "missing-image",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "corrupt-image",
            "image": "bad.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "odd-turns", "conversations": [{"from": "human", "value": "Q?"}]},
        {"id": "wrong-role", "conversations": [{"from": "gpt", "value": "Q?"}, {"from": "human", "value": "A"}]},
        {
            "id": "marker-mismatch",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "fine", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
    ]
    path = write(tmp_path, records)
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png at all")
    messages = [
        "record missing-image: cannot read image",
        "record corrupt-image: cannot read image",
        "record odd-turns: 'conversations'",
        "record wrong-role: turn 0",
        "record marker-mismatch: 1 <image>",
    ]
    with pytest.raises(DataError, match="5 bad record") as error:  # the whole file is checked up front
        LlavaJsonDataset(path, None, processor)
    for message in messages:
        assert message in str(error.value)
    with pytest.warns(UserWarning, match="skipping 5 bad record.*record missing-image"):
        skipping = LlavaJsonDataset(path, None, processor, skip_bad_records=True)
    assert [r["id"] for r in skipping.records] == ["fine"] and skipping[0]["id"] == "fine"


def test_generator_is_deterministic_and_has_a_held_out_split(tmp_path):
    a_train, a_test = make_dataset(tmp_path / "a", n=60, seed=3, image_size=84)
    b_train, b_test = make_dataset(tmp_path / "b", n=60, seed=3, image_size=84)
    assert a_train.read_text() == b_train.read_text() and a_test.read_text() == b_test.read_text()
    for name in json.loads(a_train.read_text())[:5]:
        if "image" in name:
            image = name["image"]
            assert (tmp_path / "a/images" / image).read_bytes() == (tmp_path / "b/images" / image).read_bytes()
    train_ids = {r["id"] for r in json.loads(a_train.read_text())}
    test_ids = {r["id"] for r in json.loads(a_test.read_text())}
    assert len(test_ids) == 6 and not train_ids & test_ids
    other, _ = make_dataset(tmp_path / "c", n=60, seed=4, image_size=84)
    assert other.read_text() != a_train.read_text()
    types = {r["type"] for r in json.loads(a_train.read_text())}
    assert {"color_at", "shape_at", "count"} <= types


def test_configure_processor_expands_image_to_skip_vision_count(processor):
    cfg = skipvision.SkipVisionConfig(num_retained=20, num_skipped=30)
    skipvision.configure_processor(processor, cfg)
    from PIL import Image

    out = processor(images=[Image.new("RGB", (50, 50))], text="USER: <image>\nhi", return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == 52
    assert out["pixel_values"].shape == (1, 3, 168, 168)
    skipvision.configure_processor(processor, skipvision.harness.presets.MODEL_PRESETS["tiny"].skip_vision)
    assert torch.is_tensor(out["input_ids"])


@pytest.mark.parametrize(
    "cfg",
    [skipvision.vanilla_config(), skipvision.in_place_config(0.25), SkipVisionConfig(0.25, 4, selection="grid")],
    ids=["vanilla", "inplace", "full"],
)
def test_qwen3_vl_batches_carry_token_types_and_train(cfg, tmp_path):
    # Qwen3-VL's HF forward needs mm_token_type_ids (its processor's per-token modality ids) to place M-RoPE
    # positions: the dataset writes them and the collator pads them like input_ids, in every layout
    base = init_model("tiny-qwen3-vl", tmp_path / "base")
    train_json, _ = make_dataset(tmp_path / "data", n=12, seed=0, image_size=64)
    model = skipvision.from_pretrained(base, skip_vision=cfg).train()
    processor = skipvision.load_processor(base, cfg)
    dataset = LlavaJsonDataset(train_json, None, processor)
    items = [dataset[i] for i in range(4)]
    for padding_side in ("right", "left"):
        batch = LlavaCollator(processor.tokenizer.pad_token_id, padding_side)(items)
        types = batch["mm_token_type_ids"]
        assert types.shape == batch["input_ids"].shape
        assert torch.equal(types.bool(), batch["input_ids"] == dataset.image_token_id)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
