"""Analytic FLOPs of a LLaVA-style model with and without Skip-Vision.

Convention: one multiply-add = 2 FLOPs (as ``torch.utils.flop_counter``). Per decoder layer, for ``n_attn`` tokens
in attention of which ``n_ffn`` run the FFN (method.md section 4):

* projections  ``2 * n_attn * (d*q + 2*d*kv + q*d)``    with ``q = heads*head_dim``, ``kv = kv_heads*head_dim``
* attention core ``4 * q * pairs``                       QK^T and AV; ``pairs`` = query-key pairs attended
* SwiGLU FFN   ``6 * n_ffn * d * m``                     skipped tokens excluded
* LM head      ``2 * n_logits * d * vocab``

Causal attention counts ``n(n+1)/2`` pairs; ``causal=False`` counts ``n^2`` pairs, which is what
``FlopCounterMode`` reports (it ignores the mask). A training step is forward + backward = 3x the forward of what
is trained (backward computes input and weight gradients, 2x). The vision tower and projector are reported apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .config import SkipVisionConfig
from .drop_schedule import visual_per_layer
from .selection import selection_strategy
from .tower_reduction import tower_reduction


@dataclass(frozen=True)
class TextShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower (+ CLS when ``cls``) at ``image_size``/``patch`` and a 2-layer MLP projector to the LLM width."""

    hidden: int
    intermediate: int
    layers: int
    image_size: int
    patch: int
    cls: bool = True
    feature_layers: int = 1  # hidden states concatenated into the projector (list-valued vision_feature_layer)
    patch_count: int | None = None  # patches of a non-square input (dynamic resolution); None: side**2
    merge: int = 1  # Qwen-VL's patch merger: merge x merge patches -> one token (an MLP on their concatenation)
    temporal_patch: int = 1  # frames per patch (Qwen-VL embeds still images as 2 identical frames)
    gated_mlp: bool = False  # SwiGLU MLP (three matrices; Qwen2.5-VL's tower) instead of two
    heads: int = 16  # attention heads (a tower reduction's per-head key means)

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls)

    @property
    def side(self) -> int:
        """Patches along one side of the (square) input."""
        return self.image_size // self.patch

    @property
    def patches(self) -> int:
        return self.side**2 if self.patch_count is None else self.patch_count


@dataclass(frozen=True)
class ModelShape:
    text: TextShape
    vision: VisionShape
    visual_tokens: int  # V: tokens per image that Skip-Vision splits (newlines excluded)
    towers_per_image: int = 1  # ViT passes per image (LLaVA-HD: thumbnail + tiles)
    eligible_tokens: int | None = None  # tokens that may be retained (the base image); None = all V
    newline_tokens: int = 0  # row separators the vanilla model adds (LLaVA-NeXT image_newline)

    @property
    def native_tokens(self) -> int:
        """Tokens per image of the vanilla model."""
        return self.visual_tokens + self.newline_tokens

    @property
    def eligible(self) -> int:
        return self.visual_tokens if self.eligible_tokens is None else self.eligible_tokens


