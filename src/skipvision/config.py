"""The one configuration object of Skip-Vision, and the per-image token layout it implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .drop_schedule import check_rule, check_schedule, check_without_skipping
from .selection import SELECTIONS, selection_strategy
from .tower_reduction import tower_reduction

MERGES = ("tome", "none", "drop")
TRAIN_MASKS = ("causal", "answer_blind")
LAYOUTS = ("full", "inplace")


@dataclass(frozen=True)
class ImageLayout:
    """How one image enters the language model: ``[R, sigma_R, S, sigma_S]`` (``[R, S]`` without summaries).

    ``native`` means the family's own layout (every visual token retained, nothing added): exactly vanilla.
    """

    retained: int
    skipped: int
    summary_tokens: bool
    native: bool = False
    in_place: bool = False

    @property
    def total(self) -> int:
        """Placeholder tokens the image occupies in ``input_ids``."""
        return self.retained + self.skipped + (2 if self.summary_tokens else 0)

    @property
    def skipped_span(self) -> tuple[int, int]:
        """``[start, end)`` offsets of S inside the image's placeholder span."""
        start = self.retained + (1 if self.summary_tokens else 0)
        return start, start + self.skipped

    def skipped_flags(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(total,)`` bool: which of the image's placeholders are skipped (full layout: a span)."""
        if self.in_place:
            raise ValueError("in the in-place layout the selection, not a span, says which tokens are skipped")
        flags = torch.zeros(self.total, dtype=torch.bool, device=device)
        flags[slice(*self.skipped_span)] = True
        return flags


@dataclass(frozen=True)
class VisionFacts:
    """What a model family's vision side allows, for validating a config against a model.

    ``eligible_tokens``: tokens of each image that may be retained (LLaVA-1.5: all V; LLaVA-NeXT: the base image;
    None when it varies with the image size, as for Qwen-VL).
    ``fixed_visual_tokens``: V when every image yields the same count, None when it depends on the image size.
    """

    eligible_tokens: int | None
    fixed_visual_tokens: int | None
    has_cls: bool
    num_layers: int


@dataclass(frozen=True)
class SkipVisionConfig:
    """How visual tokens are split, merged and skipped.

    Each image enters the language model as ``[R, sigma_R, S, sigma_S]`` (``[R, S]`` without summary tokens):
    ``num_retained`` tokens R go through full decoder blocks, ``num_skipped`` tokens S (after merging the skip
    candidates) take part in attention but bypass the post-attention norm and the FFN.

    Args:
        num_retained: N_r, visual tokens that keep full transformer blocks, chosen among the family's eligible
            tokens (LLaVA-1.5: all patches; LLaVA-NeXT/OneVision: the base image). A float in (0, 1] is a fraction
            of each image's eligible tokens (rounded, at least 1), for towers whose token count varies with the
            image size (Qwen-VL). ``None`` keeps every visual token in the family's own layout (exactly the vanilla
            model; needs ``num_skipped=0``).
        num_skipped: N_s, skipped tokens after merging the skip candidates (every visual token not in R). An image
            with fewer candidates than N_s (a small LLaVA-NeXT image) skips all of them, unmerged. ``None``: every
            candidate is skipped, unmerged (the in-place layout's only setting).
        selection: ``"cls_attention"`` keeps the N_r eligible tokens with the largest CLS attention in the vision
            layer used for features (VisionZip "dominant" tokens); ``"grid"`` keeps a regular sub-grid of the
            image's token grid (every 2nd row and column first, then the grid in between; needs no CLS, see
            ``selection.grid_scores``); ``"position"`` keeps the first N_r in raster order. Irrelevant when N_r
            equals the eligible tokens.
        merge: ``"tome"`` merges the candidates down to N_s with one-shot bipartite matching; ``"none"`` needs
            at most N_s candidates; ``"drop"`` removes them (token pruning, for the peer methods; ``num_skipped=0``).
        summary_tokens: add the two attention-pooled summary tokens sigma_R and sigma_S.
        skip_kv_cache: after prefill, remove the skipped tokens' keys/values from the cache.
        skip_layers: decoder layers where S bypasses the FFN; ``None`` means all layers.
        layout: ``"full"`` assembles ``[R, sigma_R, S, sigma_S]`` per image (the processor expands each image to
            that count); ``"inplace"`` leaves every visual token where the HF processor put it, with its own
            position, and only marks the non-retained ones as skipped (no merge, no summary tokens, no processor or
            position change: works on any HF VLM with Llama-style decoder layers).
        llm_drop: ``((layer, keep), ...)``: after decoder layer ``layer`` keep the fraction ``keep`` of each
            sample's visual tokens most attended by its last instruction token, and remove the rest from every
            later layer and its cache (FastV, PyramidDrop; see ``skipvision.llm_drop``). Needs no skipped tokens
            (``skip_layers=()`` or ``num_retained=None``) and ``skip_kv_cache=False``.
        llm_drop_rule: how ``llm_drop`` ranks, counts and places the tokens it keeps: ``"fastv"``, ``"pyramid_drop"``
            (the official PyramidDrop), ``"pyramid_drop_true_positions"`` (a named departure) or ``"sparsevlm"``
            (the official SparseVLM v1.5: text raters, recycled clusters; batch 1, inference only); see
            ``drop_schedule.DROP_RULES``.
        tower_reduction: a peer method's token reduction before the projector (``"visionzip"``, ``"prumerge"``,
            ``"tome"`` ...; see ``skipvision.tower_reduction`` and ``skipvision.peers``): it hands the language model
            ``num_retained + num_skipped`` tokens per image, which all run full blocks and stay cached. Needs
            ``skip_layers=()``, ``skip_kv_cache=False``, no summary tokens and the full layout.
        train_mask: attention in training forwards with labels. ``"causal"`` (the paper's code): every later
            token sees S, the answer included. ``"answer_blind"`` (method.md 3.6 / 7.2): rows from each sample's
            first answer token on do not see S, which is what generated tokens see after Skip KV-cache pruning.
    """

    num_retained: int | float | None
    num_skipped: int | None = None
    selection: str = "cls_attention"
    merge: str = "tome"
    summary_tokens: bool = True
    skip_kv_cache: bool = True
    skip_layers: tuple[int, ...] | None = None
    layout: str = "full"
    llm_drop: tuple[tuple[int, float], ...] = ()
    llm_drop_rule: str = "fastv"
    train_mask: str = "causal"
    tower_reduction: str | None = None

    def __post_init__(self) -> None:
        if self.train_mask not in TRAIN_MASKS:
            raise ValueError(f"unknown train_mask {self.train_mask!r}; choose one of {TRAIN_MASKS}")
        object.__setattr__(self, "llm_drop", check_schedule(self.llm_drop))
        check_rule(self.llm_drop_rule)
        skips = self.num_retained is not None and self.skip_layers != ()
        check_without_skipping(self.llm_drop, skips, self.skip_kv_cache, self.skip_layers)
        if self.tower_reduction is not None:
            self._check_tower_reduction()
        if isinstance(self.num_retained, float):
            if not 0.0 < self.num_retained <= 1.0:
                raise ValueError(
                    f"num_retained as a fraction of each image's tokens must be in (0, 1], got {self.num_retained}"
                )
        elif self.num_retained is not None:
            _check_count("num_retained", self.num_retained)
        if self.num_skipped is not None:
            _check_count("num_skipped", self.num_skipped)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.layout == "inplace":
            if self.num_retained is None:
                raise ValueError("layout='inplace' needs num_retained (an int or a fraction of each image's tokens)")
            wrong = {
                k: v
                for k, v in (
                    ("num_skipped", self.num_skipped),
                    ("merge", self.merge),
                    ("summary_tokens", self.summary_tokens),
                )
                if v != {"num_skipped": None, "merge": "none", "summary_tokens": False}[k]
            }
            if wrong:
                raise ValueError(
                    "layout='inplace' keeps every visual token in place and skips all that are not retained, so it "
                    f"needs num_skipped=None, merge='none' and summary_tokens=False; got {wrong}"
                )
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {tuple(SELECTIONS)}")
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; choose one of {MERGES}")
        if self.merge == "drop" and self.num_skipped != 0:
            raise ValueError(
                f"merge='drop' removes the skip candidates (token pruning), so it needs num_skipped=0; got "
                f"num_skipped={self.num_skipped}"
            )
        for name in ("summary_tokens", "skip_kv_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_retained is None:
            if self.num_skipped is None or self.num_skipped or self.summary_tokens:
                raise ValueError(
                    "num_retained=None keeps every visual token in the model's own layout, so it needs "
                    f"num_skipped=0 and summary_tokens=False (got num_skipped={self.num_skipped}, "
                    f"summary_tokens={self.summary_tokens})"
                )
        elif self.num_retained == 0 and not self.num_skipped and self.num_skipped is not None:
            raise ValueError("num_retained + num_skipped must be at least 1: an image needs some tokens")
        elif self.summary_tokens and (self.num_retained == 0 or self.num_skipped == 0):
            raise ValueError(
                "summary_tokens=True pools over R and over S, so it needs num_retained >= 1 and num_skipped >= 1 "
                f"(got num_retained={self.num_retained}, num_skipped={self.num_skipped})"
            )
        if self.skip_layers is not None:
            object.__setattr__(self, "skip_layers", _checked_layers(self.skip_layers))

    @property
    def native(self) -> bool:
        """True when every visual token is kept in the family's own layout (the vanilla model)."""
        return self.num_retained is None

    @property
    def in_place(self) -> bool:
        """True when the model's own token layout is kept (vanilla or ``layout='inplace'``): nothing is assembled,
        the processor's counts and the model's positions stay HF's."""
        return self.num_retained is None or self.layout == "inplace"

    def retained_count(self, eligible: int) -> int:
        """N_r for an image with ``eligible`` retainable tokens (a fraction is rounded, at least 1)."""
        if self.num_retained is None:
            return eligible
        if isinstance(self.num_retained, float):
            return min(eligible, max(1, round(self.num_retained * eligible)))
        return self.num_retained

    # --- token layout of one image -----------------------------------------------------------------------------
    def image_layout(self, visual_tokens: int, eligible: int | None = None) -> ImageLayout:
        """Layout of an image whose tower + projector yield ``visual_tokens`` tokens (V), ``eligible`` of which
        may be retained (default: all; a fraction ``num_retained`` is a fraction of these).

        The skip candidates are the ``V - N_r`` tokens not retained; they are merged down to N_s, or all skipped
        unmerged when there are no more than N_s. An image with no candidates is its retained tokens alone.
        """
        if self.num_retained is None:
            return ImageLayout(visual_tokens, 0, False, native=True)
        retained = self.retained_count(visual_tokens if eligible is None else eligible)
        candidates = visual_tokens - retained
        if candidates < 0:
            raise ValueError(f"num_retained ({retained}) is larger than the {visual_tokens} visual tokens of an image")
        if self.layout == "inplace":
            return ImageLayout(retained, candidates, False, in_place=True)
        skipped = candidates if self.num_skipped is None else min(self.num_skipped, candidates)
        return ImageLayout(retained, skipped, self.summary_tokens and skipped > 0)

    def full_layout(self) -> ImageLayout:
        """Layout of an image with at least N_s skip candidates (every image of a fixed-size tower)."""
        if self.num_retained is None or isinstance(self.num_retained, float) or self.num_skipped is None:
            raise ValueError(
                "the per-image token count depends on the image's visual tokens V for this config "
                f"(num_retained={self.num_retained}, num_skipped={self.num_skipped}); use config.image_layout(V)"
            )
        return self.image_layout(self.num_retained + self.num_skipped)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens of an image with at least N_s skip candidates."""
        return self.full_layout().total

    @property
    def skipped_span(self) -> tuple[int, int]:
        """``[start, end)`` offsets of S inside the span of an image with at least N_s candidates."""
        return self.full_layout().skipped_span

    def check_against(self, facts: VisionFacts) -> None:
        """Raise ``ValueError`` if this config cannot run on a model with these properties."""
        if self.tower_reduction is not None:
            self._check_reduction_against(facts)
        elif self.num_retained is not None:
            eligible = facts.eligible_tokens
            fraction = isinstance(self.num_retained, float)
            if eligible is not None and not fraction and self.num_retained > eligible:
                where = "" if facts.fixed_visual_tokens else " (the base image's tokens)"
                raise ValueError(
                    f"num_retained ({self.num_retained}) is larger than the {eligible} tokens the "
                    f"model can retain per image{where}"
                )
            fixed = facts.fixed_visual_tokens
            retained = self.retained_count(eligible) if eligible is not None else None
            if fixed is not None and self.num_skipped is not None and self.layout == "full":
                if retained + self.num_skipped > fixed:
                    raise ValueError(
                        f"num_retained ({retained}) + num_skipped ({self.num_skipped}) is larger than the "
                        f"{fixed} visual tokens the vision tower produces"
                    )
                candidates = fixed - retained
                if self.merge == "none" and candidates != self.num_skipped:
                    raise ValueError(
                        f"merge='none' needs num_skipped == the {candidates} skip candidates "
                        f"({fixed} visual tokens - {retained} retained); got num_skipped={self.num_skipped}. "
                        "Use merge='tome' to merge the candidates down to num_skipped, or num_skipped=None."
                    )
            if self.num_skipped == 0 and self.merge != "drop":
                if fixed is None:
                    raise ValueError(
                        "num_skipped=0 leaves no room for the skip candidates (the tiles' tokens always are some); "
                        "use num_retained=None to keep every visual token, or num_skipped >= 1"
                    )
                if self.merge == "tome" and retained < fixed:
                    raise ValueError(
                        f"merge='tome' cannot merge {fixed - retained} skip candidates into num_skipped=0 "
                        f"tokens; set num_retained={fixed} to keep every token, or num_skipped >= 1"
                    )
            strategy = selection_strategy(self.selection)
            ranks = eligible is None or fraction and self.num_retained < 1.0 or retained < eligible
            if strategy.needs_cls and not facts.has_cls and ranks:
                raise ValueError(
                    f"selection={self.selection!r} needs a vision tower with a CLS token whose features drop it "
                    "(CLIP with vision_feature_select_strategy='default' and one feature layer); use "
                    "selection='grid' (a regular sub-grid of each image) for towers without CLS such as SigLIP "
                    "or Qwen-VL's"
                )
        if self.skip_layers and max(self.skip_layers) >= facts.num_layers:
            raise ValueError(
                f"skip_layers {list(self.skip_layers)} out of range: the language model has {facts.num_layers} "
                f"layers (valid indices 0..{facts.num_layers - 1})"
            )
        check_schedule(self.llm_drop, facts.num_layers)

    def _check_reduction_against(self, facts: VisionFacts) -> None:
        reduction = tower_reduction(self.tower_reduction)
        if reduction.needs_cls and not facts.has_cls:
            raise ValueError(
                f"tower_reduction={self.tower_reduction!r} reads the vision tower's CLS token, and this model's tower "
                "has none (or its features keep it): the method does not apply to this model"
            )
        fixed = facts.fixed_visual_tokens
        if fixed is not None and self.num_retained + self.num_skipped > fixed:
            raise ValueError(
                f"tower_reduction={self.tower_reduction!r} keeps num_retained + num_skipped = "
                f"{self.num_retained + self.num_skipped} tokens, more than the {fixed} the tower produces"
            )

    def _check_tower_reduction(self) -> None:
        if not isinstance(self.tower_reduction, str):
            raise ValueError(f"tower_reduction must be a method name, got {self.tower_reduction!r}")
        counts = [self.num_retained, self.num_skipped]
        if (
            any(isinstance(n, bool) or not isinstance(n, int) for n in counts)
            or self.num_retained + self.num_skipped < 1
        ):
            raise ValueError(
                f"tower_reduction={self.tower_reduction!r} hands the language model num_retained + num_skipped tokens "
                f"per image: give both as counts, got num_retained={self.num_retained}, num_skipped={self.num_skipped}"
            )
        wrong = {
            "skip_layers": (self.skip_layers, ()),
            "skip_kv_cache": (self.skip_kv_cache, False),
            "summary_tokens": (self.summary_tokens, False),
            "layout": (self.layout, "full"),
            "llm_drop": (self.llm_drop, ()),
        }
        wrong = {name: value for name, (value, needed) in wrong.items() if value != needed}
        if wrong:
            raise ValueError(
                f"tower_reduction={self.tower_reduction!r}: every token it keeps runs full blocks and stays cached, "
                "so it needs skip_layers=(), skip_kv_cache=False, summary_tokens=False, layout='full' and no "
                f"llm_drop; got {wrong}"
            )

    # --- serialisation (stored as ``config.skip_vision`` in config.json) ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.skip_layers is not None:
            data["skip_layers"] = list(self.skip_layers)
        data["llm_drop"] = [list(stage) for stage in self.llm_drop]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipVisionConfig:
        if not isinstance(data, dict):
            raise ValueError(f"skip_vision settings must be a dict of SkipVisionConfig options, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SkipVisionConfig option(s) {unknown}; known options are {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("skip_layers"), list):
            data["skip_layers"] = tuple(data["skip_layers"])
        return cls(**data)

    @classmethod
    def coerce(cls, value: SkipVisionConfig | dict[str, Any]) -> SkipVisionConfig:
        """A config from a config or its dict form (as stored in config.json)."""
        return value if isinstance(value, cls) else cls.from_dict(value)


def _checked_layers(skip_layers: Any) -> tuple[int, ...]:
    """``skip_layers`` as sorted layer indices, checked."""
    if isinstance(skip_layers, (int, str)) or not hasattr(skip_layers, "__iter__"):
        raise ValueError(f"skip_layers must be a list of layer indices or None, got {skip_layers!r}")
    layers = tuple(skip_layers)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ValueError(f"skip_layers must be non-negative layer indices, got {skip_layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"skip_layers has duplicates: {skip_layers!r}")
    return tuple(sorted(layers))


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def num_image_tokens(config: SkipVisionConfig) -> int:
    """Placeholder tokens per image: ``N_r + N_s + 2`` (``N_r + N_s`` without summaries), for an image with at
    least N_s skip candidates; ``config.image_layout(V).total`` gives the count of any image."""
    return config.num_image_tokens


def in_place_config(num_retained: int | float, selection: str = "grid", **options: Any) -> SkipVisionConfig:
    """The in-place layout retaining ``num_retained`` tokens of each image (every other visual token skipped where it
    is): ``layout="inplace"`` with the settings it needs (no merge, no summary tokens, ``num_skipped=None``)."""
    return SkipVisionConfig(num_retained, None, selection, "none", summary_tokens=False, layout="inplace", **options)


def vanilla_config() -> SkipVisionConfig:
    """The config that is exactly the vanilla model: every token retained in the model's own layout."""
    return SkipVisionConfig(
        num_retained=None,
        num_skipped=0,
        selection="position",
        merge="none",
        summary_tokens=False,
        skip_kv_cache=False,
    )
