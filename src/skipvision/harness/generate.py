"""Answer prompts about images with a saved model (vanilla or Skip-Vision), as ``skipvision generate`` does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import family_of, load_for_inference
from .bench import kv_cache_bytes
from .data import load_records, open_rgb
from .evaluate import loading_checkpoint


@dataclass
class Request:
    images: list[str]
    prompt: str


def read_requests(batch_file: str | Path) -> list[Request]:
    """``[{"image": path or [paths], "prompt": str}, ...]`` from a JSON file, with errors naming the file/entry."""
    path = Path(batch_file)
    entries = load_records(path)
    requests = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}: entry {i} needs a 'prompt' string")
        images = entry.get("image") or []
        images = [images] if isinstance(images, str) else images
        requests.append(Request([str(path.parent / p) for p in images], entry["prompt"]))
    return requests


@torch.no_grad()
def generate(
    model_dir: str | Path, requests: list[Request], max_new_tokens: int = 32, skip_kv_cache: bool | None = None
) -> dict[str, Any]:
    """Greedy answers for ``requests`` in one left-padded batch, with prefill time (after one untimed warm-up
    prefill, so it is not a cold start), total ``generate`` time and KV bytes."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    # the images before the model: a missing file is reported before the weights load
    images = [open_rgb(p) for r in requests for p in r.images]
    with loading_checkpoint(model_dir):
        model, processor = load_for_inference(model_dir, skip_kv_cache)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" * len(r.images) + r.prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in requests
    ]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    model(**inputs, use_cache=True, logits_to_keep=1)  # untimed warm-up: the first call pays one-off setup costs
    start = time.perf_counter()
    prefill = model(**inputs, use_cache=True, logits_to_keep=1)
    prefill_seconds = time.perf_counter() - start
    cache_bytes = kv_cache_bytes(prefill.past_key_values)
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[family_of(model).image_token_id(model.config)],
    )
    generate_seconds = time.perf_counter() - start
    answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "answers": [a.strip() for a in answers],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
        "prefill_seconds": prefill_seconds,
        "generate_seconds": generate_seconds,
        "kv_cache_bytes_after_prefill": cache_bytes,
        "skip_vision": model.skip_vision_config.to_dict(),
    }
