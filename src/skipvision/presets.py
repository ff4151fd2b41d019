"""Tiny LLaVA checkpoints built from configs (no downloads): a CLIP-style tower, a Llama text model, a BPE
tokenizer with a chat template, and a processor, saved as a normal HF checkpoint directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .config import SkipVisionConfig
from .llava import configure_processor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# HF chat template; {% generation %} marks what the assistant says, so label masks come from
# tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}ASSISTANT:{% generation %} {{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}USER: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of a tiny LLaVA and the Skip-Vision setting used with it."""

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

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


MODEL_PRESETS: dict[str, ModelPreset] = {
    # 144 visual tokens (168 px / 14: each cell of the 3x3 scene grid is 4x4 patches); 4-layer 256-wide Llama, GQA
    "tiny": ModelPreset(168, 14, 64, 2, 256, 688, 4, 8, 4, SkipVisionConfig(num_retained=36, num_skipped=36)),
    # LLaVA-1.5 geometry, 576 visual tokens (336 px / 14), the paper's N_r=100, N_s=156
    "small": ModelPreset(336, 14, 128, 4, 512, 1408, 8, 8, 8, SkipVisionConfig(num_retained=100, num_skipped=156)),
}


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory on ``corpus`` (deterministic), with the special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: the chat scaffolding and the embedded dataset's words."""
    from .data import vocabulary_sentences

    return ["USER: ASSISTANT:\n"] * 8 + vocabulary_sentences()


def build_processor(preset: ModelPreset, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = preset.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=preset.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return configure_processor(processor, preset.skip_vision)


def build_model(
    preset: ModelPreset, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers, num_attention_heads=max(1, preset.vision_hidden // 32),
        image_size=preset.image_size, patch_size=preset.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=preset.visual_tokens,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _informative_tower_init(model, preset)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def _informative_tower_init(model: LlavaForConditionalGeneration, preset: ModelPreset) -> None:
    """Make the random tiny tower a usable (frozen) feature extractor.

    With HF's default init (std 0.02) a random CLIP tower maps different images to nearly the same features, so a
    tiny LLaVA cannot learn to read them in minutes. Three patch-embedding channels read each patch's mean colour,
    the other filters and the position embeddings get a larger scale.
    """
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    patch = embeddings.patch_embedding.weight  # (hidden, 3, p, p)
    patch.normal_(0.0, 1.0 / (3 * preset.patch_size))
    patch[:3].zero_()
    for channel in range(3):
        patch[channel, channel].fill_(4.0 / preset.patch_size**2)
    embeddings.position_embedding.weight.normal_(0.0, 0.5)


def init_model(preset_name: str, out: str | Path, seed: int = 0) -> Path:
    """Write a vanilla tiny LLaVA checkpoint (model, tokenizer, processor) to ``out``.

    The processor expands ``<image>`` to the preset's Skip-Vision token count; training reconfigures it for the
    Skip-Vision setting it runs (``configure_processor``).
    """
    if preset_name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset_name!r}; choose one of {sorted(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[preset_name]
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus())
    model = build_model(preset, tokenizer, seed)
    model.save_pretrained(out)
    build_processor(preset, tokenizer).save_pretrained(out)
    return out
