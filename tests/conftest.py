"""Tiny random LLaVA models built from configs (no downloads) and prompt builders."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import skipvision
from skipvision import SkipVisionConfig

IMAGE_TOKEN_ID = 4
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = 96
IMAGE_SIZE, PATCH = 32, 4  # 64 visual tokens per image


def llava_config(num_layers: int = 3, attn: str = "sdpa", vision_layers: int = 2) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn
    return config


def vanilla_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(**kwargs)).to(dtype).eval()
    # larger random projector/embeddings so images matter visibly in the logits
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    return model


def pair(cfg: SkipVisionConfig, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """(vanilla, skip) models with identical weights."""
    vanilla = vanilla_model(seed, dtype, **kwargs)
    skip = skipvision.convert(copy.deepcopy(vanilla), cfg)
    if skip.summary_scorer is not None:  # a non-trivial scorer, so summary weights are not uniform
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            skip.summary_scorer.score.weight.normal_(0, 0.5)
        skip.summary_scorer.to(dtype)
    return vanilla, skip


def prompts(
    images_per_sample: list[int],
    cfg: SkipVisionConfig | int,
    prefix: list[int],
    suffix: list[int],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Left-padded batch: sample b = BOS + prefix[b] text + images_per_sample[b] image spans + suffix[b] text."""
    span = cfg if isinstance(cfg, int) else skipvision.num_image_tokens(cfg)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_img, p, s in zip(images_per_sample, prefix, suffix):
        text = lambda k: torch.randint(5, VOCAB, (k,), generator=g).tolist()  # noqa: E731
        ids = [BOS_ID] + text(p)
        for _ in range(n_img):
            ids += [IMAGE_TOKEN_ID] * span + text(2)
        rows.append(ids + text(s))
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids) :] = torch.tensor(ids)
        attention_mask[b, length - len(ids) :] = 1
    n_images = sum(images_per_sample)
    pixel_values = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype) if n_images else None
    return input_ids, attention_mask, pixel_values


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m skipvision ARGS`` in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "skipvision", *args], capture_output=True, text=True)


def run_torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 --standalone ARGS`` (CPU, gloo) in a subprocess, output captured."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=timeout)
