"""Exact-match evaluation of a (Skip-Vision) LLaVA checkpoint on LLaVA JSON with ``generate``."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import family_of, load_for_inference, load_processor
from .data import LlavaCollator, LlavaJsonDataset


class CheckpointError(ValueError):
    """A checkpoint that does not load as a (Skip-Vision) model of a supported family; the message says why."""


@contextmanager
def loading_checkpoint(path: str | Path) -> Iterator[None]:
    """Around loading a user's checkpoint: what HF or the family raise when the files do not fit the model (another
    model type, a damaged file, an architecture Skip-Vision refuses) becomes a :class:`CheckpointError` naming the
    checkpoint. Only the load is covered, so errors of the work after it keep their type and traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except ValueError:
        raise
    except (TypeError, RuntimeError, AttributeError, KeyError, SafetensorError) as error:
        raise CheckpointError(
            f"cannot load {path} as a Skip-Vision model ({type(error).__name__}: {error}); is it a checkpoint of a "
            "supported family, completely written?"
        ) from error


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    data: str | Path,
    image_folder: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    skip_kv_cache: bool | None = None,
    limit: int | None = None,
    progress: bool = True,
    allow_outside_image_folder: bool = False,
) -> dict[str, Any]:
    """Answer the last question of every record greedily; exact-match accuracy overall and per ``type``.

    A checkpoint without Skip-Vision settings is evaluated as the vanilla model. ``skip_kv_cache`` overrides
    the checkpoint's setting (None keeps it).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every record), got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # the processor and the data before the model: a bad record is reported before the weights load
    with loading_checkpoint(model_dir):
        processor = load_processor(model_dir)
    dataset = LlavaJsonDataset(data, image_folder, processor, allow_outside_image_folder=allow_outside_image_folder)
    with loading_checkpoint(model_dir):
        model, processor = load_for_inference(model_dir, skip_kv_cache)
    records = dataset.records[:limit] if limit else dataset.records
    collate = LlavaCollator(processor.tokenizer.pad_token_id, padding_side="left")
    tokenizer = processor.tokenizer
    correct: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress):
        chunk = records[start : start + batch_size]
        items, answers = zip(*(dataset.encode_prompt(r) for r in chunk))
        batch = collate(list(items))
        batch.pop("labels")
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=[family_of(model).image_token_id(model.config)],
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, text, answer in zip(chunk, texts, answers):
            ok = normalise(text) == normalise(answer)
            correct[record.get("type", "all")].append(ok)
            predictions.append({"id": record["id"], "prediction": text, "answer": answer, "correct": ok})
    every = [ok for oks in correct.values() for ok in oks]
    return {
        "accuracy": sum(every) / max(1, len(every)),
        "per_type": {t: sum(oks) / len(oks) for t, oks in sorted(correct.items())},
        "count": len(every),
        "predictions": predictions,
    }


def write_report(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1))
