"""The generic Skip-Vision model: one mixin over any HF ``*ForConditionalGeneration`` a family adapter describes.

The mixin knows no family. In the full layout it embeds text, asks the family for each image's visual tokens,
assembles ``[R, sigma_R, S, sigma_S]`` per image (``sequence.py``), scatters them into the placeholders and, for
M-RoPE families, asks the family for the positions; in place (and for the vanilla config) it leaves embedding and
positions to the HF model and only marks the skipped tokens. Either way it passes the FFN row index down to the
Skip-FFN decoder layers and prunes the cache after prefill. A family (``families/<name>.py``)
states its facts by subclassing :class:`Family`; its model class is ``SkipVisionMixin`` + the HF class.
No transformers modeling code is copied.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_masks_for_generate

from . import llm_drop
from .config import SkipVisionConfig, VisionFacts
from .families.base import Family
from .placeholders import (
    check_image_spans,
    image_token_counts,
    raise_for_split_images,
    scatter_image_flags,
)
from .sequence import ImageSequence, assemble, in_place_flags
from .skip_ffn import FFN_ROWS_KWARG, enable_skip_ffn, ffn_rows
from .skip_kv import answer_start, cache_slots, generated_rows_mask, prune_skipped_kv, skip_kv_state
from .summary import SummaryScorer

#: the weights Skip-Vision adds to an HF model (regex over state-dict keys): the only ones a vanilla checkpoint lacks
SKIP_VISION_WEIGHTS = r"^summary_scorer\."

#: the 2-D padding mask ``generate`` passes along when it hands the forward a prepared 4-D mask (static caches)
PADDING_MASK_KWARG = "skip_vision_padding_mask"


@dataclass
class DeferredCheck:
    """An input check computed on the device (``failed``, a bool scalar) that the host reads together with the
    prefill's row counts, in one wait; ``raise_error`` names the problem when it failed."""

    failed: torch.Tensor
    raise_error: Callable[[], None]


def run_checks_now(checks: list[DeferredCheck]) -> None:
    """Read deferred checks at once (outside a prefill, where there is no later read to join)."""
    for check in checks:
        if bool(check.failed):
            check.raise_error()


def read_prefill_counts(
    dropped: torch.Tensor, skipped: torch.Tensor, checks: list[DeferredCheck]
) -> tuple[list[int], int]:
    """``(kept columns per sample, skipped tokens in all)`` of a prefill whose ``dropped (batch, seq)`` columns skip
    the FFN and leave the cache, read to the host in the prefill's one wait for the device, with ``checks``."""
    batch = dropped.shape[0]
    values = [(~dropped).sum(dim=1), skipped.sum().reshape(1)] + [check.failed.reshape(1) for check in checks]
    host = torch.cat([value.long() for value in values]).tolist()
    for check, failed in zip(checks, host[batch + 1 :]):
        if failed:
            check.raise_error()
    return host[:batch], host[batch]


