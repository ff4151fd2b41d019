"""The base of every family adapter: :class:`Family` states what one HF vision-language model family is (where its
layers, tower and placeholders are, how its images become tokens, its processor and positions), so the model mixin
and the harness never branch on a family. A family module (``families/<name>.py``) subclasses it; its model class is
``SkipVisionMixin`` + the HF class (``model.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, ProcessorMixin

from ..config import SkipVisionConfig, VisionFacts
from ..flops import ModelShape, TextShape, VisionShape, projector_flops, tower_pass_flops
from ..placeholders import placeholder_runs
from ..selection import selection_strategy, square_grid
from ..sequence import ImageSequence, ImageTokens


class Family:
    """Facts of one HF vision-language model family. Subclass per family (``families/<name>.py``).

    Defaults fit LLaVA-style models: ``model.model.language_model.layers``, ``config.image_token_id``, a
    CLIP/SigLIP tower at ``model.model.vision_tower`` with features from ``config.vision_feature_layer``.
    """

    name: str  # preset / CLI name
    model_type: str  # HF ``config.model_type``
    hf_class: type  # HF *ForConditionalGeneration
    processor_class: type  # HF processor whose placeholder count the family sets
    skip_class: type  # set by the family module: SkipVisionMixin + hf_class
    image_input_names: tuple[str, ...] = ()  # forward kwargs that describe the images (image_sizes, ...)
    unsupported_inputs: tuple[str, ...] = ()  # forward kwargs the full layout refuses (videos)

    #: the family can assemble ``[R, sigma_R, S, sigma_S]`` (layout="full"); in-place-only families cannot
    supports_full_layout: ClassVar[bool] = True
    #: positions are M-RoPE ``(3 or 4, batch, seq)`` ids, not 1-D ones
    uses_mrope: ClassVar[bool] = False
    #: the family runs a peer's reduction before the projector (``reduced_image_tokens``)
    supports_tower_reduction: ClassVar[bool] = False

    # --- structure ----------------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text model that runs the decoder layers."""
        return model.model.language_model

    def image_token_id(self, config: PretrainedConfig) -> int:
        return config.image_token_id

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        tower = self.vision_tower(model)
        return getattr(tower, "vision_model", tower).encoder.layers

    def block_class_names(self, model: nn.Module) -> list[str]:
        """Class names of the repeated blocks (decoder and vision layers): the units FSDP shards and wraps."""
        blocks = [self.decoder_layers(model)[0], self.vision_layers(model)[0]]
        # the Skip-FFN layer class keeps its HF name, so the names match both the HF and the Skip-Vision model
        return sorted({type(block).__name__ for block in blocks})

    def tower_passes(self, config: PretrainedConfig, num_images: int, image_inputs: dict[str, Any]) -> int:
        """Tower passes the images of one batch take (one per image; anyres: base + tiles)."""
        return num_images

    CLS_TOWERS: ClassVar[tuple[str, ...]] = ("clip_vision_model",)  # vision model_types that emit a CLS token

    def tower_emits_cls(self, config: PretrainedConfig) -> bool:
        return config.vision_config.model_type in self.CLS_TOWERS

    def tower_has_cls(self, config: PretrainedConfig) -> bool:
        """The tower emits a CLS token that the selected features drop ("default"): what CLS-attention selection
        needs. A list of feature layers (features concatenated) qualifies too."""
        return self.tower_emits_cls(config) and config.vision_feature_select_strategy == "default"

    def tokens_per_tower_pass(self, config: PretrainedConfig) -> int:
        """Visual tokens one tower pass (one image or tile) yields after feature selection."""
        vision = config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        has_cls = self.tower_emits_cls(config)
        if config.vision_feature_select_strategy == "full" and has_cls:
            tokens += 1
        elif config.vision_feature_select_strategy == "default" and not has_cls:
            tokens -= 1  # HF drops the first token whether or not it is a CLS
        return tokens

    def vision_facts(self, config: PretrainedConfig) -> VisionFacts:
        raise NotImplementedError

    def selection_attentions(self, model: nn.Module) -> list[nn.Module]:
        """The vision attention modules whose inputs CLS-attention selection scores: the attention of each layer
        whose output is a feature layer (several for a list-valued ``vision_feature_layer``)."""
        layers = self.vision_layers(model)
        feature_layers = model.config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        # hidden_states[k] (k > 0) is the output of layers[k - 1]; hidden_states[0] (= [-(L + 1)]) the embeddings
        resolved = [index + len(layers) + 1 if index < 0 else index for index in feature_layers]
        if 0 in resolved:
            raise ValueError(
                f"selection='cls_attention' cannot use vision_feature_layer {model.config.vision_feature_layer}: "
                "it includes the embeddings (hidden state 0), which no attention produced"
            )
        return [layers[index - 1].self_attn for index in resolved]

    # --- images -------------------------------------------------------------------------------------------------
    def num_images(self, pixel_values: torch.Tensor | None, image_inputs: dict[str, Any]) -> int:
        return 0 if pixel_values is None else int(pixel_values.shape[0])

    def check_image_inputs(self, config: PretrainedConfig, pixel_values: Any, image_inputs: dict[str, Any]) -> None:
        """Raise ``ValueError`` for image inputs of the wrong type or shape."""

    def image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        """Each image's visual tokens (tower + projector), the eligible count and, if the selection needs them,
        scores. With ``config.native`` the tokens are exactly what the HF model scatters."""
        raise NotImplementedError

    def image_blocks(
        self, config: PretrainedConfig, is_image: torch.Tensor, image_inputs: dict[str, Any]
    ) -> list[tuple[int, tuple[int, int, int] | None]]:
        """``(tokens, (t, h, w) grid or None)`` of every image block among the placeholders, in placeholder order:
        what the in-place layout selects within. Default: blocks of the fixed per-image count, or else each
        unbroken run of placeholders; square blocks get a square grid."""
        fixed = self.vision_facts(config).fixed_visual_tokens
        if fixed is not None:
            total = int(is_image.sum())
            if total % fixed:
                raise ValueError(
                    f"input_ids hold {total} image placeholder tokens, not a multiple of the {fixed} tokens of an image"
                )
            counts = [fixed] * (total // fixed)
        else:
            counts = placeholder_runs(is_image)
        return [(count, square_grid(count)) for count in counts]

    def reduced_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict[str, Any], config: SkipVisionConfig
    ) -> list[ImageTokens]:
        """Each image's tokens after ``config.tower_reduction`` (a peer method before the projector), R first."""
        raise ValueError(
            f"tower_reduction={config.tower_reduction!r} is not available for the {self.name} family: it runs on "
            "towers whose one pass per image yields the image's tokens (LLaVA-1.5)"
        )

    def feature_index(self, model: nn.Module) -> int:
        """The non-negative index into the tower's ``hidden_states`` of the features (one feature layer)."""
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"a tower reduction reads one feature layer, not vision_feature_layer={layer}")
        return layer + len(self.vision_layers(model)) + 1 if layer < 0 else layer

    # --- positions ----------------------------------------------------------------------------------------------
    def rope_position_ids(self, model: nn.Module, text_positions: torch.Tensor) -> torch.Tensor:
        """Position ids the model takes for tokens after the prompt, from their 1-D text positions."""
        return text_positions

    def layout_position_ids(
        self,
        model: nn.Module,
        is_image: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sequences: list[ImageSequence],
        image_inputs: dict[str, Any],
    ) -> torch.Tensor | None:
        """Prefill position ids for the full layout, when the family's positions depend on the image layout
        (M-RoPE); None for 1-D positions (the usual ``cumsum(mask) - 1``)."""
        return None

    def language_model_context(
        self, model: nn.Module, is_image: torch.Tensor, sequences: list[ImageSequence]
    ) -> contextlib.AbstractContextManager:
        """A context for the full layout's forward that hands the text model what the HF model would have
        derived from the images itself (Qwen3-VL's deepstack features); nothing by default."""
        return contextlib.nullcontext()

    # --- processor ----------------------------------------------------------------------------------------------
    def configure_processor(
        self, processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None
    ) -> ProcessorMixin:
        raise NotImplementedError

    def image_prompt(self, processor: ProcessorMixin, config: PretrainedConfig) -> str:
        """How a prompt writes one image for this family's processor."""
        return processor.image_token

    def extra_newlines(self, processor: ProcessorMixin, image_inputs: dict, image_idx: int) -> int:
        """Row-newline tokens the HF processor counts in an image's expansion besides its visual tokens."""
        return 0

    def save_processor(self, processor: ProcessorMixin, path: str | os.PathLike) -> None:
        processor.save_pretrained(path)

    def load_processor(self, path: str | os.PathLike) -> ProcessorMixin:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    # --- FLOPs --------------------------------------------------------------------------------------------------
    def tower_flops(self, config: PretrainedConfig, num_images: int, image_inputs: dict[str, Any]) -> tuple[int, int]:
        """Analytic ``(tower, projector)`` FLOPs of one batch's images."""
        shape = self.model_shape(config)
        passes = self.tower_passes(config, num_images, image_inputs)
        tokens = passes * self.tokens_per_tower_pass(config)
        return passes * tower_pass_flops(shape.vision), projector_flops(shape.vision, shape.text.hidden, tokens)

    def model_shape(self, config: PretrainedConfig) -> ModelShape:
        """The FLOPs model's shape of this model (``flops.ModelShape``) with one image of the base size: the one
        place that reads an HF config's sizes for the analytic FLOPs."""
        raise NotImplementedError


