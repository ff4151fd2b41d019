"""LLaVA-1.5 (HF ``LlavaForConditionalGeneration``): one tower pass per image, a fixed V tokens per image.

Facts: decoder layers at ``model.model.language_model.layers``; V = patches (+CLS for CLIP "full"); every
token may be retained (CLS-attention top-N_r); ``LlavaProcessor`` expands ``<image>`` to
``patches + num_additional_image_tokens`` (minus 1 for "default"), so a fixed Skip-Vision count is one setting.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PretrainedConfig, ProcessorMixin

from ..config import SkipVisionConfig, VisionFacts
from ..model import SkipVisionMixin
from ..sequence import ImageTokens
from ..tower_reduction import TowerRun, capture_attention_inputs, tower_reduction
from .base import Family, ModelShape, selection_scores, text_shape, vision_shape


class LlavaFamily(Family):
    name = "llava"
    model_type = "llava"
    hf_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    supports_tower_reduction = True

    def vision_facts(self, config: PretrainedConfig) -> VisionFacts:
        visual = self.tokens_per_tower_pass(config)
        layers = config.get_text_config().num_hidden_layers
        return VisionFacts(visual, visual, self.tower_has_cls(config), layers)

    def check_image_inputs(self, config: PretrainedConfig, pixel_values: Any, image_inputs: dict[str, Any]) -> None:
        vision = config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        is_tensor = isinstance(pixel_values, torch.Tensor)
        if not is_tensor or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = tuple(pixel_values.shape) if is_tensor else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}); got {shape}")

    def image_tokens(
        self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        inner = model.model
        pixels = pixel_values.to(inner.vision_tower.dtype)
        visual = self.tokens_per_tower_pass(model.config)
        out, scores = selection_scores(
            self, model, config, visual, lambda: inner.get_image_features(pixel_values=pixels, return_dict=True)
        )
        features = out.pooler_output
        return [ImageTokens(features[i], visual, None if scores is None else scores[i]) for i in range(len(features))]

    def reduced_image_tokens(
        self, model: Any, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        inner = model.model
        reduction = tower_reduction(config.tower_reduction)
        layers = self.vision_layers(model)
        feature_index = self.feature_index(model)
        wanted = [feature_index - 1 + offset for offset in reduction.attention_layers]
        if any(not 0 <= index < len(layers) for index in wanted):
            raise ValueError(
                f"tower_reduction={config.tower_reduction!r} reads tower layers {wanted}; the tower has {len(layers)}"
            )
        seen, hooks = capture_attention_inputs(layers, wanted)
        pixels = pixel_values.to(inner.vision_tower.dtype)
        projected = None
        with hooks, reduction.tower_context(layers, feature_index - 1, config):
            if reduction.after_projector:  # HF's own selected and projected features
                out = inner.get_image_features(pixel_values=pixels, output_hidden_states=True, return_dict=True)
                projected = torch.stack(list(out.pooler_output))
            else:
                out = inner.vision_tower(pixels, output_hidden_states=True)
        run = TowerRun(out.hidden_states, feature_index, layers, seen, projected)
        features = reduction.reduce(run, config)
        tokens = features if reduction.after_projector else inner.multi_modal_projector(features)
        return [ImageTokens(tokens[i], tokens.shape[1]) for i in range(tokens.shape[0])]

    def configure_processor(
        self, processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None
    ) -> ProcessorMixin:
        """Set ``num_additional_image_tokens`` so that LlavaProcessor's count is the Skip-Vision one (saved by
        ``processor.save_pretrained``)."""
        for name in ("patch_size", "num_additional_image_tokens", "image_processor"):
            if not hasattr(processor, name):
                raise TypeError(f"expected a LlavaProcessor; {type(processor).__name__} has no {name!r}")
        crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
        patches = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
        base = patches - (1 if processor.vision_feature_select_strategy == "default" else 0)
        # V: the model's count when we know the model, else the patches (CLIP "default" or SigLIP "full")
        visual = self.tokens_per_tower_pass(model_config) if model_config is not None else patches
        processor.num_additional_image_tokens = config.image_layout(visual).total - base
        return processor

    def model_shape(self, config: PretrainedConfig):
        return ModelShape(
            text_shape(config),
            vision_shape(config, cls=self.tower_emits_cls(config)),
            visual_tokens=self.tokens_per_tower_pass(config),
        )


LLAVA = LlavaFamily()


class SkipVisionLlavaForConditionalGeneration(SkipVisionMixin, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with Skip-Vision; settings live in ``config.skip_vision``.

    Each image occupies ``skipvision.num_image_tokens(cfg)`` placeholder tokens in ``input_ids``.
    """

    skip_vision_family = LLAVA


LLAVA.skip_class = SkipVisionLlavaForConditionalGeneration
