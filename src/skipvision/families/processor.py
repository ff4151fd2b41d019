"""The processor side of families whose HF processor expands each image token with ``replace_image_token``:
the processor's class is swapped for a subclass that writes ``config.image_layout(V).total`` placeholders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import ProcessorMixin

from ..config import SkipVisionConfig
from ..mixing import base_class, mix_into, mixed_class, unmix
from .base import Family


def expand_image_tokens(family: Family, processor: ProcessorMixin, config: SkipVisionConfig) -> ProcessorMixin:
    """Make ``processor`` expand each image to its Skip-Vision count, in place. The class name stays HF's, so a
    saved processor is a plain HF one; ``skipvision.load_processor`` sets it up again from config.json. Layouts
    that keep the model's own counts (vanilla, in-place) restore HF's class."""
    if not isinstance(processor, family.processor_class):
        raise TypeError(f"expected a {family.processor_class.__name__}, got {type(processor).__name__}")
    if config.in_place:
        unmix(processor, _SkipVisionProcessorMixin)
        processor.__dict__.pop("skip_vision", None)
    else:
        mix_into(processor, _SkipVisionProcessorMixin, skip_vision_family=family)
        processor.skip_vision = config
    return processor


class _SkipVisionProcessorMixin:
    """Expands an image to ``config.image_layout(V).total``, with V = HF's own count minus any row newlines."""

    skip_vision: SkipVisionConfig
    skip_vision_family: Any

    def _get_unpadded_features(self, *args: Any) -> tuple[int, int]:
        unpadded, _newlines = super()._get_unpadded_features(*args)
        return unpadded, 0  # Skip-Vision drops LLaVA-NeXT's row newlines

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        hf = super().replace_image_token(image_inputs, image_idx, **kwargs)
        newlines = self.skip_vision_family.extra_newlines(self, image_inputs, image_idx)
        visual = len(hf) // len(self.image_token) - newlines
        return self.image_token * self.skip_vision.image_layout(visual).total


def hf_processor_class(processor: Any) -> type:
    """The HF class behind a processor (an instance or a class) that Skip-Vision may have subclassed."""
    cls = processor if isinstance(processor, type) else type(processor)
    cls = base_class(cls, _SkipVisionProcessorMixin)
    return getattr(cls, "skip_vision_hf_class", cls)


#: processor class -> the ``__init__`` settings an image-only save writes besides its parts (each family registers
#: its own: the family modules import this one, never the other way round)
IMAGE_ONLY_SETTINGS: dict[type, tuple[str, ...]] = {}


# HF's processors with a video side cannot be built, saved or loaded without a video processor, which needs
# torchvision; an image-only processor (video_processor=None) is saved as its parts and rebuilt from them.
class _ImageOnlyProcessorMixin:
    """An HF processor built without its video processor: ``save_pretrained`` saves it as its parts (HF's own
    would fail on the missing video processor), so it saves and loads back the HF way."""

    skip_vision_hf_class: type

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("an image-only processor (no torchvision for its video side) is saved locally")
        os.makedirs(save_directory, exist_ok=True)
        save_image_only(self, save_directory, IMAGE_ONLY_SETTINGS.get(self.skip_vision_hf_class, ()))


def image_only_processor(processor_class: type, image_processor: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A ``processor_class`` without a video processor (HF's argument check needs torchvision to name the video
    processor class, so it is skipped for ``video_processor=None``); ``save_pretrained`` works on it."""
    processor_class = mixed_class(_ImageOnlyProcessorMixin, processor_class, skip_vision_hf_class=processor_class)
    processor = processor_class.__new__(processor_class)
    processor.check_argument_for_proper_class = lambda _name, _arg: None
    processor.__init__(image_processor=image_processor, video_processor=None, tokenizer=tokenizer, **kwargs)
    del processor.check_argument_for_proper_class
    return processor


def save_image_only(processor: ProcessorMixin, path: str | os.PathLike, settings: tuple[str, ...]) -> None:
    """Save a processor; an image-only one as its image processor, tokenizer, ``settings`` and chat template."""
    if getattr(processor, "video_processor", None) is not None:
        return processor.save_pretrained(path)
    os.makedirs(path, exist_ok=True)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    values = {k: getattr(processor, k) for k in settings}
    values.update(processor_class=hf_processor_class(processor).__name__, image_only=True)
    Path(path, "processor_config.json").write_text(json.dumps(values, indent=1))
    if processor.chat_template:
        Path(path, "chat_template.jinja").write_text(processor.chat_template)


def load_image_only(
    processor_class: type, image_processor_class: type, path: str | os.PathLike, settings: tuple[str, ...]
) -> ProcessorMixin:
    """Load what :func:`save_image_only` wrote (or a full HF processor)."""
    config_file = Path(path, "processor_config.json")
    values = json.loads(config_file.read_text()) if config_file.exists() else {}
    if not values.get("image_only"):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    from transformers import AutoTokenizer

    template = Path(path, "chat_template.jinja")
    return image_only_processor(
        processor_class,
        image_processor_class.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
        chat_template=template.read_text() if template.exists() else None,
        **{k: values[k] for k in settings},
    )
