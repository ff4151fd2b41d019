"""skipvision: Skip-Vision (arXiv 2503.21817) for HF vision-language models.

Public names: the loaders and ``convert`` (``api.py``), the one config object, the families' model classes, the
method's pieces (merge, summary scorer, skipped mask) and the peer methods. Cache internals stay in their modules
(``skipvision.skip_kv``); the harness (benchmarks, comparison, demo, CLI) is ``skipvision.harness``."""

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
from .peers import (
    PEERS,
    fastervlm,
    fastv,
    prumerge,
    prumerge_plus,
    pyramid_drop,
    sparsevlm,
    token_drop,
    tome,
    tome_after_projector,
    visionzip,
)
from .placeholders import skipped_token_mask
from .summary import SummaryScorer

__version__ = "0.2.0"

__all__ = [
    "FAMILIES",
    "PEERS",
    "Family",
    "ImageLayout",
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
    "fastervlm",
    "fastv",
    "from_pretrained",
    "in_place_config",
    "load_processor",
    "num_image_tokens",
    "prumerge",
    "prumerge_plus",
    "pyramid_drop",
    "save_processor",
    "skipped_token_mask",
    "sparsevlm",
    "token_drop",
    "tome",
    "tome_after_projector",
    "vanilla_config",
    "vision_facts",
    "visionzip",
]
