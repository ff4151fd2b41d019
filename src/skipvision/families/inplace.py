"""The in-place layout on any HF vision-language model whose decoder layers are Llama-style (found by duck typing,
as kvpress finds attention layers): HF's own forward, processor and positions; Skip-Vision only marks the visual
tokens it does not retain as skipped (Skip-FFN) and drops them from the cache after prefill (Skip KV-cache).

Facts it needs, all read from the model: the decoder layers (a ``ModuleList`` of modules with ``input_layernorm``,
``self_attn``, ``post_attention_layernorm`` and ``mlp``), ``config.image_token_id`` (or ``image_token_index``) and,
for grid selection, each image block's token count: a family may state its tokens per block (InternVL: one tile),
otherwise each unbroken run of placeholders is a block (Idefics3/SmolVLM: a tile), with a square grid when its count
is a square; Mistral3's grid comes from ``image_sizes`` (a run there is one row). Families whose layers are not
Llama-style (Gemma3's sandwich norms) are refused by
``enable_skip_ffn`` with the missing or extra parts named.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, ProcessorMixin

from ..config import SkipVisionConfig, VisionFacts
from ..model import SkipVisionMixin
from ..placeholders import placeholder_runs
from ..selection import square_grid
from ..skip_ffn import LLAMA_STYLE_PARTS
from .base import Family


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(text model, its decoder layers)``: the longest ``layers`` ModuleList of Llama-style blocks."""
    found = []
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(layers[0], p) for p in LLAMA_STYLE_PARTS):
            found.append((module, layers))
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no list of Llama-style decoder layers (modules with "
            f"{', '.join(LLAMA_STYLE_PARTS)}); Skip-Vision cannot skip its FFNs"
        )
    return max(found, key=lambda pair: len(pair[1]))


class InPlaceFamily(Family):
    """An HF VLM supported in the in-place layout only, its facts found by duck typing."""

    supports_full_layout = False

    def __init__(
        self,
        model_type: str,
        hf_class: type,
        processor_class: type = ProcessorMixin,
        tokens_per_block: Callable[[PretrainedConfig], int] | None = None,
    ) -> None:
        self.name = model_type.replace("_", "-")
        self.model_type = model_type
        self.hf_class = hf_class
        self.processor_class = processor_class
        self.tokens_per_block = tokens_per_block
        attrs = {"__module__": __name__, "skip_vision_family": self}
        self.skip_class = type(f"SkipVision{hf_class.__name__}", (SkipVisionMixin, hf_class), attrs)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return find_decoder_layers(model)[1]

    def language_model(self, model: nn.Module) -> nn.Module:
        return find_decoder_layers(model)[0]

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError(f"{self.name}: the vision tower's layers are not known to Skip-Vision")

    def block_class_names(self, model: nn.Module) -> list[str]:
        return [type(self.decoder_layers(model)[0]).__name__]

    def tower_emits_cls(self, config: PretrainedConfig) -> bool:
        return False

    def vision_facts(self, config: PretrainedConfig) -> VisionFacts:
        return VisionFacts(None, None, False, config.get_text_config().num_hidden_layers)

    def num_images(self, pixel_values: Any, image_inputs: dict[str, Any]) -> int:
        return 0 if pixel_values is None else 1  # HF's own forward counts and checks the images

    def image_blocks(
        self, config: PretrainedConfig, is_image: torch.Tensor, image_inputs: dict[str, Any]
    ) -> list[tuple[int, tuple[int, int, int] | None]]:
        per_block = None if self.tokens_per_block is None else self.tokens_per_block(config)
        blocks = []
        for run in placeholder_runs(is_image):
            if per_block and run % per_block == 0:
                blocks.extend([per_block] * (run // per_block))
            else:
                blocks.append(run)
        return [(count, square_grid(count)) for count in blocks]

    def image_tokens(self, model: Any, pixel_values: Any, image_inputs: dict[str, Any], config: SkipVisionConfig):
        raise ValueError(f"{self.name} supports only layout='inplace' (or the vanilla config)")

    def configure_processor(
        self, processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None
    ) -> ProcessorMixin:
        if not config.in_place:
            raise ValueError(f"{self.name} supports only layout='inplace', which keeps the processor's own counts")
        return processor

    def model_shape(self, config: PretrainedConfig):
        raise NotImplementedError(f"no FLOPs model for {self.name}")


class Mistral3Family(InPlaceFamily):
    """Mistral3 (Pixtral tower): an image is rows of merged patches, the processor ending each row with a break
    token, so a run of placeholders is one row. ``image_sizes`` gives each image's grid, so grid selection works
    on the image's real rows and columns."""

    image_input_names = ("image_sizes",)

    def image_blocks(
        self, config: PretrainedConfig, is_image: torch.Tensor, image_inputs: dict[str, Any]
    ) -> list[tuple[int, tuple[int, int, int] | None]]:
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("Mistral3 needs image_sizes (num_images, 2) from its processor with pixel_values")
        # the tower's patches, merged spatial_merge_size x spatial_merge_size by the projector
        vision = config.vision_config
        patch, merge = vision.patch_size, config.spatial_merge_size
        grids = [(int(h) // patch // merge, int(w) // patch // merge) for h, w in torch.as_tensor(sizes).tolist()]
        return [(rows * cols, (1, rows, cols)) for rows, cols in grids]


def _internvl_tile_tokens(config: PretrainedConfig) -> int:
    vision = config.vision_config
    side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return int((side // patch) ** 2 * config.downsample_ratio**2)


def _known() -> list[InPlaceFamily]:
    import transformers as hf

    return [
        InPlaceFamily("idefics3", hf.Idefics3ForConditionalGeneration, hf.Idefics3Processor),
        InPlaceFamily("smolvlm", hf.SmolVLMForConditionalGeneration, hf.SmolVLMProcessor),
        InPlaceFamily("internvl", hf.InternVLForConditionalGeneration, hf.InternVLProcessor, _internvl_tile_tokens),
        Mistral3Family("mistral3", hf.Mistral3ForConditionalGeneration, hf.PixtralProcessor),
    ]


IN_PLACE_FAMILIES: dict[str, InPlaceFamily] = {f.model_type: f for f in _known()}


@functools.cache
def generic_family(model_type: str, hf_class: type) -> InPlaceFamily:
    """The in-place family of any other HF VLM class (duck-typed facts only)."""
    return InPlaceFamily(model_type, hf_class)