class SkipVisionMixin:
    """Skip-Vision on top of an HF ``*ForConditionalGeneration``; settings live in ``config.skip_vision``."""

    skip_vision_family: ClassVar[Family]
    #: check that pixel_values are finite before the tower runs (one reduction; set False in a hot loop)
    check_finite_pixels: bool = True
    #: prompt length of the running ``generate`` call (None outside one): rows after it are generated tokens
    _skip_vision_prompt_length: int | None = None

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self._setup_skip_vision()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("skip_vision_family")
        if family is not None:
            _register_checkpoint_key_mapping(cls.__name__, family.hf_class, family.model_type)
            cls.forward = _forward_with_signature_of(family.hf_class)
            # the summary scorer is Skip-Vision's own new weight: absent from every vanilla checkpoint by design, so
            # HF's load report does not list it as missing (it gets the paper's init in _init_weights)
            ignored = set(getattr(family.hf_class, "_keys_to_ignore_on_load_missing", None) or ())
            cls._keys_to_ignore_on_load_missing = sorted(ignored | {SKIP_VISION_WEIGHTS})

    # --- configuration: config.skip_vision (what config.json stores) is the one source of truth ------------------
    @property
    def skip_vision_config(self) -> SkipVisionConfig:
        return SkipVisionConfig.from_dict(self.config.skip_vision)

    @skip_vision_config.setter
    def skip_vision_config(self, value: SkipVisionConfig) -> None:
        previous = self.config.skip_vision
        self.config.skip_vision = SkipVisionConfig.coerce(value).to_dict()
        try:
            self._setup_skip_vision()
        except Exception:
            self.config.skip_vision = previous
            raise

    def skip_vision_facts(self) -> VisionFacts:
        return self.skip_vision_family.vision_facts(self.config)

    def _setup_skip_vision(self) -> None:
        raw = getattr(self.config, "skip_vision", None)
        if raw is None:
            raise ValueError(
                "config has no skip_vision settings: load with skipvision.from_pretrained(path, "
                "skip_vision=SkipVisionConfig(...)) or convert a model with skipvision.convert(model, cfg)"
            )
        cfg = SkipVisionConfig.coerce(raw)
        if not cfg.in_place and not self.skip_vision_family.supports_full_layout:
            raise ValueError(
                f"{type(self).__name__} supports only layout='inplace' (every visual token stays where HF's processor "
                "put it); the full layout needs a family module that assembles its images"
            )
        cfg.check_against(self.skip_vision_facts())
        self.config.skip_vision = cfg.to_dict()
        enable_skip_ffn(self.skip_vision_family.decoder_layers(self), cfg.skip_layers)
        if not cfg.summary_tokens:
            self.summary_scorer = None
        elif getattr(self, "summary_scorer", None) is None:
            embed = self.get_input_embeddings().weight
            self.summary_scorer = SummaryScorer(embed.shape[1]).to(device=embed.device, dtype=embed.dtype)
            if embed.device.type != "meta":
                # through HF's own per-module init (our _init_weights gives the scorer the paper's init), as a
                # checkpoint without the scorer gets it, so both paths draw the same values
                self._initialize_weights(self.summary_scorer)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats classes defined outside it as custom code and then skips the init of modules without
        # parameters of their own (a CLIP attention's scaled q/k/v init), so missing weights of a Skip-Vision model
        # would get another init than HF's class gives them. It is HF's class plus a mixin whose one new module
        # initialises through ``_init_weights``, so it takes HF's own path.
        return super().is_custom_code() and cls.skip_vision_family.hf_class.is_custom_code()

    def _initializer_range(self) -> float:
        return getattr(self.config.get_text_config(), "initializer_range", 0.02)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # new parameters missing from a vanilla checkpoint get the paper's init (method.md 3.4)
        if isinstance(module, SummaryScorer):
            module.reset_parameters(self._initializer_range())
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        skip_vision: SkipVisionConfig | dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Load a checkpoint (vanilla or Skip-Vision); ``skip_vision`` sets or overrides the settings."""
        if skip_vision is not None:
            config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path)
            config.skip_vision = SkipVisionConfig.coerce(skip_vision).to_dict()
            kwargs["config"] = config
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # --- vision side ----------------------------------------------------------------------------------------
    def image_sequences(self, pixel_values: torch.Tensor, **image_inputs: Any) -> list[ImageSequence]:
        """Each image's placeholder embeddings ``[R, sigma_R, S, sigma_S]`` and its skipped flags."""
        self._check_image_inputs(pixel_values, image_inputs)
        return self._image_sequences(pixel_values, image_inputs)

    def _check_image_inputs(self, pixel_values: Any, image_inputs: dict[str, Any]) -> None:
        check_pixel_values(pixel_values, self.check_finite_pixels)
        self.skip_vision_family.check_image_inputs(self.config, pixel_values, image_inputs)

    def _image_sequences(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[ImageSequence]:
        cfg = self.skip_vision_config
        dtype = self.get_input_embeddings().weight.dtype
        images = self.skip_vision_family.image_tokens(self, pixel_values, image_inputs, cfg)
        for image in images:
            image.tokens = image.tokens.to(dtype)
        return assemble(images, cfg, self.summary_scorer)

    def encode_images(self, pixel_values: torch.Tensor, **image_inputs: Any) -> torch.Tensor | list[torch.Tensor]:
        """Each image's token sequence as it enters the language model.

        ``(num_images, tokens, hidden)`` when every image has the same count (LLaVA-1.5), else a list of
        ``(tokens_i, hidden)``. Order per image: ``[R, sigma_R, S, sigma_S]`` (``[R, S]`` without summaries).
        """
        sequences = [s.embeds for s in self.image_sequences(pixel_values, **image_inputs)]
        if len({s.shape[0] for s in sequences}) <= 1 and sequences:
            return torch.stack(sequences)
        return sequences

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        **image_inputs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, skipped)``: token embeddings with each image's sequence scattered into its
        placeholders, and the ``(batch, seq)`` boolean mask of skipped tokens (the full layout's embedding).

        The placeholders come from ``input_ids``; without them (``generate(inputs_embeds=...)``) from the
        embeddings equal to the image token's, as HF finds them. Given ``inputs_embeds`` are the text embeddings.
        """
        embeds, skipped, _, is_image, checks = self._embed_multimodal(
            input_ids, pixel_values, inputs_embeds, image_inputs
        )
        run_checks_now(checks)
        return embeds, torch.zeros_like(is_image) if skipped is None else skipped

    def skipped_mask(
        self, input_ids: torch.LongTensor | None, pixel_values: torch.Tensor | None = None, **image_inputs: Any
    ) -> torch.Tensor:
        """The ``(batch, seq)`` boolean mask of the skipped tokens of these inputs, in any layout."""
        if self.skip_vision_config.in_place:
            skipped, checks = self._in_place_skipped(input_ids, None, pixel_values, image_inputs)
            run_checks_now(checks)
            return torch.zeros_like(self.image_placeholder_mask(input_ids)) if skipped is None else skipped
        return self.embed_multimodal(input_ids, pixel_values, **image_inputs)[1]

    def _check_image_count(
        self, is_image: torch.Tensor, pixel_values: Any, image_inputs: dict[str, Any]
    ) -> tuple[int, list[int] | None]:
        """``(images given, placeholders per sample or None)``; the per-sample counts are read to the host (one
        wait) where the full layout needs them: a fixed-count family checks them before the tower runs."""
        cfg = self.skip_vision_config
        if pixel_values is not None:
            self._check_image_inputs(pixel_values, image_inputs)
        provided = self.skip_vision_family.num_images(pixel_values, image_inputs)
        # the full layout reads each sample's placeholder count (one wait); in place HF's forward checks them
        per_sample = None if cfg.in_place else is_image.sum(dim=1).tolist()
        fixed = self.skip_vision_facts().fixed_visual_tokens
        if fixed is not None and per_sample is not None:  # fixed count: check before running the tower
            span = cfg.image_layout(fixed).total
            expected = sum(image_token_counts(per_sample, span, cfg))
            if expected != provided:
                raise ValueError(
                    f"input_ids hold placeholders for {expected} image(s) ({span} tokens each) "
                    f"but {provided} image(s) were given in pixel_values"
                )
        elif provided == 0 and (sum(per_sample) if per_sample is not None else bool(is_image.any())):
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image placeholder tokens but no images were given "
                "(pixel_values is None)"
            )
        return provided, per_sample

    def _embed_multimodal(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        image_inputs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[ImageSequence], torch.Tensor, list[DeferredCheck]]:
        """``(inputs_embeds, skipped (None: no image), sequences, is_image, checks the host reads later)``."""
        is_image = self.image_placeholder_mask(input_ids, inputs_embeds)
        provided, per_sample = self._check_image_count(is_image, pixel_values, image_inputs)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if not provided:
            return inputs_embeds, None, [], is_image, []
        sequences = self._image_sequences(pixel_values, image_inputs)
        counts = [s.embeds.shape[0] for s in sequences]
        split = check_image_spans(is_image, counts, per_sample)
        image_embeds = torch.cat([s.embeds for s in sequences]).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds)
        skipped = scatter_image_flags(is_image, torch.cat([s.skipped for s in sequences]))
        checks = [DeferredCheck(split, functools.partial(raise_for_split_images, is_image, counts))]
        return inputs_embeds, skipped, sequences, is_image, checks

    def _in_place_skipped(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: Any,
        image_inputs: dict[str, Any],
    ) -> tuple[torch.Tensor | None, list[DeferredCheck]]:
        """The in-place layout's skipped mask: the non-retained tokens of each image block, where they are (None:
        nothing is skipped, known without looking at the tokens), and the check the host reads later."""
        cfg = self.skip_vision_config
        is_image = self.image_placeholder_mask(input_ids, inputs_embeds)
        provided, _ = self._check_image_count(is_image, pixel_values, image_inputs)
        if cfg.native or not provided:
            return None, []
        blocks = self.skip_vision_family.image_blocks(self.config, is_image, image_inputs)
        counts = [count for count, _ in blocks]

        def wrong_count() -> None:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image placeholder tokens but the {provided} image(s) given "
                f"have {sum(counts)} visual tokens; expand each image with the model's own processor"
            )

        flags = in_place_flags(counts, [grid for _, grid in blocks], cfg, is_image.device)
        check = DeferredCheck(is_image.sum() != sum(counts), wrong_count)
        return scatter_image_flags(is_image, flags), [check]

    def image_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(batch, seq)`` mask of the image placeholder tokens, from ``input_ids`` or else from the embeddings."""
        image_token_id = self.skip_vision_family.image_token_id(self.config)
        if input_ids is None:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3:
                raise ValueError("pass input_ids (batch, sequence) or inputs_embeds (batch, sequence, hidden)")
            token = torch.tensor(image_token_id, device=inputs_embeds.device)
            return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(-1)
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, sequence) tensor; got {shape} (add a batch dimension)")
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} describe "
                "different sequences"
            )
        return input_ids == image_token_id

    # --- generation -----------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ):
        # generate keeps the 2-D mask and position ids over the whole sequence (with inputs_embeds, input_ids hold
        # only the generated tokens)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
        whole = next((t for t in (mask, kwargs.get("position_ids"), input_ids) if t is not None), None)
        # a continued conversation is checked once, when generate starts: a static cache's length is a device
        # tensor, and reading it at every decode step would make the host wait for the device each time
        if is_first_iteration and skip_kv_state(past_key_values) is not None and whole is not None:
            seen = int(past_key_values.get_seq_length())
            if whole.shape[-1] <= seen:
                raise ValueError(
                    f"the inputs ({whole.shape[-1]} tokens) do not extend the {seen} tokens already in "
                    "past_key_values. To continue a conversation pass the previous output's sequences plus the new "
                    "tokens; to rerun a prompt, prefill a new cache (a Skip KV-cache has dropped its skipped keys, so "
                    "it cannot be cut back into its prompt)."
                )
        # HF drops pixel_values outside the first iteration, and an assistant model's generate never has one; but a
        # forward on an empty cache is a prefill whose placeholders need their images (an assistant then drafts
        # from the image instead of failing on placeholders without pixels)
        if not is_first_iteration and kwargs.get("pixel_values") is not None:
            is_first_iteration = not isinstance(past_key_values, Cache) or cache_slots(past_key_values) == 0
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        prepared = model_inputs.get("attention_mask")
        if is_first_iteration and mask is not None and not (isinstance(prepared, torch.Tensor) and prepared.ndim == 2):
            # a compileable cache gets its 4-D mask built here; the prefill still needs the padding it came from. A
            # decode step needs none of it, and a mask growing by a column per step would retrace a compiled step
            model_inputs[PADDING_MASK_KWARG] = mask
        return model_inputs

    def generate(self, *args: Any, **kwargs: Any):
        # Assisted and prompt-lookup decoding verify their first drafts in the prefill forward. Those tokens are
        # generated, so under Skip KV-cache they must not see the skipped tokens, as in plain decoding; the prompt
        # length tells the prefill where generated rows start.
        prompt = kwargs.get("input_ids", args[0] if args else None)
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        previous = self._skip_vision_prompt_length
        self._skip_vision_prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) else None
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._skip_vision_prompt_length = previous

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]):
        # The full layout changes each image's token count, so an M-RoPE family's own 3-D positions (computed from
        # the processor's grid before any image is seen) do not apply: generate carries 1-D text positions and the
        # forward turns them into the layout's M-RoPE positions (prefill) or text + rope delta (decode).
        if self.skip_vision_family.uses_mrope and not self.skip_vision_config.in_place:
            return GenerationMixin._prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def create_masks_for_generate(
        self, *, inputs_embeds: torch.Tensor, attention_mask: Any, past_key_values: Any, **kwargs
    ):
        """HF builds the 4-D mask ahead of a compileable (static) cache's forward; after Skip KV-cache pruning its
        2-D mask, kept in full coordinates by ``generate``, is first mapped onto the cache's slots."""
        state = skip_kv_state(past_key_values)
        if state is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            attention_mask = state.compact_attention_mask(
                attention_mask, cache_slots(past_key_values), inputs_embeds.shape[1]
            )
        return create_masks_for_generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
        )

    # --- language side --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        # the settings are parsed only where images are (a decode step, possibly compiled, needs none of them)
        image_inputs = {k: kwargs.pop(k) for k in self.skip_vision_family.image_input_names if k in kwargs}
        image_inputs = {k: v for k, v in image_inputs.items() if v is not None}
        mask_2d = kwargs.pop(PADDING_MASK_KWARG, None)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            mask_2d = attention_mask
        cache = past_key_values if isinstance(past_key_values, Cache) else None
        state = skip_kv_state(cache)
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        skipped, checks = None, []
        if pixel_values is not None:
            # tokens already cached (full coordinates): a prefill has none
            past_length = 0 if cache is None else int(cache.get_seq_length())
            if past_length and not bool(self.image_placeholder_mask(input_ids, inputs_embeds).any()):
                # a continued chat re-sends the conversation's images; their placeholders are all in the cache
                pixel_values, image_inputs = None, {}
            elif past_length and self.skip_vision_config.skip_kv_cache and use_cache is not False:
                raise ValueError(
                    f"new images after a non-empty cache ({past_length} tokens): Skip KV-cache prunes the skipped "
                    "tokens once, right after the prefill of an empty cache, so a later turn cannot add images to it. "
                    "Prefill a new cache with the whole conversation, or set skip_kv_cache=False."
                )
        cfg = None
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        family = self.skip_vision_family
        is_prefill = pixel_values is not None or (
            input_ids is not None and not torch.compiler.is_compiling() and (cache is None or cache_slots(cache) == 0)
        )
        visual = None  # image placeholders of a prefill, for in-LLM dropping
        if is_prefill:
            cfg = self.skip_vision_config
            if cfg.llm_drop and cfg.in_place:
                visual = self.image_placeholder_mask(input_ids, inputs_embeds)
            if cfg.in_place:
                # the model's own layout: HF embeds the images and places them; only the skipped tokens are marked
                skipped, checks = self._in_place_skipped(input_ids, inputs_embeds, pixel_values, image_inputs)
                kwargs.update(image_inputs)
                if pixel_values is not None:
                    kwargs["pixel_values"] = pixel_values
            else:
                # a prefill: embed here, so placeholders without images are an error and never a silent text token
                for name in family.unsupported_inputs:
                    if kwargs.get(name) is not None:
                        raise ValueError(
                            f"{name} is not supported by Skip-Vision's full layout; use layout='inplace' "
                            "(which leaves them to the HF model)"
                        )
                inputs_embeds, skipped, sequences, is_image, checks = self._embed_multimodal(
                    input_ids, pixel_values, inputs_embeds, image_inputs
                )
                visual = is_image
                if family.uses_mrope and (position_ids is None or position_ids.ndim == 2):
                    # given 3-D positions are the caller's own; 1-D ones (generate's) are only the text axis
                    position_ids = family.layout_position_ids(self, is_image, mask_2d, sequences, image_inputs)
                if sequences:
                    context = family.language_model_context(self, is_image, sequences)
                input_ids = None
        elif isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and family.uses_mrope:
            # a decode step of the full layout: generate passes text positions (see _prepare_position_ids_...)
            position_ids = family.rope_position_ids(self, position_ids)

        padding = dropped = kept_rows = None
        has_skipped = False
        if skipped is not None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == skipped.shape:
                padding = attention_mask == 0
            # padding columns go with S: no query reads them and no label scores them, so they skip the FFN and
            # leave the cache too. The host reads their counts once; every layer reuses what follows from them.
            dropped = skipped if padding is None else skipped | padding
            kept_rows, skipped_total = read_prefill_counts(dropped, skipped, checks)
            has_skipped = skipped_total > 0
        prunes = has_skipped and cfg is not None and cfg.skip_kv_cache and not self.training and use_cache is not False
        if has_skipped:
            kwargs[FFN_ROWS_KWARG] = ffn_rows(dropped, sum(kept_rows))
            prompt_length = self._skip_vision_prompt_length
            if prunes and prompt_length is not None and skipped.shape[1] > prompt_length:
                # a prefill that carries drafted tokens (assisted decoding): they must not see S, as when decoded
                attention_mask = generated_rows_mask(attention_mask, skipped, prompt_length, self.dtype)
            elif cfg is not None and cfg.train_mask == "answer_blind" and labels is not None and not prunes:
                # answer tokens do not see S in training, as generated tokens do not after pruning
                attention_mask = generated_rows_mask(
                    attention_mask if padding is not None else None, skipped, answer_start(labels), self.dtype
                )
        elif self.training and self.summary_scorer is not None and inputs_embeds is not None:
            # text-only batch: touch the scorer so every DDP/ZeRO rank reduces the same parameters
            touch = sum(p.sum() for p in self.summary_scorer.parameters())
            inputs_embeds = inputs_embeds + 0.0 * touch.to(inputs_embeds.dtype)

        if state is not None:
            query_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            slots = cache_slots(cache)
            if position_ids is None:
                position_ids = family.rope_position_ids(self, state.positions(attention_mask, slots, query_length))
            attention_mask = state.compact_attention_mask(attention_mask, slots, query_length)
        elif position_ids is None and family.uses_mrope and not is_prefill and cache is not None:
            # a direct decode step (no generate): text positions from the full 2-D mask, M-RoPE from the prompt's
            # rope delta (HF's own fallback reads the whole mask as the query's and fails)
            position_ids = family.rope_position_ids(
                self, _decode_text_positions(attention_mask, cache, input_ids, inputs_embeds)
            )

        plan = None
        if cfg is not None and cfg.llm_drop and visual is not None and bool(visual.any()):
            plan = self._drop_plan(cfg, visual, mask_2d, labels, past_key_values if use_cache is not False else None)
            kwargs[llm_drop.DROP_PLAN_KWARG] = plan
        with context:
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **kwargs,
            )
        # training forwards also return a cache (config.use_cache); nobody decodes from it, so do not prune it
        if isinstance(outputs, tuple):  # return_dict=False: the cache is one of the tuple's entries
            returned = next((entry for entry in outputs if isinstance(entry, Cache)), None)
        else:
            returned = outputs.past_key_values
        if prunes and isinstance(returned, Cache):
            prune_skipped_kv(returned, dropped, kept_rows)
        if plan is not None and plan.index and isinstance(returned, Cache) and not self.training:
            llm_drop.attach_state(returned, plan)
        return outputs

    def _drop_plan(
        self, cfg: SkipVisionConfig, visual: torch.Tensor, mask_2d: Any, labels: Any, cache: Any
    ) -> llm_drop.DropPlan:
        """The in-LLM dropping plan of a prefill: checked attention and cache, each sample's query token."""
        attn = self.config.get_text_config()._attn_implementation
        if attn not in ("eager", "sdpa"):
            raise NotImplementedError(f"in-LLM dropping (llm_drop) needs eager or SDPA attention, not {attn!r}")
        llm_drop.check_cache(cache)
        if cache is not None and (cache_slots(cache) > 0 or llm_drop.cache_state(cache) is not None):
            raise NotImplementedError(
                "in-LLM dropping (llm_drop) ranks and drops a prompt's visual tokens in the prefill of an empty cache; "
                "prefill a new cache with the whole conversation to add images"
            )
        if self._skip_vision_prompt_length is not None and visual.shape[1] > self._skip_vision_prompt_length:
            raise NotImplementedError("assisted and prompt-lookup decoding are not supported with llm_drop")
        mask = mask_2d if isinstance(mask_2d, torch.Tensor) and mask_2d.shape == visual.shape else None
        return llm_drop.DropPlan(
            schedule=cfg.llm_drop,
            visual=visual,
            query_index=llm_drop.query_indices(mask, labels, visual.shape),
            num_layers=len(self.skip_vision_family.decoder_layers(self)),
            padding=None if mask is None else mask == 0,
        )


