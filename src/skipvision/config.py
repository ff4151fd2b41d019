"""The one configuration object of Skip-Vision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SELECTIONS = ("cls_attention", "position")
MERGES = ("tome", "none")


@dataclass(frozen=True)
class SkipVisionConfig:
    """How visual tokens are split, merged and skipped.

    Each image enters the language model as ``[R, sigma_R, S, sigma_S]`` (``[R, S]`` without summary tokens):
    ``num_retained`` tokens R go through full decoder blocks, ``num_skipped`` tokens S (after merging the skip
    candidates) take part in attention but bypass the post-attention norm and the FFN.

    Args:
        num_retained: N_r, visual tokens that keep full transformer blocks.
        num_skipped: N_s, skipped tokens after merging the skip candidates.
        selection: ``"cls_attention"`` keeps the N_r patches with the largest CLS attention in the vision layer
            used for features (VisionZip "dominant" tokens); ``"position"`` keeps the first N_r in raster order.
        merge: ``"tome"`` merges the candidates down to N_s with one-shot bipartite matching; ``"none"`` needs
            exactly N_s candidates.
        summary_tokens: add the two attention-pooled summary tokens sigma_R and sigma_S.
        skip_kv_cache: after prefill, remove the skipped tokens' keys/values from the cache.
        skip_layers: decoder layers where S bypasses the FFN; ``None`` means all layers.
    """

    num_retained: int
    num_skipped: int
    selection: str = "cls_attention"
    merge: str = "tome"
    summary_tokens: bool = True
    skip_kv_cache: bool = True
    skip_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_retained", "num_skipped"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {SELECTIONS}")
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; choose one of {MERGES}")
        for name in ("summary_tokens", "skip_kv_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_retained + self.num_skipped == 0:
            raise ValueError("num_retained + num_skipped must be at least 1: an image needs some tokens")
        if self.summary_tokens and (self.num_retained == 0 or self.num_skipped == 0):
            raise ValueError(
                "summary_tokens=True pools over R and over S, so it needs num_retained >= 1 and num_skipped >= 1 "
                f"(got num_retained={self.num_retained}, num_skipped={self.num_skipped})"
            )
        if self.skip_layers is not None:
            layers = tuple(self.skip_layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"skip_layers must be non-negative layer indices, got {self.skip_layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"skip_layers has duplicates: {self.skip_layers!r}")
            object.__setattr__(self, "skip_layers", tuple(sorted(layers)))

    # --- token layout of one image: [R, sigma_R, S, sigma_S] -------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one image occupies in ``input_ids``."""
        return self.num_retained + self.num_skipped + (2 if self.summary_tokens else 0)

    @property
    def skipped_span(self) -> tuple[int, int]:
        """``[start, end)`` offsets of S inside one image's placeholder span."""
        start = self.num_retained + (1 if self.summary_tokens else 0)
        return start, start + self.num_skipped

    def num_candidates(self, num_visual_tokens: int) -> int:
        """Skip candidates before merging, for a tower that yields ``num_visual_tokens`` tokens."""
        return num_visual_tokens - self.num_retained

    def check_against(self, num_visual_tokens: int, num_layers: int, has_cls_token: bool) -> None:
        """Raise ``ValueError`` if this config cannot run on a model with these properties."""
        if self.num_retained + self.num_skipped > num_visual_tokens:
            raise ValueError(
                f"num_retained ({self.num_retained}) + num_skipped ({self.num_skipped}) is larger than the "
                f"{num_visual_tokens} visual tokens the vision tower produces"
            )
        candidates = self.num_candidates(num_visual_tokens)
        if self.merge == "none" and candidates != self.num_skipped:
            raise ValueError(
                f"merge='none' needs num_skipped == the {candidates} skip candidates "
                f"({num_visual_tokens} visual tokens - {self.num_retained} retained); "
                f"got num_skipped={self.num_skipped}. "
                "Use merge='tome' to merge the candidates down to num_skipped."
            )
        if self.merge == "tome" and candidates > 0 and self.num_skipped == 0:
            raise ValueError(
                f"merge='tome' cannot merge {candidates} skip candidates into num_skipped=0 tokens; "
                f"set num_retained={num_visual_tokens} to keep every token, or num_skipped >= 1"
            )
        if self.selection == "cls_attention" and not has_cls_token:
            raise ValueError(
                "selection='cls_attention' needs a vision tower with a CLS token whose features drop it "
                "(CLIP with vision_feature_select_strategy='default'); use selection='position' for towers "
                "without CLS such as SigLIP"
            )
        if self.skip_layers is not None and self.skip_layers and max(self.skip_layers) >= num_layers:
            raise ValueError(
                f"skip_layers {list(self.skip_layers)} out of range: the language model has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1})"
            )

    # --- serialisation (stored as ``config.skip_vision`` in config.json) ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.skip_layers is not None:
            data["skip_layers"] = list(self.skip_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipVisionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SkipVisionConfig option(s) {unknown}; known options are {sorted(known)}")
        data = dict(data)
        if data.get("skip_layers") is not None:
            data["skip_layers"] = tuple(data["skip_layers"])
        return cls(**data)


def num_image_tokens(config: SkipVisionConfig) -> int:
    """Placeholder tokens one image occupies in ``input_ids``: ``N_r + N_s + 2`` (``N_r + N_s`` without summaries)."""
    return config.num_image_tokens


def vanilla_config(num_visual_tokens: int) -> SkipVisionConfig:
    """The Skip-Vision config that is exactly vanilla LLaVA: every token retained, nothing skipped."""
    return SkipVisionConfig(
        num_retained=num_visual_tokens, num_skipped=0, selection="position", merge="none", summary_tokens=False,
        skip_kv_cache=False,
    )
