"""Tiny checkpoints of every family built from configs (no downloads): the named presets (sizes and the
Skip-Vision setting used with them), a BPE tokenizer with a chat template, and the model and processor, saved as a
normal HF checkpoint directory. What differs per family (its HF config, processor and tower) is its tiny builder in
``tiny_families.py``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from ..api import save_processor
from ..config import SkipVisionConfig
from .tiny_families import QWEN_FAMILIES, ModelPreset, tiny_builder

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
#: Qwen-VL wraps each image in these (its M-RoPE gives each run of image tokens one image's grid); added after the
#: shared vocabulary, so the other families' tokenizers stay as they are
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><image><|vision_end|>"

# HF chat template; {% generation %} marks what the assistant says, so label masks come from
# tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True). A message's content is a string with
# <image> markers (LLaVA data) or HF's list of {"type": "image"} / {"type": "text"} items (pipeline chats).
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for item in content %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}ASSISTANT:{% generation %} {{ render(message['content']) }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}USER: {{ render(message['content']) }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chat_template(image: str = "<image>") -> str:
    """The chat template, writing each image as ``image`` (Qwen-VL: wrapped in vision start/end tokens)."""
    if image == "<image>":
        return CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace("{{ content }}", "{{ content | replace('<image>', '" + image + "') }}").replace(
        "<image>\n{% elif", image + "\n{% elif"
    )


# anyres grids giving 1, 2, 4 and 8 tiles (and their transposes)
ANYRES_GRID = ((1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2))

MODEL_PRESETS: dict[str, ModelPreset] = {
    # 144 visual tokens (168 px / 14: each cell of the 3x3 scene grid is 4x4 patches); 4-layer 256-wide Llama, GQA
    "tiny": ModelPreset("llava", 168, 14, 64, 2, 256, 688, 4, 8, 4, SkipVisionConfig(num_retained=36, num_skipped=36)),
    # LLaVA-1.5 geometry, 576 visual tokens (336 px / 14), the paper's N_r=100, N_s=156
    "small": ModelPreset(
        "llava", 336, 14, 128, 4, 512, 1408, 8, 8, 8, SkipVisionConfig(num_retained=100, num_skipped=156)
    ),
    # SV-LLaVA-HD in miniature: a 168 px base (144 tokens, as "tiny") + up to 8 tiles; R = the base, tiles merged
    # to 144 (the paper's N_r = N_s = the thumbnail's tokens); scenes at 336 px give 2x2 tiles
    "tiny-next": ModelPreset(
        "llava-next",
        168,
        14,
        64,
        2,
        256,
        688,
        4,
        8,
        4,
        SkipVisionConfig(num_retained=144, num_skipped=144),
        grid=ANYRES_GRID,
        data_image_size=336,
    ),
    # LLaVA-OneVision in miniature: SigLIP (no CLS), Qwen2; R = the base, tiles merged to 64
    "tiny-onevision": ModelPreset(
        "llava-onevision",
        112,
        14,
        64,
        2,
        256,
        688,
        4,
        8,
        4,
        SkipVisionConfig(num_retained=64, num_skipped=64, selection="position"),
        grid=ANYRES_GRID,
        data_image_size=224,
    ),
    # Qwen2.5-VL / Qwen3-VL in miniature: dynamic resolution up to 336 / 384 px (12x12 = 144 merged tokens; 14 / 16 px
    # patches, 2x2 merge) and a 6-layer 384-wide text model; the full layout keeps a quarter (every 2nd row and
    # column) and merges the rest to 36
    "tiny-qwen2.5-vl": ModelPreset(
        "qwen2.5-vl",
        336,
        14,
        64,
        2,
        384,
        1024,
        6,
        8,
        4,
        SkipVisionConfig(0.25, 36, selection="grid"),
        data_image_size=336,
    ),
    "tiny-qwen3-vl": ModelPreset(
        "qwen3-vl", 192, 16, 64, 2, 256, 688, 4, 8, 4, SkipVisionConfig(0.25, 9, selection="grid")
    ),
    # The paper's models at their exact geometry, random weights, for timing on a GPU (build them on the device:
    # ``build_model(..., device="cuda", dtype=torch.bfloat16)``): CLIP ViT-L/14-336 + Vicuna-7B (LLaVA-1.5-7B;
    # LLaVA-NeXT-7B with its anyres grids up to 2x2 tiles of 336 px), and Qwen2.5-VL-7B (672 px: 576 merged tokens)
    "llava-1.5-7b": ModelPreset(
        "llava",
        336,
        14,
        1024,
        24,
        4096,
        11008,
        32,
        32,
        32,
        SkipVisionConfig(num_retained=100, num_skipped=156),
        vision_heads=16,
        vision_intermediate=4096,
        vocab_size=32064,
    ),  # fmt: skip
    "qwen2.5-vl-7b": ModelPreset(
        "qwen2.5-vl",
        672,
        14,
        1280,
        32,
        3584,
        18944,
        28,
        28,
        4,
        SkipVisionConfig(0.25, 144, selection="grid"),
        vision_heads=16,
        vision_intermediate=3420,
        vocab_size=152064,
        vision_window=112,
        vision_full_attention=(7, 15, 23, 31),
    ),  # fmt: skip
}

# LLaVA-NeXT-7B: the same CLIP-L/336 + Vicuna-7B, the base image and up to 2x2 anyres tiles, R = the base (576), the
# tiles merged to 576 (SV-LLaVA-HD)
MODEL_PRESETS["llava-next-7b"] = replace(
    MODEL_PRESETS["llava-1.5-7b"],
    family="llava-next",
    skip_vision=SkipVisionConfig(num_retained=576, num_skipped=576),
    grid=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
)

#: the presets at a real checkpoint's size (too large for a CPU run; ``skipvision bench --device cuda``)
PAPER_PRESETS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")


def build_tokenizer(corpus: list[str], vocab_size: int = 512, family: str = "llava") -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory on ``corpus`` (deterministic), with the special tokens and chat template
    (Qwen-VL families: plus the vision start/end tokens)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    if family in QWEN_FAMILIES:
        fast.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
        fast.chat_template = chat_template(QWEN_IMAGE)
    return fast


def get_preset(name: str) -> ModelPreset:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: the chat scaffolding and the embedded dataset's words."""
    from .data import vocabulary_sentences

    return ["USER: ASSISTANT:\n"] * 8 + vocabulary_sentences()


