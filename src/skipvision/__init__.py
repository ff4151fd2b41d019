"""skipvision: Skip-Vision (arXiv 2503.21817) for HF vision-language models."""

from .api import (
    checkpoint_skip_vision,
    configure_processor,
    convert,
    family_of,
    from_pretrained,
    load_processor,
    save_processor,
    vision_facts,
)
from .config import ImageLayout, SkipVisionConfig, in_place_config, num_image_tokens, vanilla_config
from .families import FAMILIES
from .families.base import Family
from .families.llava import SkipVisionLlavaForConditionalGeneration
from .families.llava_next import SkipVisionLlavaNextForConditionalGeneration
from .families.llava_onevision import SkipVisionLlavaOnevisionForConditionalGeneration
from .families.qwen2_5_vl import SkipVisionQwen2_5_VLForConditionalGeneration
from .families.qwen3_vl import SkipVisionQwen3VLForConditionalGeneration
from .merge import bipartite_merge
from .model import SkipVisionMixin
from .placeholders import skipped_token_mask
from .skip_kv import SkipKVState, cache_slots, prune_skipped_kv, skip_kv_state
from .summary import SummaryScorer

__version__ = "0.2.0"

__all__ = [
    "FAMILIES",
    "Family",
    "ImageLayout",
    "SkipKVState",
    "SkipVisionConfig",
    "SkipVisionLlavaForConditionalGeneration",
    "SkipVisionLlavaNextForConditionalGeneration",
    "SkipVisionLlavaOnevisionForConditionalGeneration",
    "SkipVisionMixin",
    "SkipVisionQwen2_5_VLForConditionalGeneration",
    "SkipVisionQwen3VLForConditionalGeneration",
    "SummaryScorer",
    "bipartite_merge",
    "checkpoint_skip_vision",
    "configure_processor",
    "convert",
    "family_of",
    "from_pretrained",
    "in_place_config",
    "load_processor",
    "num_image_tokens",
    "cache_slots",
    "prune_skipped_kv",
    "save_processor",
    "skip_kv_state",
    "skipped_token_mask",
    "vanilla_config",
    "vision_facts",
]
