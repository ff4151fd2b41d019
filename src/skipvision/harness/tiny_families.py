"""The sizes of a tiny model (:class:`ModelPreset`) and how each family builds one, as transformers'
``ModelTester`` classes keep each model's tiny config: one builder per family (its HF config and model class, its
processor, its tower's embeddings) and the mapping of family names to builders in one place, :data:`TINY_BUILDERS`.
``presets.py`` names the presets and builds the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import SkipVisionConfig
from ..families.processor import image_only_processor

QWEN_FAMILIES = ("qwen2.5-vl", "qwen3-vl")


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of a tiny model of one family and the Skip-Vision setting used with it.

    ``image_size`` is the tower's input (the base image for anyres families); ``grid`` lists the anyres tile
    grids (rows, cols) the processor may pick, and ``data_image_size`` the scene size the demo renders.
    """

    family: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    skip_vision: SkipVisionConfig
    grid: tuple[tuple[int, int], ...] = ()
    data_image_size: int = 168
    # exact geometry of a real checkpoint (the paper-size presets); None: derived from the sizes above
    vision_heads: int | None = None
    vision_intermediate: int | None = None
    vocab_size: int | None = None
    vision_window: int | None = None  # Qwen2.5-VL's windowed attention, in pixels
    vision_full_attention: tuple[int, ...] | None = None  # Qwen2.5-VL's full-attention blocks

    @property
    def visual_tokens(self) -> int:
        """Tokens of one tower pass (the base image; Qwen-VL: an image of ``image_size`` squared, after the 2x2
        merge)."""
        return (self.image_size // (self.token_merge * self.patch_size)) ** 2

    @property
    def token_merge(self) -> int:
        """Patches merged into one visual token along each side (Qwen-VL's 2x2 merger: 2)."""
        return tiny_builder(self.family).token_merge

    @property
    def pinpoints(self) -> list[list[int]]:
        return [[r * self.image_size, c * self.image_size] for r, c in self.grid]


class TinyBuilder:
    """A family's tiny model. Defaults: a CLIP tower + Llama text model, features from layer -2 without CLS (LLaVA-1.5's
    and LLaVA-NeXT's recipe)."""

    #: patches merged into one visual token along each side
    token_merge: int = 1

    def config(
        self, preset: ModelPreset, tokenizer: PreTrainedTokenizerFast, vision_args: dict, text_args: dict
    ) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
        raise NotImplementedError

    def processor(self, preset: ModelPreset, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        raise NotImplementedError

    def tower_embeddings(self, model: PreTrainedModel) -> tuple[nn.Parameter, nn.Module | None]:
        """``(patch embedding weight, position embedding or None)`` of the tower: what the informative init sets."""
        tower = model.model.vision_tower
        embeddings = getattr(tower, "vision_model", tower).embeddings
        return embeddings.patch_embedding.weight, embeddings.position_embedding

    @staticmethod
    def clip_processor(
        processor_class: type, image_processor: Any, preset: ModelPreset, tokenizer: PreTrainedTokenizerFast
    ) -> ProcessorMixin:
        """A LLaVA-style processor over a CLIP tower whose features drop the CLS token."""
        return processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            patch_size=preset.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )

    @staticmethod
    def clip_llama(vision_args: dict, text_args: dict) -> dict[str, Any]:
        return dict(
            vision_config=CLIPVisionConfig(**vision_args),
            text_config=LlamaConfig(**text_args),
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )


class TinyLlava(TinyBuilder):
    def config(self, preset, tokenizer, vision_args, text_args):
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        config = LlavaConfig(
            image_token_id=image_token_id,
            image_seq_length=preset.visual_tokens,
            **self.clip_llama(vision_args, text_args),
        )
        return config, LlavaForConditionalGeneration

    def processor(self, preset, tokenizer):
        size = preset.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return self.clip_processor(LlavaProcessor, image_processor, preset, tokenizer)


class TinyLlavaNext(TinyBuilder):
    def config(self, preset, tokenizer, vision_args, text_args):
        config = LlavaNextConfig(
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=preset.pinpoints,
            **self.clip_llama(vision_args, text_args),
        )
        return config, LlavaNextForConditionalGeneration

    def processor(self, preset, tokenizer):
        size = preset.image_size
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=preset.pinpoints,
        )
        return self.clip_processor(LlavaNextProcessor, image_processor, preset, tokenizer)


