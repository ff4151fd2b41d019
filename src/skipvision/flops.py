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

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + int(self.cls)


@dataclass(frozen=True)
class ModelShape:
    text: TextShape
    vision: VisionShape
    visual_tokens: int  # V: tokens per image entering the LLM before Skip-Vision
    towers_per_image: int = 1  # ViT passes per image (LLaVA-HD: thumbnail + tiles)


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


def vision_flops(shape: ModelShape, images: int = 1) -> dict[str, int]:
    v, d = shape.vision, shape.text.hidden
    passes = images * shape.towers_per_image
    t = v.tokens
    patches = (v.image_size // v.patch) ** 2
    layer = 2 * t * 4 * v.hidden * v.hidden + 4 * v.hidden * t * t + 2 * t * 2 * v.hidden * v.intermediate
    return {
        "tower": passes * (v.layers * layer + 2 * patches * 3 * v.patch * v.patch * v.hidden),
        "projector": images * 2 * shape.visual_tokens * (v.hidden * d + d * d),
    }


def skip_vision_overhead(shape: ModelShape, cfg: SkipVisionConfig, images: int = 1) -> int:
    """Matmul FLOPs Skip-Vision adds before the LLM: CLS scoring, merge similarity, summary scorer."""
    v, d = shape.vision, shape.text.hidden
    total = 0
    if cfg.selection == "cls_attention":
        total += 2 * v.hidden * v.hidden + 2 * v.tokens * v.hidden * v.hidden + 2 * v.tokens * v.hidden
    candidates = cfg.num_candidates(shape.visual_tokens)
    if cfg.merge == "tome" and candidates > cfg.num_skipped:
        total += 2 * candidates * candidates * d
    if cfg.summary_tokens:
        total += 2 * (cfg.num_retained + cfg.num_skipped) * d
    return images * total


@dataclass(frozen=True)
class SequenceCounts:
    """Token counts of one sequence in attention order: ``text`` tokens plus per-image groups."""

    text: int
    images: int
    full_per_image: int  # tokens per image that run full blocks (R + summaries, or all V)
    skipped_per_image: int  # S

    @property
    def attention_length(self) -> int:
        return self.text + self.images * (self.full_per_image + self.skipped_per_image)

    @property
    def ffn_length(self) -> int:
        return self.text + self.images * self.full_per_image


def sequence_counts(shape: ModelShape, text_tokens: int, images: int, cfg: SkipVisionConfig | None) -> SequenceCounts:
    if cfg is None:
        return SequenceCounts(text_tokens, images, shape.visual_tokens, 0)
    full = cfg.num_retained + (2 if cfg.summary_tokens else 0)
    return SequenceCounts(text_tokens, images, full, cfg.num_skipped)


def language_flops(
    shape: ModelShape,
    counts: SequenceCounts,
    logits: int = 1,
    causal: bool = True,
    skip_layers: tuple[int, ...] | None = None,
) -> dict[str, int]:
    """Forward FLOPs of the decoder stack + LM head for one sequence (prefill: ``logits=1``)."""
    text = shape.text
    total = {"projections": 0, "attention": 0, "ffn": 0}
    for index in range(text.layers):
        skips = skip_layers is None or index in skip_layers
        n_ffn = counts.ffn_length if skips else counts.attention_length
        for key, value in decoder_layer_flops(text, counts.attention_length, n_ffn, causal).items():
            total[key] += value
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
    counts = sequence_counts(shape, text_tokens, images, cfg)
    prefill = language_flops(shape, counts, logits=1, skip_layers=cfg.skip_layers if cfg else None)
    train = language_flops(shape, counts, logits=counts.ffn_length, skip_layers=cfg.skip_layers if cfg else None)
    pruned = cfg is not None and cfg.skip_kv_cache
    context = counts.attention_length - (images * counts.skipped_per_image if pruned else 0)
    decode = sum(decode_step_flops(shape, context + t) for t in range(new_tokens))
    vision = vision_flops(shape, images)
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


@dataclass(frozen=True)
class Preset:
    shape: ModelShape
    skip_vision: SkipVisionConfig
    paper_ratios: dict[tuple[int, int], float]  # the paper's FLOPs column (method.md 6.2) by (N_r, N_s)
    note: str

    def paper_ratio(self, cfg: SkipVisionConfig) -> float | None:
        return self.paper_ratios.get((cfg.num_retained, cfg.num_skipped))


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(
        ModelShape(VICUNA_7B, CLIP_L_336, visual_tokens=576),
        SkipVisionConfig(num_retained=64, num_skipped=156),
        {},
        "LLaVA-1.5-7B comparison setting (N_r=64, N_s=156); the paper prints no FLOPs for it",
    ),
    "llava-llama3-8b": Preset(
        ModelShape(LLAMA3_8B, CLIP_L_336, visual_tokens=576),
        SkipVisionConfig(num_retained=100, num_skipped=156),
        {(100, 156): 0.25, (256, 320): 0.60},
        "SV-LLaVA (N_r=100, N_s=156); --num-retained 256 --num-skipped 320 gives the 60% row",
    ),
    "llava-hd-llama3-8b": Preset(
        ModelShape(LLAMA3_8B, CLIP_L_336, visual_tokens=576 * 5, towers_per_image=5),
        SkipVisionConfig(num_retained=576, num_skipped=576),
        {(576, 576): 0.50},
        "SV-LLaVA-HD with the maximum 4 tiles (thumbnail + 4 x 576 tile tokens merged to 576); the paper's 50% "
        "needs a baseline of about 1.4 tiles on average, which the paper does not state (method.md section 4)",
    ),
    "cos-llama3-8b": Preset(
        ModelShape(LLAMA3_8B, replace(CLIP_L_448), visual_tokens=1296),
        SkipVisionConfig(num_retained=272, num_skipped=256),
        {(272, 256): 0.25},
        "SV-CoS: 16 global + 256 mid-level retained, 1024 fine tokens merged to 256; vision FLOPs count the "
        "CLIP-L/448 tower only (the Chain-of-Sight resampler is not modelled)",
    ),
}


def shape_of(config: Any) -> ModelShape:
    """ModelShape of an HF ``LlavaConfig`` (CLIP/SigLIP tower + Llama-family text model)."""
    from .llava import num_visual_tokens

    t, v = config.text_config, config.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    text = TextShape(
        t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
        t.num_key_value_heads, head_dim, t.vocab_size,
    )
    vision = VisionShape(
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.image_size, v.patch_size,
        cls=v.model_type == "clip_vision_model",
    )
    return ModelShape(text, vision, visual_tokens=num_visual_tokens(config))


def as_dict(shape: ModelShape) -> dict[str, Any]:
    return asdict(shape)


_CPU_SDPA_REGISTERED = False


def _register_cpu_sdpa_formulas() -> None:
    """torch's flop counter knows only the CUDA SDPA kernels; count the CPU flash kernel the same way."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    import torch
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # shapes: the registry passes shapes

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    _CPU_SDPA_REGISTERED = True


def measured_flops(fn) -> tuple[int, dict[str, int]]:
    """FLOPs that ``torch.utils.flop_counter`` counts while ``fn()`` runs: (total, per module)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formulas()
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module