def _attention_pairs(n: int, causal: bool, context: int = 0) -> int:
    """Query-key pairs for ``n`` new queries after ``context`` cached keys."""
    return n * context + (n * (n + 1) // 2 if causal else n * n)


def decoder_layer_flops(
    text: TextShape, n_attn: int, n_ffn: int, causal: bool = True, context: int = 0
) -> dict[str, int]:
    q, kv, d = text.heads * text.head_dim, text.kv_heads * text.head_dim, text.hidden
    return {
        "projections": 2 * n_attn * (d * q + 2 * d * kv + q * d),
        "attention": 4 * q * _attention_pairs(n_attn, causal, context),
        "ffn": 6 * n_ffn * d * text.intermediate,
    }


def tower_pass_flops(v: VisionShape) -> int:
    """One ViT pass: patch embedding plus every layer (projections, attention over all tokens, MLP)."""
    t = v.tokens
    mlp_matrices = 3 if v.gated_mlp else 2
    layer = 2 * t * 4 * v.hidden * v.hidden + 4 * v.hidden * t * t + 2 * t * mlp_matrices * v.hidden * v.intermediate
    return v.layers * layer + 2 * v.patches * 3 * v.temporal_patch * v.patch * v.patch * v.hidden


def projector_flops(v: VisionShape, text_hidden: int, tokens: int) -> int:
    """The 2-layer MLP projector over ``tokens`` visual tokens (Qwen-VL's merger: over the concatenation of
    merge x merge patches, its first layer as wide as its input)."""
    if v.merge > 1:
        wide = v.hidden * v.merge**2
        return 2 * tokens * (wide * wide + wide * text_hidden)
    return 2 * tokens * (v.hidden * v.feature_layers * text_hidden + text_hidden * text_hidden)


def vision_flops(shape: ModelShape, images: int = 1, cfg: SkipVisionConfig | None = None) -> dict[str, int]:
    """Tower and projector FLOPs; a tower reduction before the projector projects only the tokens it keeps (the
    tower itself is counted whole: ToMe's shrinking tower is not modelled, an upper bound)."""
    passes = images * shape.towers_per_image
    projected = shape.visual_tokens
    if cfg is not None and cfg.tower_reduction is not None and not tower_reduction(cfg.tower_reduction).after_projector:
        projected = cfg.num_image_tokens
    return {
        "tower": passes * tower_pass_flops(shape.vision),
        "projector": images * projector_flops(shape.vision, shape.text.hidden, projected),
    }


def skip_vision_overhead(shape: ModelShape, cfg: SkipVisionConfig, images: int = 1) -> int:
    """Matmul FLOPs Skip-Vision adds before the LLM: CLS scoring, merge similarity, summary scorer."""
    if cfg.native:
        return 0
    if cfg.in_place:
        return 0  # grid or position selection, nothing merged or pooled
    v, d = shape.vision, shape.text.hidden
    if cfg.tower_reduction is not None:  # a peer method's own matmuls
        return images * tower_reduction(cfg.tower_reduction).overhead_flops(v.hidden, v.tokens, v.heads, cfg)
    layout = cfg.image_layout(shape.visual_tokens, shape.eligible)
    total = 0
    if layout.retained < shape.eligible:  # the selection ranks the base pass's tokens
        # CLS attention is scored in each feature layer (their mean ranks the tokens)
        total += v.feature_layers * selection_strategy(cfg.selection).overhead_flops(v.hidden, v.tokens)
    candidates = shape.visual_tokens - layout.retained
    if cfg.merge == "tome" and candidates > layout.skipped:
        total += 2 * candidates * candidates * d
    if layout.summary_tokens:
        total += 2 * (layout.retained + layout.skipped) * d
    return images * total


@dataclass(frozen=True)
class SequenceCounts:
    """Token counts of one sequence in attention order: ``text`` tokens plus per-image groups."""

    text: int
    images: int
    full_per_image: int  # tokens per image that run full blocks (R + summaries, or all V)
    skipped_per_image: int  # S

    @property
    def image_tokens(self) -> int:
        """Every image placeholder of the sequence (what in-LLM dropping ranks)."""
        return self.images * (self.full_per_image + self.skipped_per_image)

    @property
    def attention_length(self) -> int:
        return self.text + self.image_tokens

    @property
    def ffn_length(self) -> int:
        return self.text + self.images * self.full_per_image


def sequence_counts(shape: ModelShape, text_tokens: int, images: int, cfg: SkipVisionConfig | None) -> SequenceCounts:
    if cfg is None or cfg.native:
        return SequenceCounts(text_tokens, images, shape.native_tokens, 0)
    layout = cfg.image_layout(shape.visual_tokens, shape.eligible)
    return SequenceCounts(text_tokens, images, layout.total - layout.skipped, layout.skipped)


def language_flops(
    shape: ModelShape,
    counts: SequenceCounts,
    logits: int = 1,
    causal: bool = True,
    skip_layers: tuple[int, ...] | None = None,
    llm_drop: tuple[tuple[int, float], ...] = (),
    llm_drop_rule: str = "fastv",
) -> dict[str, int]:
    """Forward FLOPs of the decoder stack + LM head for one sequence (prefill: ``logits=1``).

    ``llm_drop`` (FastV, PyramidDrop): each layer runs without the visual tokens dropped before it, and each drop
    costs the ranking (the query token's projection, the layer's keys again, one row of scores)."""
    text = shape.text
    total = {"projections": 0, "attention": 0, "ffn": 0}
    visual = counts.image_tokens
    present = visual_per_layer(visual, llm_drop, text.layers, llm_drop_rule)
    stages = dict(llm_drop)
    q, kv, d = text.heads * text.head_dim, text.kv_heads * text.head_dim, text.hidden
    if llm_drop:
        total["drop_ranking"] = 0
    for index in range(text.layers):
        skips = skip_layers is None or index in skip_layers
        dropped = visual - present[index]
        n_attn = counts.attention_length - dropped
        n_ffn = (counts.ffn_length if skips else counts.attention_length) - dropped
        for key, value in decoder_layer_flops(text, n_attn, n_ffn, causal).items():
            total[key] += value
        if index in stages:
            total["drop_ranking"] += 2 * n_attn * d * kv + 2 * d * q + 2 * q * n_attn
    total["lm_head"] = 2 * logits * text.hidden * text.vocab
    return total


def decode_step_flops(shape: ModelShape, context: int) -> int:
    """One generated token attending to ``context`` cached entries (plus itself)."""
    text = shape.text
    per_layer = sum(decoder_layer_flops(text, 1, 1, causal=True, context=context).values())
    return text.layers * per_layer + 2 * text.hidden * text.vocab


def kv_cache_bytes(shape: ModelShape, entries: int, bytes_per_value: int = 2) -> int:
    """Keys + values of ``entries`` positions in every layer."""
    return 2 * shape.text.layers * entries * shape.text.kv_heads * shape.text.head_dim * bytes_per_value


def report(
    shape: ModelShape, cfg: SkipVisionConfig | None, text_tokens: int = 0, images: int = 1, new_tokens: int = 0
) -> dict[str, Any]:
    """FLOPs of prefill, decode and a training step for one sequence; ``cfg=None`` is vanilla."""
    for name, value in (("text_tokens", text_tokens), ("images", images), ("new_tokens", new_tokens)):
        if value < 0:
            raise ValueError(f"{name} must be at least 0, got {value!r}")
    counts = sequence_counts(shape, text_tokens, images, cfg)
    skip_layers, drop = (cfg.skip_layers, cfg.llm_drop) if cfg else (None, ())
    options = {"skip_layers": skip_layers, "llm_drop": drop, "llm_drop_rule": cfg.llm_drop_rule if cfg else "fastv"}
    prefill = language_flops(shape, counts, logits=1, **options)
    # training scores every position (in-LLM dropping scatters the sequence back before the LM head)
    logits = counts.attention_length if drop else counts.ffn_length
    train = language_flops(shape, counts, logits=logits, **options)
    pruned = cfg is not None and cfg.skip_kv_cache
    context = counts.attention_length - (images * counts.skipped_per_image if pruned else 0)
    if drop:  # each layer caches what it saw; attention cost is linear in the context, so the mean is exact
        visual = counts.image_tokens
        present = visual_per_layer(visual, drop, shape.text.layers, options["llm_drop_rule"])
        context -= visual - sum(present) / shape.text.layers
    decode = sum(decode_step_flops(shape, context + t) for t in range(new_tokens))
    vision = vision_flops(shape, images, cfg)
    if cfg is not None:
        vision["skip_vision_overhead"] = skip_vision_overhead(shape, cfg, images)
    return {
        "attention_length": counts.attention_length,
        "ffn_length": counts.ffn_length,
        "prefill": prefill,
        "prefill_total": sum(prefill.values()),
        "decode_total": decode,
        "train_step_total": 3 * sum(train.values()),
        "vision": vision,
        "kv_cache_entries_after_prefill": context,
    }


def compare(
    shape: ModelShape, cfg: SkipVisionConfig, text_tokens: int = 0, images: int = 1, new_tokens: int = 0
) -> dict[str, Any]:
    """Vanilla vs Skip-Vision. ``ratio`` is the language-model prefill FLOPs ratio (the paper's FLOPs column)."""
    vanilla = report(shape, None, text_tokens, images, new_tokens)
    skip = report(shape, cfg, text_tokens, images, new_tokens)
    return {
        "vanilla_flops": vanilla["prefill_total"],
        "skip_vision_flops": skip["prefill_total"],
        "ratio": skip["prefill_total"] / vanilla["prefill_total"],
        "train_ratio": skip["train_step_total"] / vanilla["train_step_total"],
        "generate_ratio": (skip["prefill_total"] + skip["decode_total"])
        / (vanilla["prefill_total"] + vanilla["decode_total"]),
        "vanilla": vanilla,
        "skip_vision": skip,
        "text_tokens": text_tokens,
        "images": images,
        "new_tokens": new_tokens,
        "config": cfg.to_dict(),
    }


# --- shapes of the paper's models (no weights needed) -------------------------------------------------------------
DEFAULT_TEXT_TOKENS = 16  # prompt text around the image when the paper states none (method.md section 4)
CLIP_L_336 = VisionShape(hidden=1024, intermediate=4096, layers=24, image_size=336, patch=14)
CLIP_L_448 = VisionShape(hidden=1024, intermediate=4096, layers=24, image_size=448, patch=14)
VICUNA_7B = TextShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000)
LLAMA3_8B = TextShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
QWEN2_7B = TextShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064)


