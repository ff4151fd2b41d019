"""FastV (Chen et al., 2024): before decoder layer ``layer`` (K), the visual tokens least attended by the last
instruction token in layer K-1 leave the sequence; the kept fraction runs the remaining layers and keeps its true
positions. Inference-only in the paper; here it also trains (the ranking is not differentiated).

This is the official code's llava-hf KV-cache variant (pkunlp-icler/FastV; notes in docs/peers/fastv.md): ranked once
in the prefill by layer K-1's attention (last prompt token's row, head mean), ``round(N * keep)`` tokens kept in
their order with their true positions, and the cache of layers >= K holds only the kept tokens, so decoding reads
fewer keys too. The official in-place variant instead has no cache and re-ranks at every step; it is not offered.
The attention is recomputed for the one query token from layer K-1's projections (no eager attention needed).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SkipVisionConfig, vanilla_config


def fastv(keep: float, layer: int = 2) -> SkipVisionConfig:
    """Keep the fraction ``keep`` of each sample's visual tokens from decoder layer ``layer`` (K >= 1) on."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"FastV drops before a layer K >= 1 (it ranks by layer K-1's attention), got layer={layer!r}")
    return replace(vanilla_config(), llm_drop=((layer - 1, keep),))
