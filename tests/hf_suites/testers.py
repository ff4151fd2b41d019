"""Tiny model testers in the shape transformers' ``ModelTesterMixin`` expects (``prepare_config_and_inputs_for_common``
and the size attributes), one per family. Our own: transformers' per-model test files are not on PyPI.

Each tester builds an HF config of its family (2 text layers, 2 vision layers, hidden size 32) and a batch of 3
prompts of ``seq_length`` tokens that each hold one image. ``skip_vision`` (a :class:`SkipVisionConfig` or None for
the plain HF class) is stored as ``config.skip_vision``, which is all a Skip-Vision class needs.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

from skipvision import SkipVisionConfig

PAD, BOS, EOS, VISION_START, IMAGE, VIDEO, VISION_END = range(7)
FIRST_TEXT = 7  # text tokens are drawn from [FIRST_TEXT, vocab_size)

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


class Tester:
    """Common part: batch, sizes, prompt layout (``text_before`` text tokens, the image's placeholders, text)."""

    batch_size = 3
    text_before = 2
    text_after = 5
    is_training = True
    visual_tokens: int  # the image's tokens as HF's model and processor count them

    @property
    def num_image_tokens(self) -> int:
        """Placeholders of one image: HF's count, or the Skip-Vision layout's (full: [R, sigma_R, S, sigma_S])."""
        if self.skip_vision is None:
            return self.visual_tokens
        return self.skip_vision.image_layout(self.visual_tokens).total

    def __init__(self, parent, skip_vision: SkipVisionConfig | None) -> None:
        self.parent = parent
        self.skip_vision = skip_vision
        self.vocab_size = TEXT["vocab_size"]
        self.hidden_size = TEXT["hidden_size"]
        self.num_hidden_layers = TEXT["num_hidden_layers"]
        self.num_attention_heads = TEXT["num_attention_heads"]
        self.text_config = dict(TEXT)
        self.vision_config = dict(VISION)
        self.pad_token_id = PAD
        self.image_token_id = IMAGE

    @property
    def image_prefix(self) -> list[int]:
        """Tokens right before an image's placeholders (Qwen: ``<|vision_start|>``)."""
        return []

    @property
    def seq_length(self) -> int:
        return self.text_before + len(self.image_prefix) + self.num_image_tokens + self.text_after

    encoder_seq_length = seq_length

    def hf_config(self):
        raise NotImplementedError

    def get_config(self):
        config = self.hf_config()
        if self.skip_vision is not None:
            config.skip_vision = self.skip_vision.to_dict()
        return config

    def image_inputs(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def input_ids(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(FIRST_TEXT, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        start = self.text_before
        for token in self.image_prefix:
            ids[:, start] = token
            start += 1
        ids[:, start : start + self.num_image_tokens] = self.image_token_id
        return ids

    def prepare_config_and_inputs_for_common(self):
        input_ids = self.input_ids()
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **self.image_inputs()}
        return self.get_config(), inputs

    def prepare_config_and_inputs(self):
        return self.prepare_config_and_inputs_for_common()


def _pixels(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1))


class LlavaTester(Tester):
    """LLaVA-1.5: CLIP 8 px / 2 px patches (16 tokens, CLS dropped), Llama text."""

    image_size, patch_size = 8, 2
    visual_tokens = 16

    def __init__(self, parent, skip_vision):
        super().__init__(parent, skip_vision)
        self.vision_config.update(image_size=self.image_size, patch_size=self.patch_size, projection_dim=32)

    def hf_config(self):
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**self.vision_config),
            text_config=LlamaConfig(**self.text_config),
            image_token_id=IMAGE,
            image_seq_length=self.visual_tokens,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )

    def image_inputs(self):
        return {"pixel_values": _pixels(self.batch_size, 3, self.image_size, self.image_size)}


class LlavaNextTester(Tester):
    """LLaVA-NeXT: CLIP 16 px / 4 px patches (16 tokens a pass), one 2x2 anyres grid: a 32x32 image is the base
    pass plus 4 tiles, 16 + 8 rows x (8 + newline) = 88 placeholders. (The full-layout count taken from these 88 is
    right for an integer N_r and N_s at most the 72 real candidates: N_r + N_s + 2.)"""

    image_size, patch_size = 16, 4
    visual_tokens = 16 + 8 * 9
    pinpoints = [[32, 32]]

    def __init__(self, parent, skip_vision):
        super().__init__(parent, skip_vision)
        self.vision_config.update(image_size=self.image_size, patch_size=self.patch_size, projection_dim=32)

    def hf_config(self):
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**self.vision_config),
            text_config=LlamaConfig(**self.text_config),
            image_token_index=IMAGE,
            image_grid_pinpoints=self.pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )

    def image_inputs(self):
        return {
            "pixel_values": _pixels(self.batch_size, 5, 3, self.image_size, self.image_size),
            "image_sizes": torch.tensor([[32, 32]] * self.batch_size),
        }


class LlavaOnevisionTester(LlavaNextTester):
    """LLaVA-OneVision: SigLIP 16 px / 4 px (16 tokens, "full"), Qwen2 text, the same 2x2 grid as LLaVA-NeXT."""

    visual_tokens = 16 + 8 * 9

    def hf_config(self):
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**self.vision_config),
            text_config=Qwen2Config(**self.text_config),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=self.pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
        )


class QwenTester(Tester):
    """Qwen-VL: 4 px patches, 2-frame temporal patches, 2x2 spatial merge; each image a 4x4 patch grid (4 tokens
    after the merge), written ``<|vision_start|>`` + placeholders + ``<|vision_end|>``."""

    patch_size, merge, grid = 4, 2, (1, 4, 4)

    @property
    def visual_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // self.merge**2

    @property
    def image_prefix(self) -> list[int]:
        return [VISION_START]

    def input_ids(self):
        ids = super().input_ids()
        ids[:, self.text_before + 1 + self.num_image_tokens] = VISION_END
        return ids

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        # what the processor returns with input_ids: 1 marks image tokens (M-RoPE needs it)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
        return config, inputs

    def ids(self) -> dict[str, int]:
        return dict(
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )

    def text(self) -> dict:
        head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        height = head_dim // 8  # M-RoPE (t, h, w) split of the rotary half-dimension, Qwen-VL's proportions
        rope = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * height] + [height] * 2,
        }
        return dict(self.text_config, rope_parameters=rope)

    def vision(self) -> dict:
        return dict(
            depth=VISION["num_hidden_layers"],
            hidden_size=VISION["hidden_size"],
            intermediate_size=VISION["intermediate_size"],
            num_heads=VISION["num_attention_heads"],
            patch_size=self.patch_size,
            spatial_merge_size=self.merge,
            temporal_patch_size=2,
            out_hidden_size=TEXT["hidden_size"],
        )

    def image_inputs(self):
        t, h, w = self.grid
        patch_values = 3 * 2 * self.patch_size**2
        return {
            "pixel_values": _pixels(self.batch_size * t * h * w, patch_values),
            "image_grid_thw": torch.tensor([list(self.grid)] * self.batch_size),
        }


class Qwen2_5_VLTester(QwenTester):
    def hf_config(self):
        vision = dict(self.vision(), window_size=16, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(vision_config=vision, text_config=self.text(), **self.ids())


class Qwen3VLTester(QwenTester):
    def hf_config(self):
        head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        vision = dict(self.vision(), num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(vision_config=vision, text_config=dict(self.text(), head_dim=head_dim), **self.ids())
