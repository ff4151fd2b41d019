"""LLaVA-OneVision (HF ``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres with a SigLIP tower (no
CLS), a Qwen2 text model and "anyres_max" (HF shrinks a large unpadded tile grid by bilinear interpolation).

Same R/S split as LLaVA-NeXT: R = the base image (all of it by default, since SigLIP has no CLS to rank by),
candidates = the interpolated tile tokens. In a sample with several images HF gives each image its base only
(plus one newline): Skip-Vision keeps that base as R (or splits it by N_r), with no newline.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PretrainedConfig,
    ProcessorMixin,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from ..model import SkipVisionMixin
from .llava_next import LlavaNextFamily
from .processor import IMAGE_ONLY_SETTINGS, load_image_only, save_image_only
from .processor import image_only_processor as _image_only_processor


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava-onevision"
    model_type = "llava_onevision"
    hf_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    image_input_names = ("image_sizes", "batch_num_images")

    def patches_per_image(self, config: PretrainedConfig, image_inputs: dict[str, Any]) -> list[int]:
        sizes = image_inputs["image_sizes"]
        per_sample = image_inputs.get("batch_num_images")
        single = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(n)]
        tiled = super().patches_per_image(config, image_inputs)
        return [n if alone else 1 for n, alone in zip(tiled, single)]

    def extra_newlines(self, processor: Any, image_inputs: dict, image_idx: int) -> int:
        # HF counts one newline after the base of an image in a multi-image sample, outside _get_unpadded_features
        seen = 0
        for n in image_inputs["batch_num_images"]:
            if image_idx < seen + n:
                return 1 if n != 1 else 0
            seen += n
        return 0

    _SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")

    def save_processor(self, processor: ProcessorMixin, path: str | os.PathLike) -> None:
        save_image_only(processor, path, self._SETTINGS)

    def load_processor(self, path: str | os.PathLike) -> ProcessorMixin:
        return load_image_only(self.processor_class, LlavaOnevisionImageProcessorPil, path, self._SETTINGS)


def image_only_processor(image_processor: Any, tokenizer: Any, **kwargs: Any) -> LlavaOnevisionProcessor:
    """A ``LlavaOnevisionProcessor`` without a video processor."""
    return _image_only_processor(LlavaOnevisionProcessor, image_processor, tokenizer, **kwargs)


LLAVA_ONEVISION = LlavaOnevisionFamily()
IMAGE_ONLY_SETTINGS[LlavaOnevisionProcessor] = LlavaOnevisionFamily._SETTINGS


class SkipVisionLlavaOnevisionForConditionalGeneration(SkipVisionMixin, LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` with Skip-Vision; settings in ``config.skip_vision``."""

    skip_vision_family = LLAVA_ONEVISION


LLAVA_ONEVISION.skip_class = SkipVisionLlavaOnevisionForConditionalGeneration