def qwen2_5_vl_7b(side: int) -> ModelShape:
    """Qwen2.5-VL-7B with one ``side`` x ``side`` px image (a multiple of 28: ``(side / 28)**2`` tokens)."""
    grid = side // 28
    vision = VisionShape(
        1280, 3420, 32, 0, 14, cls=False, patch_count=4 * grid * grid, merge=2, temporal_patch=2, gated_mlp=True
    )
    return ModelShape(QWEN2_7B, vision, visual_tokens=grid * grid)


def anyres_shape(text: TextShape, vision: VisionShape, tiles: int, newlines: bool) -> ModelShape:
    """A thumbnail + ``tiles`` full tiles of ``vision.image_size`` (nothing unpadded); ``newlines``: HF LLaVA-NeXT
    adds one token per row of the tile grid (most square grid of ``tiles``)."""
    base, side = vision.patches, vision.side
    rows = max(r for r in range(1, tiles + 1) if tiles % r == 0 and r * r <= tiles) if tiles else 0
    return ModelShape(
        text,
        vision,
        visual_tokens=base * (1 + tiles),
        towers_per_image=1 + tiles,
        eligible_tokens=base,
        newline_tokens=side * rows if newlines else 0,
    )


@dataclass(frozen=True)
class PaperShape:
    shape: ModelShape
    skip_vision: SkipVisionConfig
    paper_ratios: dict[tuple[int, int], float]  # the paper's FLOPs column (method.md 6.2) by (N_r, N_s)
    note: str
    anyres_newlines: bool | None = None  # None: no tiles; else the shape follows --tiles (with or without newlines)

    def paper_ratio(self, cfg: SkipVisionConfig) -> float | None:
        return self.paper_ratios.get((cfg.num_retained, cfg.num_skipped))

    def shape_for(self, tiles: int | None) -> ModelShape:
        if tiles is None:
            return self.shape
        if self.anyres_newlines is None:
            raise ValueError("this preset has no tiles; --tiles applies to the HD / LLaVA-NeXT presets")
        return anyres_shape(self.shape.text, self.shape.vision, tiles, self.anyres_newlines)