def build_processor(preset: ModelPreset, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    """The family's HF processor with its vanilla placeholder count."""
    return tiny_builder(preset.family).processor(preset, tokenizer)


def build_model(
    preset: ModelPreset,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A random model of the preset's family (vanilla HF class), built on ``device`` (a 7B model is built on its
    GPU in seconds, where the CPU takes minutes) and cast to ``dtype``."""
    vision_args = dict(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate or 4 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads or max(1, preset.vision_hidden // 32),
        image_size=preset.image_size,
        patch_size=preset.patch_size,
    )
    text_args = dict(
        vocab_size=preset.vocab_size or len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config, model_class = tiny_builder(preset.family).config(preset, tokenizer, vision_args, text_args)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = model_class(config)
    if dtype is not None:
        model = model.to(dtype)
    _informative_tower_init(model, preset)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def _informative_tower_init(model: PreTrainedModel, preset: ModelPreset) -> None:
    """Make the random tiny tower a usable (frozen) feature extractor.

    With HF's default init (std 0.02) a random CLIP tower maps different images to nearly the same features, so a
    tiny LLaVA cannot learn to read them in minutes. Three patch-embedding channels read each patch's mean colour,
    the other filters and the position embeddings get a larger scale.
    """
    patch, position = tiny_builder(preset.family).tower_embeddings(model)
    pixels = patch[0, 0].numel()  # (hidden, 3, [frames,] p, p): the pixels one channel filter reads
    patch.normal_(0.0, 1.0 / (3 * pixels**0.5))
    patch[:3].zero_()
    for channel in range(3):
        patch[channel, channel].fill_(4.0 / pixels)
    if position is not None:
        position.weight.normal_(0.0, 0.5)


def init_model(preset_name: str, out: str | Path, seed: int = 0) -> Path:
    """Write a vanilla tiny checkpoint (model, tokenizer, processor with the vanilla count) to ``out``."""
    preset = get_preset(preset_name)
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus(), family=preset.family)
    model = build_model(preset, tokenizer, seed)
    model.save_pretrained(out)
    save_processor(build_processor(preset, tokenizer), out)
    return out
