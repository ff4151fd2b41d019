"""LLaVA-NeXT (HF ``LlavaNextForConditionalGeneration``), as the paper's SV-LLaVA-HD.

Facts: a base (thumbnail) tower pass plus one per tile ("anyres"); HF unpads the tile grid and appends a learned
``image_newline`` after every row. Skip-Vision layout: R comes from the base image's tokens (all of them, or
top-N_r by CLS attention), the skip candidates are the rest of the base plus the unpadded tile tokens, merged to
N_s. The row newlines are dropped: the merge reorders tokens by redundancy, so a row separator would mark no row,
and it carries no image content (one learned vector; the paper's HD tiling has none). A small image with no more
than N_s candidates skips them all unmerged, so its count is smaller (as NeXT's own count varies with size).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, PretrainedConfig, ProcessorMixin
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..config import SkipVisionConfig, VisionFacts
from ..model import SkipVisionMixin
from ..sequence import ImageTokens
from .base import Family, ModelShape, selection_scores, text_shape, vision_shape
from .processor import expand_image_tokens


@contextlib.contextmanager
def _without_newlines(inner: torch.nn.Module) -> Iterator[None]:
    """Run HF's own image path (tower, feature layer, projector, tiles, unpadding) minus the row newlines."""
    original = inner.pack_image_features

    def pack(*args: Any, **kwargs: Any):
        kwargs["image_newline"] = None
        return original(*args, **kwargs)

    inner.pack_image_features = pack
    try:
        yield
    finally:
        del inner.pack_image_features


class LlavaNextFamily(Family):
    name = "llava-next"
    model_type = "llava_next"
    hf_class = LlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    image_input_names = ("image_sizes",)

    def vision_facts(self, config: PretrainedConfig) -> VisionFacts:
        base = self.tokens_per_tower_pass(config)
        return VisionFacts(base, None, self.tower_has_cls(config), config.get_text_config().num_hidden_layers)

    def num_images(self, pixel_values: torch.Tensor | None, image_inputs: dict[str, Any]) -> int:
        if pixel_values is None:
            return 0
        sizes = image_inputs.get("image_sizes")
        return len(sizes) if sizes is not None else int(pixel_values.shape[0])

    def check_image_inputs(self, config: PretrainedConfig, pixel_values: Any, image_inputs: dict[str, Any]) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (4, 5):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a tensor (num_images, patches, channels, height, width); got {shape}"
            )
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{self.hf_class.__name__} needs image_sizes (from its processor) with pixel_values")
        if pixel_values.ndim == 5 and len(sizes) != pixel_values.shape[0]:
            raise ValueError(
                f"image_sizes has {len(sizes)} entries but pixel_values holds {pixel_values.shape[0]} images"
            )

    def patches_per_image(self, config: PretrainedConfig, image_inputs: dict[str, Any]) -> list[int]:
        """Tower passes per image (base + tiles), as HF's model counts them."""
        sizes = image_inputs["image_sizes"]  # read to the host once, not once per image
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in sizes
        ]

    def tower_passes(self, config: PretrainedConfig, num_images: int, image_inputs: dict[str, Any]) -> int:
        return sum(self.patches_per_image(config, image_inputs)) if num_images else 0

    def _image_features(self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any]):
        pixels = pixel_values.to(model.model.vision_tower.dtype)
        return model.model.get_image_features(pixel_values=pixels, return_dict=True, **image_inputs).pooler_output

    def image_tokens(
        self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        if config.native:
            features = self._image_features(model, pixel_values, image_inputs)
            return [ImageTokens(f, f.shape[0]) for f in features]
        base = self.tokens_per_tower_pass(model.config)
        with _without_newlines(model.model):
            features, scores = selection_scores(
                self, model, config, base, lambda: self._image_features(model, pixel_values, image_inputs)
            )
        if scores is None:
            return [ImageTokens(f, base) for f in features]
        # the tower ran every image's passes back to back, base first: pick each image's base row
        starts = itertools.accumulate(self.patches_per_image(model.config, image_inputs), initial=0)
        return [ImageTokens(f, base, scores[s]) for f, s in zip(features, starts)]

    def configure_processor(
        self, processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None
    ) -> ProcessorMixin:
        return expand_image_tokens(self, processor, config)

    def model_shape(self, config: PretrainedConfig, tiles: int = 0):
        """Shape for an image of ``tiles`` full tiles (square tiles, nothing unpadded)."""
        base = self.tokens_per_tower_pass(config)
        rows = int(round(base**0.5))
        grid_rows = _grid_rows(tiles)
        return ModelShape(
            text_shape(config),
            vision_shape(config, cls=self.tower_emits_cls(config)),
            visual_tokens=base * (1 + tiles),
            towers_per_image=1 + tiles,
            eligible_tokens=base,
            newline_tokens=rows * grid_rows if tiles else 0,
        )


def _grid_rows(tiles: int) -> int:
    """Rows of the most square grid of ``tiles`` tiles (1, 2 -> 1 row; 4 -> 2; 8 -> 2)."""
    rows = int(tiles**0.5)
    while rows > 1 and tiles % rows:
        rows -= 1
    return max(rows, 1)


LLAVA_NEXT = LlavaNextFamily()


class SkipVisionLlavaNextForConditionalGeneration(SkipVisionMixin, LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` with Skip-Vision (SV-LLaVA-HD); settings in ``config.skip_vision``."""

    skip_vision_family = LLAVA_NEXT


LLAVA_NEXT.skip_class = SkipVisionLlavaNextForConditionalGeneration