PAPER_SHAPES: dict[str, PaperShape] = {
    **{
        f"qwen2.5-vl-7b-{side}": PaperShape(
            qwen2_5_vl_7b(side),
            SkipVisionConfig(0.25, (side // 28) ** 2 // 4, selection="grid"),
            {},
            f"Qwen2.5-VL-7B geometry, one {side}x{side} image ({(side // 28) ** 2} tokens): R = a quarter (every 2nd "
            "row and column), the rest merged to a quarter; --layout inplace skips the other three quarters in place",
        )
        for side in (448, 896, 1344)
    },
    "llava-1.5-7b": PaperShape(
        ModelShape(VICUNA_7B, CLIP_L_336, visual_tokens=576),
        SkipVisionConfig(num_retained=64, num_skipped=156),
        {},
        "LLaVA-1.5-7B comparison setting (N_r=64, N_s=156); the paper prints no FLOPs for it",
    ),
    "llava-llama3-8b": PaperShape(
        ModelShape(LLAMA3_8B, CLIP_L_336, visual_tokens=576),
        SkipVisionConfig(num_retained=100, num_skipped=156),
        {(100, 156): 0.25, (256, 320): 0.60},
        "SV-LLaVA (N_r=100, N_s=156); --num-retained 256 --num-skipped 320 gives the 60% row",
    ),
    "llava-hd-llama3-8b": PaperShape(
        anyres_shape(LLAMA3_8B, CLIP_L_336, tiles=4, newlines=False),
        SkipVisionConfig(num_retained=576, num_skipped=576),
        {(576, 576): 0.50},
        "SV-LLaVA-HD with the maximum 4 tiles (thumbnail + 4 x 576 tile tokens merged to 576); the paper's 50% "
        "needs a baseline of about 1.4 tiles on average, which the paper does not state (method.md section 4)",
        anyres_newlines=False,
    ),
    "llava-next-llama3-8b": PaperShape(
        anyres_shape(LLAMA3_8B, CLIP_L_336, tiles=4, newlines=True),
        SkipVisionConfig(num_retained=576, num_skipped=576),
        {},
        "HF LLaVA-NeXT geometry (CLIP-L/336 thumbnail + tiles, one image_newline per grid row in the vanilla model, "
        "dropped by Skip-Vision) with LLaMA-3-8B; R = the thumbnail, tiles merged to 576",
        anyres_newlines=True,
    ),
    "cos-llama3-8b": PaperShape(
        ModelShape(LLAMA3_8B, replace(CLIP_L_448), visual_tokens=1296),
        SkipVisionConfig(num_retained=272, num_skipped=256),
        {(272, 256): 0.25},
        "SV-CoS: 16 global + 256 mid-level retained, 1024 fine tokens merged to 256; vision FLOPs count the "
        "CLIP-L/448 tower only (the Chain-of-Sight resampler is not modelled)",
    ),
}


def as_dict(shape: ModelShape) -> dict[str, Any]:
    return asdict(shape)