class TinyLlavaOnevision(TinyBuilder):
    """SigLIP (no CLS) + Qwen2, anyres-max-9."""

    def config(self, preset, tokenizer, vision_args, text_args):
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_args),
            text_config=Qwen2Config(**text_args),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.unk_token_id,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=preset.pinpoints,
            vision_aspect_ratio="anyres_max_9",
        )
        return config, LlavaOnevisionForConditionalGeneration

    def processor(self, preset, tokenizer):
        size = preset.image_size
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=preset.pinpoints
        )
        return image_only_processor(
            LlavaOnevisionProcessor,
            image_processor,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            num_image_tokens=preset.visual_tokens,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )


def _rope_sections(head_dim: int) -> list[int]:
    """M-RoPE's (t, h, w) split of the rotary half-dimension, in Qwen-VL's proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    height = 3 * half // 8
    return [half - 2 * height, height, height]


class TinyQwenVL(TinyBuilder):
    """Qwen2.5-VL / Qwen3-VL: dynamic resolution, 2x2 merge, M-RoPE."""

    token_merge = 2
    processor_class: type = Qwen2_5_VLProcessor

    def vision(self, preset: ModelPreset) -> dict[str, Any]:
        return dict(
            depth=preset.vision_layers,
            hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_intermediate or 2 * preset.vision_hidden,
            num_heads=preset.vision_heads or max(1, preset.vision_hidden // 32),
            patch_size=preset.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=preset.text_hidden,
        )

    @staticmethod
    def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
        names = {"image": "<image>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
        ids = {f"{key}_token_id": tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}
        return {**ids, "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>")}

    @staticmethod
    def text(preset: ModelPreset, text_args: dict) -> dict[str, Any]:
        head_dim = preset.text_hidden // preset.text_heads
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _rope_sections(head_dim)}
        return dict(text_args, rope_parameters=rope)

    def config(self, preset, tokenizer, vision_args, text_args):
        vision = self.vision(preset)
        # one window per image at the preset size: the tiny tower runs a few large attention calls, not dozens of
        # 4x4-token ones whose call overhead would dominate its time
        vision.update(
            window_size=preset.vision_window or preset.image_size,
            fullatt_block_indexes=list(preset.vision_full_attention or [preset.vision_layers - 1]),
        )
        text = self.text(preset, text_args)
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **self.token_ids(tokenizer))
        return config, Qwen2_5_VLForConditionalGeneration

    def processor(self, preset, tokenizer):
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=preset.patch_size,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": (2 * preset.patch_size) ** 2, "longest_edge": preset.image_size**2},
        )
        return image_only_processor(
            self.processor_class, image_processor, tokenizer, chat_template=tokenizer.chat_template
        )

    def tower_embeddings(self, model):
        # a Conv3d over (frames, p, p) patches; positions are rotary (Qwen2.5) or learned (Qwen3)
        visual = model.model.visual
        return visual.patch_embed.proj.weight, getattr(visual, "pos_embed", None)


class TinyQwen3VL(TinyQwenVL):
    """Qwen3-VL: learned positions and deepstack features from every tower layer."""

    processor_class = Qwen3VLProcessor

    def config(self, preset, tokenizer, vision_args, text_args):
        side = preset.image_size // preset.patch_size
        vision = self.vision(preset)
        vision.update(num_position_embeddings=side * side, deepstack_visual_indexes=list(range(preset.vision_layers)))
        text = self.text(preset, text_args)
        text.update(head_dim=preset.text_hidden // preset.text_heads)
        config = Qwen3VLConfig(vision_config=vision, text_config=text, **self.token_ids(tokenizer))
        return config, Qwen3VLForConditionalGeneration


#: family name -> its tiny builder: the one place a new family adds itself to the harness's tiny models
TINY_BUILDERS: dict[str, TinyBuilder] = {
    "llava": TinyLlava(),
    "llava-next": TinyLlavaNext(),
    "llava-onevision": TinyLlavaOnevision(),
    "qwen2.5-vl": TinyQwenVL(),
    "qwen3-vl": TinyQwen3VL(),
}


def tiny_builder(family: str) -> TinyBuilder:
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; families with one: {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[family]
