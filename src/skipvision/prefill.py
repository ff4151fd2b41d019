"""The prefill side of the Skip-Vision model: images to tokens, placeholders and the skipped mask, and the plan of
one forward (:class:`ForwardPlan`: which tokens are R, S and summaries, the positions, and what the host reads in the
prefill's one wait for the device). ``model.py`` runs the plan; ``masks.py`` holds the mask policy and
``skip_kv.py`` the pruning after the forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .config import SkipVisionConfig
from .families.base import Family
from .placeholders import (
    check_image_spans,
    image_token_counts,
    raise_for_split_images,
    scatter_image_flags,
)
from .sequence import ImageSequence, assemble, in_place_flags
from .skip_kv import cache_slots

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


@dataclass
class ForwardPlan:
    """One forward as the Skip-Vision model runs it. A prefill (images, or an empty cache) has its config, the
    skipped mask of the full or in-place layout, the image placeholders (for in-LLM dropping), the checks the host
    reads later and, for the full layout, the embeddings and positions it built; a decode step only has its inputs."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    position_ids: torch.Tensor | None
    is_prefill: bool
    padding_mask: torch.Tensor | None = None
    cfg: SkipVisionConfig | None = None
    skipped: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    checks: list[DeferredCheck] = field(default_factory=list)
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


class PrefillMixin:
    """The model's input side, mixed into :class:`~skipvision.model.SkipVisionMixin`."""

    skip_vision_family: Family
    #: check that pixel_values are finite before the tower runs (one reduction; set False in a hot loop)
    check_finite_pixels: bool = True

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
        family = self.skip_vision_family
        if cfg.tower_reduction is not None:  # a peer method before the projector: its tokens as they come
            images = family.reduced_image_tokens(self, pixel_values, image_inputs, cfg)
        else:
            images = family.image_tokens(self, pixel_values, image_inputs, cfg)
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

    def _plan_forward(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        attention_mask: Any,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        kwargs: dict[str, Any],
    ) -> ForwardPlan:
        """Plan one forward; ``kwargs`` (the HF forward's) lose the image inputs, which only a prefill uses."""
        family = self.skip_vision_family
        # the settings are parsed only where images are (a decode step, possibly compiled, needs none of them)
        image_inputs = {k: kwargs.pop(k) for k in family.image_input_names if k in kwargs}
        image_inputs = {k: v for k, v in image_inputs.items() if v is not None}
        padding_mask = kwargs.pop(PADDING_MASK_KWARG, None)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            padding_mask = attention_mask
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if pixel_values is not None and self._images_already_cached(input_ids, inputs_embeds, cache, use_cache):
            pixel_values, image_inputs = None, {}
        is_prefill = pixel_values is not None or (
            input_ids is not None and not torch.compiler.is_compiling() and (cache is None or cache_slots(cache) == 0)
        )
        plan = ForwardPlan(input_ids, inputs_embeds, position_ids, is_prefill, padding_mask)
        if not is_prefill:
            if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and family.uses_mrope:
                # a decode step of the full layout: generate passes text positions (_prepare_position_ids_...)
                plan.position_ids = family.rope_position_ids(self, position_ids)
            return plan
        plan.cfg = self.skip_vision_config
        if plan.cfg.in_place:
            # the model's own layout: HF embeds the images and places them; only the skipped tokens are marked
            if plan.cfg.llm_drop:
                plan.visual = self.image_placeholder_mask(input_ids, inputs_embeds)
            plan.skipped, plan.checks = self._in_place_skipped(input_ids, inputs_embeds, pixel_values, image_inputs)
            kwargs.update(image_inputs)
            if pixel_values is not None:
                kwargs["pixel_values"] = pixel_values
            return plan
        self._plan_full_layout(plan, pixel_values, image_inputs, kwargs)
        return plan

    def _plan_full_layout(
        self,
        plan: ForwardPlan,
        pixel_values: torch.Tensor | None,
        image_inputs: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> None:
        """The full layout's prefill: embed here (so placeholders without images are an error, never a silent text
        token), assemble ``[R, sigma_R, S, sigma_S]`` per image, and its positions for M-RoPE families."""
        family = self.skip_vision_family
        for name in family.unsupported_inputs:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by Skip-Vision's full layout; use layout='inplace' "
                    "(which leaves them to the HF model)"
                )
        embeds, plan.skipped, sequences, is_image, plan.checks = self._embed_multimodal(
            plan.input_ids, pixel_values, plan.inputs_embeds, image_inputs
        )
        plan.inputs_embeds, plan.input_ids, plan.visual = embeds, None, is_image
        if family.uses_mrope and (plan.position_ids is None or plan.position_ids.ndim == 2):
            # given 3-D positions are the caller's own; 1-D ones (generate's) are only the text axis
            plan.position_ids = family.layout_position_ids(self, is_image, plan.padding_mask, sequences, image_inputs)
        if sequences:
            plan.context = family.language_model_context(self, is_image, sequences)

    def _images_already_cached(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, cache: Cache | None, use_cache: Any
    ) -> bool:
        """A continued chat re-sends the conversation's images: they need no tower when all their placeholders are
        in the cache. New images after a pruned prefill are refused: the cache cannot take them."""
        past_length = 0 if cache is None else int(cache.get_seq_length())  # full coordinates; 0 for a prefill
        if not past_length:
            return False
        if not bool(self.image_placeholder_mask(input_ids, inputs_embeds).any()):
            return True
        if self.skip_vision_config.skip_kv_cache and use_cache is not False:
            raise ValueError(
                f"new images after a non-empty cache ({past_length} tokens): Skip KV-cache prunes the skipped "
                "tokens once, right after the prefill of an empty cache, so a later turn cannot add images to it. "
                "Prefill a new cache with the whole conversation, or set skip_kv_cache=False."
            )
        return False


def decode_text_positions(
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
