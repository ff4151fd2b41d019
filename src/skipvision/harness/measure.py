"""FLOPs of real batches: measured by torch's flop counter (:func:`measured_flops`) and the analytic model
applied to a batch's actual token counts (:func:`batch_flops`). The analytic model itself is ``skipvision.flops``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..api import family_of
from ..flops import SequenceCounts, language_flops, skip_vision_overhead

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


def batch_flops(model: Any, inputs: dict[str, Any], train_tower: bool = False) -> dict[str, Any]:
    """Analytic FLOPs of one real batch on a Skip-Vision model (any family), from the actual token counts.

    Per sample, the attention length is its non-pad tokens and the FFN length excludes its skipped tokens, as the
    model's own ``embed_multimodal`` marks them; the tower runs once per pass (anyres: base + tiles). Returns
    ``prefill`` (language model with one logit, tower and projector forward, Skip-Vision overhead; the language
    model's share and its parts, as :func:`language_flops` names them, apart) and ``train``
    (3x the language model with every logit, 3x projector and summary scorer, tower forward only unless
    ``train_tower``).
    """
    import torch

    family = family_of(model)
    cfg = model.skip_vision_config
    shape = family.model_shape(model.config)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    image_inputs = {k: inputs[k] for k in family.image_input_names if k in inputs}
    pixel_values = inputs.get("pixel_values")
    images = family.num_images(pixel_values, image_inputs)
    with torch.no_grad():
        if images:
            skipped = model.skipped_mask(ids, pixel_values, **image_inputs)
        else:
            skipped = torch.zeros_like(ids, dtype=torch.bool)
    prefill_lm, train_lm = 0, 0
    prefill_parts: dict[str, int] = {}
    visual = model.image_placeholder_mask(ids) & mask.bool() if cfg.llm_drop else torch.zeros_like(skipped)
    for b in range(ids.shape[0]):
        n_attn = int(mask[b].sum())
        n_skip = int(skipped[b].sum())
        if cfg.llm_drop:  # every token runs full blocks until dropped (llm_drop allows no skipping)
            n_visual = int(visual[b].sum())
            counts = SequenceCounts(n_attn - n_visual, 1, n_visual, 0)
        else:
            counts = SequenceCounts(n_attn - n_skip, 1, 0, n_skip)
        options = {"skip_layers": cfg.skip_layers, "llm_drop": cfg.llm_drop, "llm_drop_rule": cfg.llm_drop_rule}
        parts = language_flops(shape, counts, logits=1, **options)
        prefill_lm += sum(parts.values())
        for key, value in parts.items():
            prefill_parts[key] = prefill_parts.get(key, 0) + value
        train_lm += 3 * sum(language_flops(shape, counts, logits=n_attn, **options).values())
    passes = family.tower_passes(model.config, images, image_inputs)
    tower, projector = family.tower_flops(model.config, images, image_inputs) if images else (0, 0)
    overhead = 0
    if images and not cfg.in_place:
        with torch.no_grad():
            tokens = family.image_tokens(model, pixel_values, image_inputs, cfg)
        overhead = sum(
            skip_vision_overhead(replace(shape, visual_tokens=t.tokens.shape[0], eligible_tokens=t.eligible), cfg)
            for t in tokens
        )
    return {
        "prefill": float(prefill_lm + tower + projector + overhead),
        "prefill_language_model": float(prefill_lm),
        "prefill_language_model_parts": {key: float(value) for key, value in prefill_parts.items()},
        "train": float(train_lm + (3 if train_tower else 1) * tower + 3 * projector + 3 * overhead),
        "tower": float(tower),
        "tower_passes": passes,
    }
