"""Qwen2.5-VL (HF ``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, no CLS, M-RoPE positions.

Facts: decoder layers at ``model.model.language_model.layers`` (Llama-style); the tower ``model.model.visual``
turns each image's ``image_grid_thw`` (t, h, w) patch grid into ``t * h * w / merge**2`` tokens in raster order over
the merged grid; the processor writes that many ``<|image_pad|>`` per image (``replace_image_token``). Positions
are 3-D: HF's ``get_rope_index`` gives every visual token (t, row, col) offsets and moves the text after an image
by ``max(h, w) / merge``.

Layouts:
- in place: HF's own forward, processor and positions; only the non-retained tokens are marked skipped.
- full: ``[R, sigma_R, S, sigma_S]`` per image. Each placeholder takes the M-RoPE position of the visual token it
  stands for (a retained token its own; a merged token that of the token the others were merged into; a summary
  token that of the image's centre token), computed by HF's own ``get_rope_index`` on the sequence the vanilla
  processor would have written and gathered from it, so text after an image sits exactly where HF puts it.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
from transformers import PretrainedConfig, ProcessorMixin, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import SkipVisionConfig, VisionFacts
from ..flops import ModelShape, VisionShape, projector_flops, tower_pass_flops
from ..model import SkipVisionMixin
from ..placeholders import host_to_device
from ..sequence import ImageSequence, ImageTokens
from .base import Family, text_shape
from .processor import expand_image_tokens, load_image_only, save_image_only


def qwen_vision_shape(config: Any, grid: tuple[int, int]) -> VisionShape:
    """VisionShape of a Qwen-VL tower for one image of ``grid`` (rows, cols) merged tokens. Every block is counted
    with full attention over the image (Qwen2.5-VL's window blocks cost less: an upper bound for the tower)."""
    v = config.vision_config
    merge = v.spatial_merge_size
    patches = grid[0] * grid[1] * merge * merge
    return VisionShape(
        v.hidden_size,
        v.intermediate_size,
        v.depth,
        0,
        v.patch_size,
        cls=False,
        patch_count=patches,
        merge=merge,
        temporal_patch=v.temporal_patch_size,
        gated_mlp=config.model_type == "qwen2_5_vl",
    )


class QwenVLFamily(Family):
    """Facts shared by the Qwen-VL families."""

    image_input_names = ("image_grid_thw",)
    unsupported_inputs = ("pixel_values_videos",)
    uses_mrope = True
    CLS_TOWERS = ()

    def vision_tower(self, model: Any) -> torch.nn.Module:
        return model.model.visual

    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        return model.model.visual.blocks

    def tower_has_cls(self, config: PretrainedConfig) -> bool:
        return False

    def vision_facts(self, config: PretrainedConfig) -> VisionFacts:
        return VisionFacts(None, None, False, config.get_text_config().num_hidden_layers)

    def merge_size(self, config: PretrainedConfig) -> int:
        return config.vision_config.spatial_merge_size

    def token_grids(self, config: PretrainedConfig, image_inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        """Each image's (t, h, w) grid of language-model tokens (the merged patch grid)."""
        merge = self.merge_size(config)
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in image_inputs["image_grid_thw"].tolist()]

    def num_images(self, pixel_values: torch.Tensor | None, image_inputs: dict[str, Any]) -> int:
        if pixel_values is None:
            return 0
        grids = image_inputs.get("image_grid_thw")
        return 0 if grids is None else int(grids.shape[0])

    def check_image_inputs(self, config: PretrainedConfig, pixel_values: Any, image_inputs: dict[str, Any]) -> None:
        grids = image_inputs.get("image_grid_thw")
        if not isinstance(grids, torch.Tensor) or grids.ndim != 2 or grids.shape[1] != 3:
            raise ValueError(
                f"{self.hf_class.__name__} needs image_grid_thw (num_images, 3) from its processor with pixel_values"
            )
        if pixel_values.ndim != 2 or int(grids.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} do not hold the {int(grids.prod(-1).sum())} patches that "
                "image_grid_thw describes (pixel_values must be the processor's flattened patches)"
            )

    def image_blocks(
        self, config: PretrainedConfig, is_image: torch.Tensor, image_inputs: dict[str, Any]
    ) -> list[tuple[int, tuple[int, int, int] | None]]:
        return [(t * h * w, (t, h, w)) for t, h, w in self.token_grids(config, image_inputs)]

    def image_features(self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> Any:
        pixels = pixel_values.to(model.model.visual.dtype)
        return model.model.get_image_features(pixels, image_inputs["image_grid_thw"], return_dict=True)

    def image_extras(self, output: Any) -> list[list[torch.Tensor]]:
        """Per-token features besides the tokens, per image (none for Qwen2.5-VL)."""
        return [[] for _ in output.pooler_output]

    def image_tokens(
        self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        output = self.image_features(model, pixel_values, image_inputs)
        grids = self.token_grids(model.config, image_inputs)
        return [
            ImageTokens(tokens, tokens.shape[0], None, grid, extras)
            for tokens, grid, extras in zip(output.pooler_output, grids, self.image_extras(output))
        ]

    def image_prompt(self, processor: ProcessorMixin, config: PretrainedConfig) -> str:
        """The image token between vision start and end tokens: M-RoPE gives each run of image tokens one image."""
        start, end = (
            processor.tokenizer.convert_ids_to_tokens(i)
            for i in (config.vision_start_token_id, config.vision_end_token_id)
        )
        return f"{start}{processor.image_token}{end}"

    # --- positions ----------------------------------------------------------------------------------------------
    def rope_position_ids(self, model: Any, text_positions: torch.Tensor) -> torch.Tensor:
        """``(4, batch, q)``: the text positions, then T, H, W = text position + the prompt's rope delta (what HF's
        generate passes while decoding)."""
        deltas = model.model.rope_deltas
        if deltas is None:
            deltas = torch.zeros(text_positions.shape[0], 1, dtype=torch.long)
        deltas = deltas.to(text_positions.device)
        if deltas.shape[0] != text_positions.shape[0]:  # expanded for beams / several sequences per prompt
            deltas = deltas.repeat_interleave(text_positions.shape[0] // deltas.shape[0], dim=0)
        rope = (text_positions + deltas).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text_positions.unsqueeze(0), rope], dim=0)

    def layout_position_ids(
        self,
        model: Any,
        is_image: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sequences: list[ImageSequence],
        image_inputs: dict[str, Any],
    ) -> torch.Tensor:
        """``(4, batch, seq)`` prefill positions of the full layout; sets ``model.model.rope_deltas``."""
        batch, length = is_image.shape
        device = is_image.device
        valid = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
        grids = image_inputs.get("image_grid_thw")
        visual = [s.visual for s in sequences]
        # The layout is planned on the host from one read of the placeholder and padding masks and of the
        # placeholders' sources, so the walk below makes the host wait for the device once, not per run.
        spans = [s.sources.shape[0] for s in sequences]
        masks = torch.stack([is_image, valid]).long().flatten()
        host = torch.cat([masks, *(s.sources for s in sequences)]).tolist()
        host_image = [host[b * length : (b + 1) * length] for b in range(batch)]
        host_valid = [host[(batch + b) * length : (batch + b + 1) * length] for b in range(batch)]
        sources = host[2 * batch * length :]
        offsets = list(itertools.accumulate(spans, initial=0))
        # the sequence the vanilla processor would have written: each image span as its V visual tokens; walked by
        # runs of text / placeholder tokens (a run of placeholders may hold several adjacent images).
        # gather[b][k]: the vanilla position index of sample b's k-th real (unpadded) token
        types: list[list[int]] = []
        gather: list[list[int]] = []
        image = 0
        for flags_row, valid_row in zip(host_image, host_valid):
            flags = [flag for flag, real in zip(flags_row, valid_row) if real]
            row_types: list[int] = []
            row_gather: list[int] = []
            k = 0
            while k < len(flags):
                if not flags[k]:
                    row_gather.append(len(row_types))
                    row_types.append(0)
                    k += 1
                    continue
                row_gather.extend(len(row_types) + src for src in sources[offsets[image] : offsets[image + 1]])
                row_types.extend([1] * int(visual[image]))
                k += spans[image]
                image += 1
            types.append(row_types)
            gather.append(row_gather)
        width = max(len(t) for t in types)
        expanded_types = host_to_device([row + [0] * (width - len(row)) for row in types], device)
        expanded_mask = host_to_device([[1] * len(row) + [0] * (width - len(row)) for row in types], device)
        if grids is not None and any(1 in row for row in types):
            vanilla_positions, _ = model.model.get_rope_index(
                expanded_types, mm_token_type_ids=expanded_types, image_grid_thw=grids, attention_mask=expanded_mask
            )
        else:
            vanilla_positions = expanded_mask.cumsum(-1).sub(1).clamp_min(0).unsqueeze(0).expand(3, -1, -1)
        # every real token's vanilla position, placed at its column: one gather and one scatter for the batch
        columns = [b * length + c for b, row in enumerate(host_valid) for c, real in enumerate(row) if real]
        picks = [b * width + k for b, row in enumerate(gather) for k in row]
        index = host_to_device(columns + picks, device)
        flat = vanilla_positions.reshape(3, batch * width).index_select(1, index[len(columns) :])
        positions = torch.zeros(3, batch * length, dtype=torch.long, device=device)
        positions = positions.index_copy(1, index[: len(columns)], flat).view(3, batch, length)
        text = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        # the next position after the prompt: max + 1 on the rope axes, the token count on the text axis
        top = positions.masked_fill(~valid.unsqueeze(0), -1).amax(dim=(0, 2))
        model.model.rope_deltas = (top + 1 - valid.sum(-1)).unsqueeze(1)
        return torch.cat([text.unsqueeze(0), positions], dim=0)

    # --- processor and FLOPs ------------------------------------------------------------------------------------
    def configure_processor(
        self, processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None
    ) -> ProcessorMixin:
        return expand_image_tokens(self, processor, config)

    def save_processor(self, processor: ProcessorMixin, path: str | os.PathLike) -> None:
        save_image_only(processor, path, ())

    def load_processor(self, path: str | os.PathLike) -> ProcessorMixin:
        return load_image_only(self.processor_class, Qwen2VLImageProcessorPil, path, ())

    def tower_flops(self, config: PretrainedConfig, num_images: int, image_inputs: dict[str, Any]) -> tuple[int, int]:
        tower = projector = 0
        mergers = 1 + len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])  # Qwen3: deepstack
        for _, h, w in self.token_grids(config, image_inputs):
            shape = self.model_shape(config, (h, w))
            tower += tower_pass_flops(shape.vision)
            projector += mergers * projector_flops(shape.vision, shape.text.hidden, h * w)
        return tower, projector

    def model_shape(self, config: PretrainedConfig, grid: tuple[int, int] = (16, 16)) -> ModelShape:
        """Shape for one image whose merged token grid is ``grid`` (rows, cols)."""
        return ModelShape(
            text_shape(config), qwen_vision_shape(config, grid), visual_tokens=grid[0] * grid[1], eligible_tokens=None
        )


class Qwen2_5_VLFamily(QwenVLFamily):
    name = "qwen2.5-vl"
    model_type = "qwen2_5_vl"
    hf_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor


QWEN2_5_VL = Qwen2_5_VLFamily()


class SkipVisionQwen2_5_VLForConditionalGeneration(SkipVisionMixin, Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` with Skip-Vision; settings in ``config.skip_vision``."""

    skip_vision_family = QWEN2_5_VL


QWEN2_5_VL.skip_class = SkipVisionQwen2_5_VLForConditionalGeneration
