"""Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``): as Qwen2.5-VL (see ``qwen2_5_vl.py``), plus deepstack.

Extra fact: the tower also returns deepstack features (one tensor per ``deepstack_visual_indexes`` entry, one row
per visual token) that HF's text model adds to the visual tokens' hidden states after decoder layers 0, 1, ...
In the full layout they follow the tokens through the split and the merge (a merged token gets the mean of its
group's, as its embedding does) and the summary tokens, being new, get none; the text model receives them
through a forward pre-hook, since its HF caller passes ``visual_pos_masks`` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from ..model import SkipVisionMixin
from ..sequence import ImageSequence
from .qwen2_5_vl import QwenVLFamily


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3-vl"
    model_type = "qwen3_vl"
    hf_class = Qwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor

    def image_extras(self, output: Any) -> list[list[torch.Tensor]]:
        sizes = [tokens.shape[0] for tokens in output.pooler_output]
        # transformers >= 5.23 splits each deepstack level per image; earlier versions return one tensor per level
        levels = [
            torch.split(level, sizes) if isinstance(level, torch.Tensor) else level
            for level in output.deepstack_features or []
        ]
        return [[level[i] for level in levels] for i in range(len(sizes))]

    def language_model_context(
        self, model: Any, is_image: torch.Tensor, sequences: list[ImageSequence]
    ) -> contextlib.AbstractContextManager:
        return _deepstack(self.language_model(model), is_image, sequences)


@contextlib.contextmanager
def _deepstack(text_model: torch.nn.Module, is_image: torch.Tensor, sequences: list[ImageSequence]) -> Iterator[None]:
    levels = len(sequences[0].extras)
    embeds = [torch.cat([s.extras[k] for s in sequences]) for k in range(levels)]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["visual_pos_masks"] = is_image
        kwargs["deepstack_visual_embeds"] = embeds
        return args, kwargs

    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True) if levels else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


QWEN3_VL = Qwen3VLFamily()


class SkipVisionQwen3VLForConditionalGeneration(SkipVisionMixin, Qwen3VLForConditionalGeneration):
    """``Qwen3VLForConditionalGeneration`` with Skip-Vision; settings in ``config.skip_vision``."""

    skip_vision_family = QWEN3_VL


QWEN3_VL.skip_class = SkipVisionQwen3VLForConditionalGeneration