def text_shape(config: Any) -> TextShape:
    """TextShape of an HF VLM config's text model."""
    t = config.get_text_config()
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return TextShape(
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        head_dim,
        t.vocab_size,
    )


def vision_shape(config: Any, cls: bool) -> VisionShape:
    """VisionShape of an HF VLM config's ViT tower."""
    v = config.vision_config
    layers = getattr(config, "vision_feature_layer", -1)
    feature_layers = 1 if isinstance(layers, int) else len(layers)
    return VisionShape(
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        v.image_size,
        v.patch_size,
        cls,
        feature_layers,
        heads=v.num_attention_heads,
    )


def selection_scores(
    family: Family, model: nn.Module, config: SkipVisionConfig, eligible: int, run_tower: Any
) -> tuple[Any, torch.Tensor | None]:
    """Run ``run_tower()`` and, when the config's selection has to rank ``eligible`` tokens, score every tower
    pass's tokens. Returns ``(run_tower's result, scores (passes, tokens) or None)``.
    """
    strategy = selection_strategy(config.selection)
    ranks = not config.native and config.retained_count(eligible) < eligible
    attentions = family.selection_attentions(model) if strategy.needs_cls and ranks else []
    scores: list[list[torch.Tensor]] = [[] for _ in attentions]

    def hook(into: list[torch.Tensor], module: nn.Module, args: tuple, kwargs: dict) -> None:
        # scored inside the module's call, while its weights are whole (FSDP reshards them right after)
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():  # a ranking: no gradient flows through it
            into.append(strategy.scores(module, hidden_states.detach()))

    hooks = [
        attention.register_forward_pre_hook(functools.partial(hook, into), with_kwargs=True)
        for attention, into in zip(attentions, scores)
    ]
    try:
        result = run_tower()
    finally:
        for handle in hooks:
            handle.remove()
    if not attentions:
        return result, None
    # several feature layers: the mean of their CLS attentions (one layer: exactly its own)
    return result, sum(layer_scores[0] for layer_scores in scores) / len(attentions)
