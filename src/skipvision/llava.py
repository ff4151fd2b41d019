"""HF adapter: Skip-Vision on ``transformers.LlavaForConditionalGeneration`` (Llama-family text backbone).

The algorithm lives in the small modules beside this one; this file only wires them into HF's Llava:
``encode_images`` builds each image's ``[R, sigma_R, S, sigma_S]`` sequence, ``forward`` scatters it into the
placeholder tokens and passes the FFN row index down to the Skip-FFN decoder layers, and prunes the cache after
prefill. No transformers modeling code is copied.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, ProcessorMixin
from transformers.cache_utils import Cache

from .config import SkipVisionConfig
from .layout import image_token_counts, skipped_token_mask
from .merge import bipartite_merge
from .selection import cls_attention_scores, split_tokens
from .skip_ffn import FFN_ROWS_KWARG, enable_skip_ffn, ffn_rows
from .skip_kv import prune_skipped_kv, skip_kv_state
from .summary import SummaryScorer

_CLS_TOWERS = ("clip_vision_model",)


def num_visual_tokens(config: LlavaConfig) -> int:
    """Visual tokens per image that the tower + projector produce (V), as HF's Llava selects them."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type in _CLS_TOWERS
    if config.vision_feature_select_strategy == "full" and has_cls:
        tokens += 1
    elif config.vision_feature_select_strategy == "default" and not has_cls:
        tokens -= 1  # HF drops the first token whether or not it is a CLS
    return tokens


def _has_dropped_cls(config: LlavaConfig) -> bool:
    return (
        config.vision_config.model_type in _CLS_TOWERS
        and config.vision_feature_select_strategy == "default"
        and isinstance(config.vision_feature_layer, int)
    )


class SkipVisionLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with Skip-Vision; settings live in ``config.skip_vision``.

    Each image occupies ``skipvision.num_image_tokens(cfg)`` placeholder tokens in ``input_ids``.
    """

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self._setup_skip_vision()

    def _setup_skip_vision(self) -> None:
        raw = getattr(self.config, "skip_vision", None)
        if raw is None:
            raise ValueError(
                "config has no skip_vision settings: load with "
                "SkipVisionLlavaForConditionalGeneration.from_pretrained(path, skip_vision=SkipVisionConfig(...)) "
                "or convert a model with skipvision.convert(model, cfg)"
            )
        cfg = raw if isinstance(raw, SkipVisionConfig) else SkipVisionConfig.from_dict(raw)
        layers = self.model.language_model.layers
        cfg.check_against(num_visual_tokens(self.config), len(layers), _has_dropped_cls(self.config))
        self.config.skip_vision = cfg.to_dict()
        self.skip_vision_config = cfg
        enable_skip_ffn(layers, cfg.skip_layers)
        self.summary_scorer = None
        if cfg.summary_tokens:
            embed = self.get_input_embeddings().weight
            self.summary_scorer = SummaryScorer(embed.shape[1]).to(device=embed.device, dtype=embed.dtype)
            if embed.device.type != "meta":
                self.summary_scorer.reset_parameters(self._initializer_range())

    def _initializer_range(self) -> float:
        return getattr(self.config.get_text_config(), "initializer_range", 0.02)

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # new parameters missing from a LLaVA checkpoint get the paper's init (method.md 3.4)
        if isinstance(module, SummaryScorer):
            module.reset_parameters(self._initializer_range())
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        skip_vision: SkipVisionConfig | None = None,
        **kwargs: Any,
    ) -> SkipVisionLlavaForConditionalGeneration:
        """Load a Llava checkpoint (vanilla or Skip-Vision); ``skip_vision`` sets or overrides the settings."""
        if skip_vision is not None:
            config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path)
            config.skip_vision = skip_vision.to_dict()
            kwargs["config"] = config
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # --- vision side ----------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        is_tensor = isinstance(pixel_values, torch.Tensor)
        if not is_tensor or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = tuple(pixel_values.shape) if is_tensor else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}); got {shape}")

    def _selection_attention(self) -> torch.nn.Module:
        tower = self.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature_layer = self.config.vision_feature_layer
        if feature_layer == 0:
            raise ValueError("selection='cls_attention' needs vision_feature_layer != 0 (embeddings have no attention)")
        return layers[feature_layer if feature_layer < 0 else feature_layer - 1].self_attn

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Each image's token sequence as it enters the language model: ``(num_images, num_image_tokens, hidden)``.

        Order per image: ``[R, sigma_R, S, sigma_S]`` (``[R, S]`` without summary tokens).
        """
        self._check_pixel_values(pixel_values)
        cfg = self.skip_vision_config
        captured: list[torch.Tensor] = []
        hook = None
        if cfg.selection == "cls_attention":
            attention = self._selection_attention()
            hook = attention.register_forward_pre_hook(
                lambda _m, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
                with_kwargs=True,
            )
        try:
            tower_dtype = self.model.vision_tower.dtype
            out = self.model.get_image_features(pixel_values=pixel_values.to(tower_dtype), return_dict=True)
        finally:
            if hook is not None:
                hook.remove()
        features = getattr(out, "pooler_output", out)
        features = torch.stack(list(features)) if not isinstance(features, torch.Tensor) else features
        features = features.to(self.get_input_embeddings().weight.dtype)
        scores = cls_attention_scores(attention, captured[0]) if cfg.selection == "cls_attention" else None
        retained, candidates = split_tokens(features, cfg.num_retained, scores)
        if cfg.merge == "tome" and candidates.shape[1] > 0:
            skipped = bipartite_merge(candidates, cfg.num_skipped)
        else:
            skipped = candidates
        if self.summary_scorer is None:
            return torch.cat([retained, skipped], dim=1)
        return torch.cat([retained, self.summary_scorer(retained), skipped, self.summary_scorer(skipped)], dim=1)

    def embed_multimodal(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, skipped)``: token embeddings with each image's sequence scattered into its
        placeholders, and the ``(batch, seq)`` boolean mask of skipped tokens."""
        cfg = self.skip_vision_config
        image_token_id = self.config.image_token_id
        images_per_sample = image_token_counts(input_ids, image_token_id, cfg)
        num_images = int(images_per_sample.sum())
        provided = 0 if pixel_values is None else pixel_values.shape[0]
        if num_images != provided:
            raise ValueError(
                f"input_ids hold placeholders for {num_images} image(s) ({cfg.num_image_tokens} tokens each) "
                f"but {provided} image(s) were given in pixel_values"
            )
        inputs_embeds = self.get_input_embeddings()(input_ids)
        skipped = skipped_token_mask(input_ids, image_token_id, cfg)
        if num_images:
            image_embeds = self.encode_images(pixel_values).to(inputs_embeds.dtype)
            is_image = (input_ids == image_token_id).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(is_image, image_embeds)
        return inputs_embeds, skipped

    # --- language side --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        cfg = self.skip_vision_config
        past_length = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        skipped = None
        if input_ids is not None and (past_length == 0 or pixel_values is not None):
            if inputs_embeds is not None:
                raise ValueError("pass either input_ids or inputs_embeds, not both")
            inputs_embeds, skipped = self.embed_multimodal(input_ids, pixel_values)
            input_ids = None
        elif pixel_values is not None:
            raise ValueError("Skip-Vision needs input_ids (with image placeholder tokens) when pixel_values are given")

        has_skipped = skipped is not None and bool(skipped.any())
        if has_skipped:
            kwargs[FFN_ROWS_KWARG] = ffn_rows(skipped)
            if cfg.skip_kv_cache and past_length > 0 and use_cache is not False:
                raise ValueError(
                    "Skip KV-cache prunes right after prefilling an empty cache; images after a non-empty cache are "
                    "not supported. Start a new cache, or set skip_kv_cache=False."
                )
        elif self.training and self.summary_scorer is not None and inputs_embeds is not None:
            # text-only batch: touch the scorer so every DDP/ZeRO rank reduces the same parameters
            touch = sum(p.sum() for p in self.summary_scorer.parameters())
            inputs_embeds = inputs_embeds + 0.0 * touch.to(inputs_embeds.dtype)

        state = skip_kv_state(past_key_values)
        if state is not None:
            query_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if position_ids is None:
                position_ids = state.positions(attention_mask, past_length, query_length)
            attention_mask = state.compact_attention_mask(attention_mask, past_length, query_length)

        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        # training forwards also return a cache (config.use_cache); nobody decodes from it, so do not prune it
        if has_skipped and cfg.skip_kv_cache and not self.training and isinstance(outputs.past_key_values, Cache):
            prune_skipped_kv(outputs.past_key_values, skipped)
        return outputs


def _register_checkpoint_key_mapping() -> None:
    # transformers renames legacy Llava checkpoint keys (``language_model.lm_head`` -> ``lm_head`` ...) by class
    # name or model_type, but skips classes defined outside transformers; without this, loading a llava-hf
    # checkpoint would silently leave lm_head randomly initialised.
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping("llava")
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(
            SkipVisionLlavaForConditionalGeneration.__name__, mapping, overwrite=True
        )


_register_checkpoint_key_mapping()


def convert(model: LlavaForConditionalGeneration, config: SkipVisionConfig) -> SkipVisionLlavaForConditionalGeneration:
    """Turn a ``LlavaForConditionalGeneration`` into a Skip-Vision model, in place, keeping its weights.

    Returns the same object, now a :class:`SkipVisionLlavaForConditionalGeneration` (like ``tome.patch``).
    """
    if isinstance(model, SkipVisionLlavaForConditionalGeneration):
        raise ValueError("model is already a SkipVisionLlavaForConditionalGeneration")
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"convert expects a LlavaForConditionalGeneration, got {type(model).__name__}")
    previous = getattr(model.config, "skip_vision", None)
    model.config.skip_vision = config.to_dict()
    try:
        model.__class__ = SkipVisionLlavaForConditionalGeneration
        model._setup_skip_vision()
    except Exception:
        model.__class__ = LlavaForConditionalGeneration
        model.config.skip_vision = previous
        raise
    model.config.architectures = [SkipVisionLlavaForConditionalGeneration.__name__]
    return model


def _processor_base_image_tokens(processor: ProcessorMixin) -> int:
    """LlavaProcessor's placeholder count per image without ``num_additional_image_tokens``:
    ``(H // patch) * (W // patch)`` of the processed image, minus 1 for the "default" strategy."""
    for name in ("patch_size", "num_additional_image_tokens", "image_processor"):
        if not hasattr(processor, name):
            raise TypeError(f"expected a LlavaProcessor; {type(processor).__name__} has no {name!r}")
    crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
    patches = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    return patches - (1 if processor.vision_feature_select_strategy == "default" else 0)


def processor_image_tokens(processor: ProcessorMixin) -> int:
    """Placeholders a ``LlavaProcessor`` expands each ``<image>`` to."""
    return _processor_base_image_tokens(processor) + processor.num_additional_image_tokens


def configure_processor(processor: ProcessorMixin, config: SkipVisionConfig) -> ProcessorMixin:
    """Make a ``LlavaProcessor`` expand each ``<image>`` to ``num_image_tokens(config)`` placeholders, in place.

    LlavaProcessor counts ``(H // patch) * (W // patch) + num_additional_image_tokens`` (minus 1 for the
    "default" strategy) from the processed image size; we set ``num_additional_image_tokens`` so that count is
    the Skip-Vision one. The setting is saved by ``processor.save_pretrained``.
    """
    processor.num_additional_image_tokens = config.num_image_tokens - _processor_base_image_tokens(processor)
    return processor
