"""Model families Skip-Vision supports, one module each (the facts of that family and its model class).

A new family is one module here: a :class:`skipvision.families.base.Family` subclass stating its facts, its
``SkipVisionMixin`` model class, and an entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from .base import Family
from .inplace import IN_PLACE_FAMILIES, generic_family
from .llava import LLAVA
from .llava_next import LLAVA_NEXT
from .llava_onevision import LLAVA_ONEVISION
from .processor import hf_processor_class
from .qwen2_5_vl import QWEN2_5_VL
from .qwen3_vl import QWEN3_VL

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_5_VL, QWEN3_VL)}


FAMILIES.update(IN_PLACE_FAMILIES)


def family_for(config: Any, model_class: type | None = None) -> Family:
    """The family of an HF config (or a ``model_type`` string). Any other HF VLM class (``model_class``, or the one
    ``config.architectures`` names) gets a duck-typed in-place family."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_class is None and not isinstance(config, str):
        model_class = _architecture_class(config)
    if model_class is None:
        raise ValueError(
            f"Skip-Vision does not know model_type {model_type!r} (families: {sorted(FAMILIES)}); an HF VLM class "
            "with Llama-style decoder layers can still use layout='inplace' through skipvision.convert(model, cfg)"
        )
    if not isinstance(config, str) and all(
        getattr(config, name, None) is None for name in ("image_token_id", "image_token_index")
    ):
        raise TypeError(
            f"{model_class.__name__} is not a vision-language model Skip-Vision can use: its config has no "
            "image_token_id (or image_token_index) marking the visual tokens to skip"
        )
    return generic_family(model_type, model_class)


def _architecture_class(config: Any) -> type | None:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name.removeprefix("SkipVision"), None)
        if isinstance(cls, type):
            return cls
    return None


def family_by_name(name: str) -> Family:
    """The family with CLI name ``name`` (``llava``, ``llava-next``, ``llava-onevision``)."""
    for family in FAMILIES.values():
        if name in (family.name, family.model_type):
            return family
    raise ValueError(f"unknown model family {name!r}; choose one of {sorted(f.name for f in FAMILIES.values())}")


def family_for_processor(processor: Any) -> Family:
    """The family whose processor class ``processor`` (an instance or a class) is. Most specific class wins."""
    cls = hf_processor_class(processor)
    for family in FAMILIES.values():
        if cls is family.processor_class:
            return family
    for family in FAMILIES.values():
        if issubclass(cls, family.processor_class):
            return family
    raise TypeError(f"no Skip-Vision family uses processor {cls.__name__}")


#: HF auto classes whose mapping holds the families' ``*ForConditionalGeneration`` classes
AUTO_CLASS_NAMES = ("AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModelForPreTraining")


def register_auto_classes() -> None:
    """Make HF's auto classes (and so ``pipeline``) load a saved Skip-Vision checkpoint as its Skip-Vision class.

    Each family's entry becomes ``(hf_class, skip_class)``: HF picks the class named in ``config.architectures``,
    which ``save_pretrained`` writes, and the first one otherwise, so vanilla checkpoints still load as HF's class.
    """
    import transformers

    for name in AUTO_CLASS_NAMES:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        for family in FAMILIES.values():
            config_class = family.hf_class.config_class
            if config_class in auto._model_mapping:
                auto.register(config_class, (family.hf_class, family.skip_class), exist_ok=True)


register_auto_classes()
