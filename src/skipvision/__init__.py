"""skipvision: Skip-Vision (arXiv 2503.21817) for HF vision-language models."""

from .config import SkipVisionConfig, num_image_tokens, vanilla_config
from .layout import skipped_token_mask
from .llava import SkipVisionLlavaForConditionalGeneration, configure_processor, convert, num_visual_tokens
from .merge import bipartite_merge
from .skip_kv import SkipKVState, prune_skipped_kv, skip_kv_state
from .summary import SummaryScorer

__version__ = "0.1.0"

__all__ = [
    "SkipKVState",
    "SkipVisionConfig",
    "SkipVisionLlavaForConditionalGeneration",
    "SummaryScorer",
    "bipartite_merge",
    "configure_processor",
    "convert",
    "num_image_tokens",
    "num_visual_tokens",
    "prune_skipped_kv",
    "skip_kv_state",
    "skipped_token_mask",
    "vanilla_config",
]
