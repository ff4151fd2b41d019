"""Public entry points. Everything above the model (training, evaluation, benchmark, FLOPs, CLI) calls these and
never a concrete family class: they dispatch on ``config.model_type``."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, ProcessorMixin

from .config import SkipVisionConfig, VisionFacts, vanilla_config
from .families import family_for, family_for_processor
from .families.base import Family
from .model import SkipVisionMixin


def convert(model: PreTrainedModel, config: SkipVisionConfig | dict[str, Any]) -> PreTrainedModel:
    """Turn a supported HF model into its Skip-Vision class, in place, keeping its weights (like ``tome.patch``).

    Returns the same object, now e.g. a ``SkipVisionLlavaForConditionalGeneration``.
    """
    if isinstance(model, SkipVisionMixin):
        raise ValueError(f"model is already a {type(model).__name__}")
    family = family_for(model.config, type(model))
    if not isinstance(model, family.hf_class):
        raise TypeError(f"convert expects a {family.hf_class.__name__}, got {type(model).__name__}")
    previous_class, previous = type(model), getattr(model.config, "skip_vision", None)
    model.config.skip_vision = SkipVisionConfig.coerce(config).to_dict()
    try:
        model.__class__ = family.skip_class
        model.setup_skip_vision()
    except Exception:
        model.__class__ = previous_class
        model.config.skip_vision = previous
        raise
    model.config.architectures = [family.skip_class.__name__]
    return model


def from_pretrained(
    path: str | os.PathLike,
    skip_vision: SkipVisionConfig | dict[str, Any] | None = None,
    vanilla: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load any supported checkpoint as a Skip-Vision model.

    ``skip_vision`` sets or overrides the settings; without it the checkpoint's own ``skip_vision`` is used, and
    ``vanilla=True`` loads a checkpoint without settings as the exactly-vanilla configuration.

    Every weight of the model must come from the checkpoint except Skip-Vision's own new ones (the summary scorer,
    absent from vanilla checkpoints): a missing, unexpected or mis-shaped weight raises ``ValueError`` naming it, so
    a checkpoint whose keys do not match never loads with a random language model. ``output_loading_info=True``
    returns HF's report instead of checking it.
    """
    if vanilla and skip_vision is not None:
        raise ValueError("pass either skip_vision=... or vanilla=True, not both (vanilla=True means no settings)")
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    if skip_vision is None and getattr(config, "skip_vision", None) is None:
        if not vanilla:
            raise ValueError(
                f"{path} has no skip_vision settings; pass skip_vision=SkipVisionConfig(...) "
                "(or vanilla=True for the unmodified model)"
            )
        skip_vision = vanilla_config()
    family = family_for(config)
    if kwargs.get("output_loading_info"):
        return family.skip_class.from_pretrained(path, skip_vision=skip_vision, config=config, **kwargs)
    model, info = family.skip_class.from_pretrained(
        path, skip_vision=skip_vision, config=config, output_loading_info=True, **kwargs
    )
    check_loading_info(info, path)
    return model


def check_loading_info(info: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the weights HF's loading report (``output_loading_info``) lists as missing,
    unexpected or mismatched; the summary scorer is filtered out of that report by the Skip-Vision classes."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if problems:
        raise ValueError(
            f"the checkpoint at {path} does not match the model's weights: {'; '.join(problems)}. The checkpoint may "
            "be of another model type or layout, or incomplete; loading it would leave those weights random"
        )


def load_for_inference(
    path: str | os.PathLike, skip_kv_cache: bool | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model (eval mode; a checkpoint without settings loads as the vanilla model) and its processor set up for it.

    ``skip_kv_cache`` overrides the checkpoint's setting (None keeps it).
    """
    model = from_pretrained(path, vanilla=True).eval()
    if skip_kv_cache is not None and skip_kv_cache != model.skip_vision_config.skip_kv_cache:
        model.skip_vision_config = replace(model.skip_vision_config, skip_kv_cache=skip_kv_cache)
    return model, load_processor(path)


def checkpoint_skip_vision(path: str | os.PathLike) -> SkipVisionConfig | None:
    """The Skip-Vision settings stored in a checkpoint's config.json (None for a vanilla checkpoint)."""
    raw = getattr(AutoConfig.from_pretrained(path), "skip_vision", None)
    return None if raw is None else SkipVisionConfig.coerce(raw)


def configure_processor(
    processor: ProcessorMixin, config: SkipVisionConfig, model_config: PretrainedConfig | None = None
) -> ProcessorMixin:
    """Make a supported HF processor expand each ``<image>`` to its Skip-Vision placeholder count, in place.

    ``model_config`` (the model's HF config) pins the visual token count; without it the processor's own is used.
    ``vanilla_config()`` restores the model's own count.
    """
    return family_for_processor(processor).configure_processor(processor, config, model_config)


def load_processor(path: str | os.PathLike, skip_vision: SkipVisionConfig | None = None) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained(path)`` set up for ``skip_vision`` (default: the checkpoint's settings,
    or the vanilla count for a checkpoint without any)."""
    model_config = AutoConfig.from_pretrained(path)
    if skip_vision is None:
        raw = getattr(model_config, "skip_vision", None)
        skip_vision = vanilla_config() if raw is None else SkipVisionConfig.coerce(raw)
    processor = family_for(model_config).load_processor(path)
    return configure_processor(processor, skip_vision, model_config)


def save_processor(processor: ProcessorMixin, path: str | os.PathLike) -> None:
    """``processor.save_pretrained(path)``, or the family's way where HF's needs more than is installed."""
    family_for_processor(processor).save_processor(processor, path)


def family_of(model_or_config: Any) -> Family:
    """The family adapter of a model or HF config."""
    return family_for(getattr(model_or_config, "config", model_or_config))


def vision_facts(config: PretrainedConfig) -> VisionFacts:
    return family_for(config).vision_facts(config)
