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

import inspect
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_masks_for_generate

from . import llm_drop
from .config import SkipVisionConfig, VisionFacts
from .drop_schedule import ranks_with_next_layer, renumbers_positions
from .families.base import Family
from .masks import answer_start, generated_rows_mask
from .prefill import PADDING_MASK_KWARG, ForwardPlan, PrefillMixin, decode_text_positions, read_prefill_counts
from .skip_ffn import FFN_ROWS_KWARG, enable_skip_ffn, ffn_rows
from .skip_kv import cache_slots, prune_skipped_kv, skip_kv_state
from .summary import SummaryScorer

#: the weights Skip-Vision adds to an HF model (regex over state-dict keys): the only ones a vanilla checkpoint lacks
SKIP_VISION_WEIGHTS = r"^summary_scorer\."


class SkipVisionMixin(PrefillMixin):
    """Skip-Vision on top of an HF ``*ForConditionalGeneration``; settings live in ``config.skip_vision``."""

    skip_vision_family: ClassVar[Family]
    #: prompt length of the running ``generate`` call (None outside one): rows after it are generated tokens
    _skip_vision_prompt_length: int | None = None

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.setup_skip_vision()

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
            self.setup_skip_vision()
        except Exception:
            self.config.skip_vision = previous
            raise

    def skip_vision_facts(self) -> VisionFacts:
        return self.skip_vision_family.vision_facts(self.config)

    def setup_skip_vision(self) -> None:
        """Apply ``config.skip_vision`` to this model: check it against the model, swap the decoder layers' classes
        (Skip-FFN, and the drop layer for a drop schedule) and add or remove the summary scorer. The constructor,
        ``skipvision.convert`` and the ``skip_vision_config`` setter call it."""
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
        if cfg.tower_reduction is not None and not self.skip_vision_family.supports_tower_reduction:
            raise ValueError(
                f"tower_reduction={cfg.tower_reduction!r} is not available for {type(self).__name__}: it runs on "
                "towers whose one pass per image yields the image's tokens (LLaVA-1.5)"
            )
        cfg.check_against(self.skip_vision_facts())
        self.config.skip_vision = cfg.to_dict()
        layers = self.skip_vision_family.decoder_layers(self)
        llm_drop.enable_llm_drop(layers, ())  # the drop layer sits on top of the Skip-FFN layer: off first
        enable_skip_ffn(layers, cfg.skip_layers)
        llm_drop.enable_llm_drop(layers, cfg.llm_drop)
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
        # plan (prefill.py: R/S/summaries, positions), mask policy (masks.py), run, prune the cache (skip_kv.py)
        cache = past_key_values if isinstance(past_key_values, Cache) else None
        plan = self._plan_forward(
            input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, cache, use_cache, kwargs
        )
        rows = self._skipped_rows(plan, attention_mask, use_cache, kwargs)
        attention_mask = self._prefill_mask(plan, rows, attention_mask, labels)
        position_ids, attention_mask = self._cached_step(plan, cache, attention_mask)
        drop = None
        if plan.cfg is not None and plan.cfg.llm_drop and plan.visual is not None and bool(plan.visual.any()):
            drop = self._drop_plan(plan, labels, past_key_values if use_cache is not False else None)
            kwargs[llm_drop.DROP_PLAN_KWARG] = drop
        with plan.context:
            outputs = super().forward(
                input_ids=plan.input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=plan.inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **kwargs,
            )
        # training forwards also return a cache (config.use_cache); nobody decodes from it, so do not prune it
        if isinstance(outputs, tuple):  # return_dict=False: the cache is one of the tuple's entries
            returned = next((entry for entry in outputs if isinstance(entry, Cache)), None)
        else:
            returned = outputs.past_key_values
        if rows is not None and rows.prunes and isinstance(returned, Cache):
            prune_skipped_kv(returned, rows.dropped, rows.kept)
        if drop is not None and drop.index and isinstance(returned, Cache) and not self.training:
            llm_drop.attach_state(returned, drop)
        return outputs

    def _skipped_rows(
        self, plan: ForwardPlan, attention_mask: Any, use_cache: bool | None, kwargs: dict[str, Any]
    ) -> SkippedRows | None:
        """The prefill's rows that skip the FFN (S and padding), read to the host once with the plan's checks; the
        Skip-FFN layers get their FFN rows through ``kwargs``. None: nothing skips."""
        if plan.skipped is None:
            self._touch_summary_scorer(plan)
            return None
        padding = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == plan.skipped.shape:
            padding = attention_mask == 0
        # padding columns go with S: no query reads them and no label scores them, so they skip the FFN and leave
        # the cache too. The host reads their counts once; every layer reuses what follows from them.
        dropped = plan.skipped if padding is None else plan.skipped | padding
        kept, skipped_total = read_prefill_counts(dropped, plan.skipped, plan.checks)
        if not skipped_total:
            self._touch_summary_scorer(plan)
            return None
        kwargs[FFN_ROWS_KWARG] = ffn_rows(dropped, sum(kept))
        prunes = plan.cfg.skip_kv_cache and not self.training and use_cache is not False
        return SkippedRows(dropped, kept, padding is not None, prunes)

    def _touch_summary_scorer(self, plan: ForwardPlan) -> None:
        # a batch without skipped tokens in training: touch the scorer so every DDP/ZeRO rank reduces the same
        # parameters
        if self.training and self.summary_scorer is not None and plan.inputs_embeds is not None:
            touch = sum(p.sum() for p in self.summary_scorer.parameters())
            plan.inputs_embeds = plan.inputs_embeds + 0.0 * touch.to(plan.inputs_embeds.dtype)

    def _prefill_mask(self, plan: ForwardPlan, rows: SkippedRows | None, attention_mask: Any, labels: Any) -> Any:
        """The prefill's mask policy (``masks.py``): rows that are generated tokens (assisted decoding's drafts) or,
        in answer-blind training, answer tokens do not see S; any other mask is the caller's."""
        if rows is None:
            return attention_mask
        prompt_length = self._skip_vision_prompt_length
        if rows.prunes and prompt_length is not None and plan.skipped.shape[1] > prompt_length:
            # a prefill that carries drafted tokens: they must not see S, as when decoded
            return generated_rows_mask(attention_mask, plan.skipped, prompt_length, self.dtype)
        if plan.cfg.train_mask == "answer_blind" and labels is not None and not rows.prunes:
            # answer tokens do not see S in training, as generated tokens do not after pruning
            padded = attention_mask if rows.has_padding else None
            return generated_rows_mask(padded, plan.skipped, answer_start(labels), self.dtype)
        return attention_mask

    def _cached_step(self, plan: ForwardPlan, cache: Cache | None, attention_mask: Any) -> tuple[Any, Any]:
        """``(position_ids, attention_mask)`` of a step over a cache: a pruned cache's mask maps onto its slots and
        its positions continue from the full length (never renumbered)."""
        family, position_ids = self.skip_vision_family, plan.position_ids
        state = skip_kv_state(cache)
        if state is not None:
            query_length = (plan.input_ids if plan.input_ids is not None else plan.inputs_embeds).shape[1]
            slots = cache_slots(cache)
            if position_ids is None:
                position_ids = family.rope_position_ids(self, state.positions(attention_mask, slots, query_length))
            return position_ids, state.compact_attention_mask(attention_mask, slots, query_length)
        if position_ids is None and family.uses_mrope and not plan.is_prefill and cache is not None:
            # a direct decode step (no generate): text positions from the full 2-D mask, M-RoPE from the prompt's
            # rope delta (HF's own fallback reads the whole mask as the query's and fails)
            text = decode_text_positions(attention_mask, cache, plan.input_ids, plan.inputs_embeds)
            position_ids = family.rope_position_ids(self, text)
        return position_ids, attention_mask

    def _drop_plan(self, plan: ForwardPlan, labels: Any, cache: Any) -> llm_drop.DropPlan:
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
        visual = plan.visual
        if self._skip_vision_prompt_length is not None and visual.shape[1] > self._skip_vision_prompt_length:
            raise NotImplementedError("assisted and prompt-lookup decoding are not supported with llm_drop")
        rule = plan.cfg.llm_drop_rule
        if renumbers_positions(rule) and self.skip_vision_family.uses_mrope:
            # PyramidDrop has a named departure for M-RoPE; SparseVLM's v1.5 renumbering has none
            remedy = (
                "use llm_drop_rule='pyramid_drop_true_positions' (a named departure: true positions kept)"
                if ranks_with_next_layer(rule)
                else "SparseVLM is offered for 1-D RoPE language models only"
            )
            raise NotImplementedError(
                f"llm_drop_rule={rule!r} renumbers 1-D positions after each drop, as its official code does; "
                f"{type(self).__name__} has M-RoPE positions, for which the official code has no rule: {remedy}"
            )
        mask_2d = plan.padding_mask
        mask = mask_2d if isinstance(mask_2d, torch.Tensor) and mask_2d.shape == visual.shape else None
        if llm_drop.recycles(rule):  # SparseVLM: batch 1, one image, inference, as its official code
            llm_drop.check_recycling_prefill(visual, mask, labels, self.training)
        queries, valid = llm_drop.query_indices(mask, labels, visual.shape, every_answer=ranks_with_next_layer(rule))
        family = self.skip_vision_family
        return llm_drop.DropPlan(
            schedule=plan.cfg.llm_drop,
            visual=visual,
            query_index=queries,
            num_layers=len(family.decoder_layers(self)),
            padding=None if mask is None else mask == 0,
            query_valid=valid,
            rule=rule,
            layers=family.decoder_layers(self),
            rotary=family.language_model(self).rotary_emb if renumbers_positions(rule) else None,
        )


@dataclass
class SkippedRows:
    """A prefill's rows that skip the FFN: ``dropped (batch, L)`` (S and padding), each sample's kept count (read
    once to the host), whether padding is among them, and whether the cache is pruned after the forward."""

    dropped: torch.Tensor
    kept: list[int]
    has_padding: bool
    prunes: bool


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