def _decode_text_positions(
    attention_mask: Any, cache: Cache, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """``(batch, q)`` 1-D positions of the query tokens of a cached step: from a full-coordinate 2-D mask, or the
    tokens seen so far."""
    query = input_ids if input_ids is not None else inputs_embeds
    batch, length = query.shape[0], query.shape[1]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
    seen = int(cache.get_seq_length())
    return torch.arange(seen, seen + length, device=query.device).expand(batch, length)


def check_pixel_values(pixel_values: Any, check_finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is a floating tensor of normalised, finite values."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"pixel_values must be a torch.Tensor (the processor's return_tensors='pt' output); got "
            f"{type(pixel_values).__name__}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values have dtype {pixel_values.dtype}; the model needs the processor's normalised floating "
            "point output, not raw image bytes"
        )
    # one float32 sum: NaN and inf propagate into it (normalised pixels cannot overflow it), and it costs a
    # fraction of an elementwise isfinite over every value
    if check_finite and not bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):
        raise ValueError("pixel_values contain NaN or inf")


def _forward_with_signature_of(hf_class: type) -> Any:
    """``SkipVisionMixin.forward`` presented with the HF class's signature: ``generate`` validates its kwargs
    (``image_sizes`` ...) against it, and positional arguments keep HF's order. ``mm_encoder_outputs`` is left
    out: with it ``generate`` would pre-encode images with HF's own path instead of Skip-Vision's."""
    signature = inspect.signature(hf_class.forward)
    signature = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "mm_encoder_outputs"]
    )

    def forward(self: SkipVisionMixin, *args: Any, **kwargs: Any):
        if args:
            bound = signature.bind_partial(self, *args).arguments
            kwargs = {**{k: v for k, v in bound.items() if k != "self"}, **kwargs}
        return SkipVisionMixin.forward(self, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = SkipVisionMixin.forward.__doc__
    return forward


def _register_checkpoint_key_mapping(class_name: str, hf_class: type, model_type: str) -> None:
    # transformers renames hub-layout checkpoint keys (llava-hf's ``language_model.lm_head`` -> ``lm_head``, Qwen-VL's
    # ``model.layers`` -> ``model.language_model.layers`` ...) by class name first, then by model_type, but skips
    # classes defined outside transformers; without this, loading such a checkpoint would silently leave those
    # weights randomly initialised. The HF class's own entry wins, as it does for the HF class (Qwen2.5-VL's mapping
    # is registered under its class name only).
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping(hf_class.__name__)
    if mapping is None:
        mapping = conversion_mapping.get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(class_name, mapping, overwrite=True)
