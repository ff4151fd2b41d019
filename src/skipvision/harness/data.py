"""LLaVA-format data: the embedded shapes dataset generator, a dataset that tokenises LLaVA JSON records with
the processor's chat template, and a padding collator."""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

IGNORE_INDEX = -100

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
CELLS = [
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
TEXT_ONLY = [
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What shape has no corners?", "circle"),
    ("What is two plus one?", "three"),
]
SIDES = ("left", "center", "right")
QUESTION_TYPES = (
    "single_color",
    "single_shape",
    "single_side",
    "single_size",  # one shape: learnable in minutes
    "color_at",
    "shape_at",
    "count",
    "count_color",
    "relative",
    "small_color",  # several shapes: harder
    "text_only",
)


def vocabulary_sentences() -> list[str]:
    """Every word the generator can emit, in sentences, for training the preset tokenizer."""
    sentences = [f"What color is the shape in the {c} cell? What shape is in the {c} cell?" for c in CELLS]
    sentences += [f"How many {c} shapes are there? {c}" for c in COLORS]
    sentences += [f"Is the {c} {s} left or right of the {c} {s}? left right {s}" for c in COLORS for s in SHAPES]
    sentences += ["How many shapes are there? What color is the small shape? " + " ".join(NUMBERS)]
    sentences += [
        "What color is the shape? What shape is it? Is the shape on the left, center or right? "
        "Is the shape small or large? small large center"
    ]
    sentences += [f"{q} {a}" for q, a in TEXT_ONLY]
    return sentences


@dataclass
class Shape:
    color: str
    kind: str
    cell: int
    small: bool


def _draw(shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (25, 25, 35))
    draw = ImageDraw.Draw(image)
    step = size / 3
    single = len(shapes) == 1  # a lone shape is drawn large, spanning its column, vertically centred
    for s in shapes:
        row, col = divmod(s.cell, 3)
        cx, cy = (col + 0.5) * step, (1.5 if single else row + 0.5) * step
        r = step * ((0.3 if s.small else 0.5) if single else (0.16 if s.small else 0.36))
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[s.color]
        if s.kind == "square":
            draw.rectangle(box, fill=fill)
        elif s.kind == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _single_questions(shape: Shape) -> list[tuple[str, str, str]]:
    return [
        ("single_color", "What color is the shape?", shape.color),
        ("single_shape", "What shape is it?", shape.kind),
        ("single_side", "Is the shape on the left, center or right?", SIDES[shape.cell % 3]),
        ("single_size", "Is the shape small or large?", "small" if shape.small else "large"),
    ]


def _questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """Candidate (type, question, answer) triples for a scene."""
    out = []
    s = rng.choice(shapes)
    out.append(("color_at", f"What color is the shape in the {CELLS[s.cell]} cell?", s.color))
    s = rng.choice(shapes)
    out.append(("shape_at", f"What shape is in the {CELLS[s.cell]} cell?", s.kind))
    out.append(("count", "How many shapes are there?", NUMBERS[len(shapes)]))
    color = rng.choice(list(COLORS))
    out.append(("count_color", f"How many {color} shapes are there?", NUMBERS[sum(x.color == color for x in shapes)]))
    pairs = [(a, b) for a in shapes for b in shapes if a.cell % 3 != b.cell % 3]
    unique = [
        (a, b)
        for a, b in pairs
        if sum((x.color, x.kind) == (a.color, a.kind) for x in shapes) == 1
        and sum((x.color, x.kind) == (b.color, b.kind) for x in shapes) == 1
    ]
    if unique:
        a, b = rng.choice(unique)
        side = "left" if a.cell % 3 < b.cell % 3 else "right"
        out.append(("relative", f"Is the {a.color} {a.kind} left or right of the {b.color} {b.kind}?", side))
    small = [x for x in shapes if x.small]
    if len(small) == 1:
        out.append(("small_color", "What color is the small shape?", small[0].color))
    return out


def make_dataset(out: str | Path, n: int = 2000, seed: int = 0, image_size: int = 224, test_fraction: float = 0.1):
    """Write ``train.json``, ``test.json`` and ``images/*.png`` (LLaVA format) to ``out``; deterministic in ``seed``.

    60% of the scenes hold one shape (questions on its colour, kind, side, size: learnable by a tiny model in
    minutes); the others hold 2-5 coloured shapes on a 3x3 grid, sometimes one small one, with questions on the
    colour/shape at a cell, counting, relative position or the small object (hard for a tiny model). About 5% of
    records are text-only and 20% have two turns. Returns the paths of the two JSON files.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"make_dataset needs n >= 2 records (one at least for each split), got n={n!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        rid = f"shapes-{seed}-{i:06d}"
        if rng.random() < 0.05:
            q, a = rng.choice(TEXT_ONLY)
            records.append(
                {
                    "id": rid,
                    "type": "text_only",
                    "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                }
            )
            continue
        single = rng.random() < 0.6
        cells = rng.sample(range(9), 1 if single else rng.randint(2, 5))
        shapes = [Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), c, False) for c in cells]
        if rng.random() < 0.4:
            rng.choice(shapes).small = True
        image_name = f"{rid}.png"
        _draw(shapes, image_size).save(out / "images" / image_name)
        candidates = _single_questions(shapes[0]) if single else _questions(shapes, rng)
        turns = rng.sample(candidates, 2 if rng.random() < 0.2 else 1)
        conversations = []
        for t, (_, question, answer) in enumerate(turns):
            conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        records.append({"id": rid, "image": image_name, "type": turns[-1][0], "conversations": conversations})
    split = max(1, int(n * test_fraction))
    paths = out / "train.json", out / "test.json"
    paths[0].write_text(json.dumps(records[split:], indent=1))
    paths[1].write_text(json.dumps(records[:split], indent=1))
    return paths


class RecordError(ValueError):
    """A LLaVA record that cannot be used; the message names its id."""


class DataError(ValueError):
    """A data file that cannot be used as a whole; the message names the file."""


#: images larger than this (pixels) are refused: decoding and resizing them takes seconds to minutes per item
MAX_IMAGE_PIXELS = 4096 * 4096


def prior_accuracy(train_json: Path, test_json: Path) -> float:
    """Accuracy of always answering the most frequent training answer of the question's type."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for r in json.loads(train_json.read_text()):
        answers[r["type"]][r["conversations"][-1]["value"]] += 1
    test = json.loads(test_json.read_text())
    hits = sum(answers[r["type"]].most_common(1)[0][0] == r["conversations"][-1]["value"] for r in test)
    return hits / len(test)


def _first_few(items: list[str], separator: str, shown: int = 5) -> str:
    """The first ``shown`` items joined, and how many more there are."""
    rest = f"{separator}... {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + rest


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as RGB; a missing, truncated or non-image file raises ``ValueError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def load_records(json_path: str | Path) -> list[Any]:
    """The records of a LLaVA JSON file, with errors that name the file."""
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of LLaVA records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def default_image_folder(json_path: str | Path) -> Path:
    """Where a LLaVA JSON file's images are unless told: ``images/`` next to it."""
    return Path(json_path).parent / "images"


def record_image_paths(record: dict[str, Any], folder: Path, allow_outside: bool = False) -> list[Path]:
    """A record's image files, confined to ``folder`` unless ``allow_outside``."""
    rid = record.get("id", "<no id>")
    names = record.get("image")
    names = [] if names is None else names if isinstance(names, list) else [names]
    root = folder.resolve()
    paths = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise RecordError(f"record {rid}: image names must be non-empty strings, got {name!r}")
        path = (folder / name).resolve()
        if not allow_outside and not path.is_relative_to(root):
            raise RecordError(
                f"record {rid}: image {name!r} is outside the image folder {root} (pass "
                "allow_outside_image_folder / --allow-outside-image-folder to read it)"
            )
        paths.append(path)
    return paths


class LlavaJsonDataset(torch.utils.data.Dataset):
    """LLaVA instruction JSON tokenised with the processor's chat template.

    Each ``<image>`` becomes the processor's image placeholder count (``configure_processor`` sets the
    Skip-Vision one); labels supervise only the assistant answers (the template's ``{% generation %}`` spans).
    The whole file is checked up front (structure, image paths inside ``image_folder``, image sizes); bad records
    raise :class:`DataError` listing them, or are dropped with one warning when ``skip_bad_records`` is set.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Any,
        max_length: int = 1024,
        skip_bad_records: bool = False,
        allow_outside_image_folder: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.json_path = Path(json_path)
        self.records = load_records(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else default_image_folder(self.json_path)
        self.processor = processor
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.allow_outside_image_folder = allow_outside_image_folder
        self.max_image_pixels = max_image_pixels
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self._check_records()

    def _check_records(self) -> None:
        problems: list[str] = []
        good = []
        self._placeholder_counts: dict[tuple[int, int], int] = {}
        self._cut: list[str] = []
        for record in self.records:
            try:
                self.check(record)
                good.append(record)
            except RecordError as error:
                problems.append(str(error))
        if self._cut:
            warnings.warn(
                f"{self.json_path}: {len(self._cut)} record(s) are longer than max_length={self.max_length} and will "
                f"be cut (their answers keep at least one token): {_first_few(self._cut, ', ')}",
                stacklevel=3,
            )
        if not problems:
            return
        listing = _first_few(problems, "; ")
        if not self.skip_bad_records:
            raise DataError(f"{self.json_path}: {len(problems)} bad record(s): {listing}")
        if not good:
            raise DataError(f"{self.json_path}: every record is bad ({len(problems)}): {listing}")
        warnings.warn(f"{self.json_path}: skipping {len(problems)} bad record(s): {listing}", stacklevel=3)
        self.records = good

    def check(self, record: Any) -> None:
        """Raise :class:`RecordError` if ``record`` is malformed or its images are missing, outside the image folder
        or too large (reads image headers only), or if its first answer starts beyond ``max_length``."""
        messages = self.messages(record)
        rid = record.get("id", "<no id>")
        paths = self.image_paths(record)
        markers = sum(turn["value"].count("<image>") for turn in record["conversations"])
        if markers != len(paths):
            raise RecordError(f"record {rid}: {markers} <image> marker(s) but {len(paths)} image(s)")
        sizes = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (OSError, ValueError) as error:
                raise RecordError(f"record {rid}: cannot read image {path}: {error}") from error
            if width * height > self.max_image_pixels:
                raise RecordError(
                    f"record {rid}: image {path} is {width}x{height}, more than max_image_pixels="
                    f"{self.max_image_pixels}; downscale it or raise the limit"
                )
            sizes.append((width, height))
        self._check_length(rid, messages, sizes)

    def _check_length(self, rid: str, messages: list[dict[str, str]], sizes: list[tuple[int, int]]) -> None:
        """Token length with each image expanded to its placeholders (from its size, no decoding)."""
        encoded = self.processor.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        counts = iter([self._placeholders_for_size(size) for size in sizes])
        position, first_answer = 0, None
        for token, is_answer in zip(encoded["input_ids"], encoded["assistant_masks"]):
            if is_answer and first_answer is None:
                first_answer = position
            position += next(counts) if token == self.image_token_id else 1
        if first_answer is not None and first_answer >= self.max_length:
            raise RecordError(
                f"record {rid}: its answer does not fit in max_length={self.max_length} (it starts at token "
                f"{first_answer} of {position}); raise --max-length"
            )
        if position > self.max_length:
            self._cut.append(rid)

    def _placeholders_for_size(self, size: tuple[int, int]) -> int:
        if size not in self._placeholder_counts:
            probe = self.processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")
            self._placeholder_counts[size] = self.image_placeholders(probe, 0)
        return self._placeholder_counts[size]

    def image_paths(self, record: dict[str, Any]) -> list[Path]:
        """The record's image files, confined to the image folder unless ``allow_outside_image_folder``."""
        return record_image_paths(record, self.image_folder, self.allow_outside_image_folder)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # a record that only fails when encoded (e.g. its answer does not fit): skip forward, never recursively
        for attempt in range(len(self)):
            record = self.records[(index + attempt) % len(self)]
            try:
                return self.encode(record)
            except RecordError as error:
                if not self.skip_bad_records:
                    raise
                warnings.warn(f"skipping bad record: {error}", stacklevel=2)
        raise DataError(f"{self.json_path}: no record in the file can be encoded")

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        rid = record.get("id", "<no id>") if isinstance(record, dict) else "<not a dict>"
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or len(turns) % 2:
            raise RecordError(f"record {rid}: 'conversations' must be a non-empty list of human/gpt pairs")
        roles = {"human": "user", "gpt": "assistant"}
        messages = []
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
                raise RecordError(f"record {rid}: turn {i} must be {{'from': '{expected}', 'value': str}}")
            messages.append({"role": roles[expected], "content": turn["value"]})
        return messages

    def load_images(self, record: dict[str, Any]) -> list[Image.Image]:
        rid = record.get("id", "<no id>")
        paths = self.image_paths(record)
        try:
            return [open_rgb(path) for path in paths]
        except ValueError as error:
            raise RecordError(f"record {rid}: {error}") from error

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """Training item: the whole conversation, labels on the assistant answers only."""
        return self._encode(record, self.messages(record), add_generation_prompt=False)

    def encode_prompt(self, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Generation item for the last answer: every turn before it, ending in the generation prompt."""
        messages = self.messages(record)
        return self._encode(record, messages[:-1], add_generation_prompt=True), messages[-1]["content"]

    def _encode(self, record: dict[str, Any], messages: list[dict[str, str]], add_generation_prompt: bool):
        rid = record.get("id", "<no id>")
        images = self.load_images(record)
        placeholders = sum(m["content"].count("<image>") for m in messages)
        if placeholders != len(images):
            raise RecordError(f"record {rid}: {placeholders} <image> marker(s) but {len(images)} image(s)")
        encoded = self.processor.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        image_inputs = self.processor.image_processor(images=images, return_tensors="pt") if images else {}
        counts = [self.image_placeholders(image_inputs, i) for i in range(len(images))]
        input_ids, labels = [], []
        image_index = 0
        for token, is_answer in zip(encoded["input_ids"], encoded["assistant_masks"]):
            if token == self.image_token_id:
                input_ids += [token] * counts[image_index]
                labels += [IGNORE_INDEX] * counts[image_index]
                image_index += 1
            else:
                input_ids.append(token)
                labels.append(token if is_answer else IGNORE_INDEX)
        if len(input_ids) > self.max_length:
            if add_generation_prompt:
                raise RecordError(
                    f"record {rid}: prompt of {len(input_ids)} tokens exceeds max_length={self.max_length}"
                )
            if input_ids[: self.max_length].count(self.image_token_id) != sum(counts):
                raise RecordError(f"record {rid}: max_length={self.max_length} would cut an image's tokens")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise RecordError(
                    f"record {rid}: its answer does not fit in max_length={self.max_length} (the conversation has "
                    f"{len(encoded['input_ids']) + sum(counts) - len(counts)} tokens); raise --max-length"
                )
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "id": rid}
        if TOKEN_TYPES in getattr(self.processor, "model_input_names", ()):
            # Qwen3-VL's HF forward places M-RoPE positions by each token's modality, as its processor marks them
            item[TOKEN_TYPES] = (item["input_ids"] == self.image_token_id).long()
        item.update({k: torch.as_tensor(v) for k, v in image_inputs.items()})
        return item

    def image_placeholders(self, image_inputs: dict[str, Any], index: int) -> int:
        """Placeholders the processor expands image ``index`` to (its own count, or the Skip-Vision one)."""
        return len(self.processor.replace_image_token(image_inputs, index)) // len(self.processor.image_token)


#: the per-token modality ids some processors return (Qwen3-VL: 1 marks an image placeholder)
TOKEN_TYPES = "mm_token_type_ids"


@dataclass
class LlavaCollator:
    """Pads a list of dataset items (right padding for training, left for generation)."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(item["input_ids"]) for item in items)
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            where = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[b, where] = item["input_ids"]
            labels[b, where] = item["labels"]
            attention_mask[b, where] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if any(TOKEN_TYPES in item for item in items):  # per token, padded as input_ids are (0: text)
            out[TOKEN_TYPES] = torch.zeros(batch, length, dtype=torch.long)
            for b, item in enumerate(items):
                n = len(item["input_ids"])
                where = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
                out[TOKEN_TYPES][b, where] = item[TOKEN_TYPES]
        for key in sorted({k for item in items for k in item} - {"input_ids", "labels", "id", TOKEN_TYPES}):
            out[key] = _concat_padded([item[key] for item in items if key in item])
        return out


def _concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate image tensors along dim 0; anyres ``(images, patches, ...)`` pixels are zero-padded to the
    largest patch count (the model reads each image's own patches by its image size)."""
    if tensors[0].ndim >= 2 and len({t.shape[1:] for t in tensors}) > 1:
        width = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def first_batch(data: str | Path, processor: Any, size: int) -> dict[str, Any]:
    """The first ``size`` training examples of a LLaVA JSON, collated (right padding, labels): the fixed batch the
    demo and ``skipvision compare`` count training FLOPs and time training steps on."""
    dataset = LlavaJsonDataset(data, None, processor)
    return LlavaCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(size)])
