"""Skip KV-cache: physically remove the skipped tokens' keys/values after prefill (method.md 3.8, 7.3).

Positions are not renumbered: decoding continues at the true position L + t. The cache is compacted per sample,
so the 2-D attention mask that ``generate`` keeps growing in full coordinates must be compacted the same way;
:class:`SkipKVState` (attached to the cache) does that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

STATE_ATTR = "skip_vision_state"


@dataclass
class SkipKVState:
    """Bookkeeping of one pruned cache.

    ``kept_index[b, k]`` is the prompt column held in compacted slot ``k`` of sample ``b``. Samples that lost fewer
    tokens than others (fewer images, text-only) fill the tail with invalid slots, which are zeroed and masked.
    """

    prompt_length: int
    kept_index: torch.Tensor  # (batch, K) long
    slot_valid: torch.Tensor  # (batch, K) bool
    all_slots_valid: bool  # computed once, so decode steps need no device sync

    @property
    def num_slots(self) -> int:
        return self.kept_index.shape[1]

    def full_length(self, cache_length: int, query_length: int) -> int:
        """Length of the attention mask in full (unpruned) coordinates."""
        return self.prompt_length + (cache_length - self.num_slots) + query_length

    def compact_attention_mask(
        self, attention_mask: torch.Tensor | None, cache_length: int, query_length: int
    ) -> torch.Tensor | None:
        """Map a 2-D mask over the full sequence (prompt + tokens since; None = all ones) to the cache's columns.

        Masks are always read in full coordinates, as ``generate`` keeps them: the compacted length can equal the
        full one (when the widest sample lost nothing), so the length alone cannot tell the two apart.
        """
        full = self.full_length(cache_length, query_length)
        if attention_mask is None:
            if self.all_slots_valid:
                return None
            attention_mask = torch.ones(self.kept_index.shape[0], full, dtype=torch.long, device=self.kept_index.device)
        if attention_mask.ndim != 2:
            return attention_mask  # a 4-D mask is the caller's own, already in cache coordinates
        if attention_mask.shape[1] != full:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; after Skip KV-cache pruning it must cover "
                f"the full sequence, {full} columns (prompt + generated tokens, pruned positions included)"
            )
        prompt = attention_mask[:, : self.prompt_length].gather(1, self.kept_index)
        prompt = prompt * self.slot_valid.to(prompt.dtype)
        return torch.cat([prompt, attention_mask[:, self.prompt_length :]], dim=1)

    def positions(self, attention_mask: torch.Tensor | None, cache_length: int, query_length: int) -> torch.Tensor:
        """True position ids of the next ``query_length`` tokens, from a full-coordinate mask (or none)."""
        full = self.full_length(cache_length, query_length)
        if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] == full:
            return (attention_mask.long().cumsum(-1) - 1)[:, -query_length:].clamp_min(0)
        start = full - query_length
        arange = torch.arange(start, full, device=self.kept_index.device)
        return arange.unsqueeze(0).expand(self.kept_index.shape[0], -1)


def skip_kv_state(cache: Cache | None) -> SkipKVState | None:
    """The pruning state of ``cache``, or None if it was never pruned."""
    return getattr(cache, STATE_ATTR, None)


def prune_skipped_kv(cache: Cache, skipped: torch.Tensor) -> SkipKVState:
    """Remove the columns marked in ``skipped (batch, L)`` from every layer of ``cache``, in place.

    Kept entries are copied bitwise (post-RoPE keys), in their original order. The cache keeps the width of the
    row with the most kept entries. The model also marks left-padding columns, which no query reads, so a short
    prompt batched with a long one does not widen the cache.
    """
    if skip_kv_state(cache) is not None:
        raise ValueError("this cache was already pruned by Skip KV-cache; prefill a new cache for new images")
    batch, length = skipped.shape
    keep = ~skipped
    counts = keep.sum(dim=1)
    num_slots = int(counts.max())
    # kept columns first, in original order; the tail of shorter rows points at skipped columns (masked, zeroed)
    order = (skipped.long() * length + torch.arange(length, device=skipped.device)).argsort(dim=1)
    kept_index = order[:, :num_slots]
    slot_valid = torch.arange(num_slots, device=skipped.device).unsqueeze(0) < counts.unsqueeze(1)
    for layer_idx, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"Skip KV-cache prunes DynamicCache layers; layer {layer_idx} is {type(layer).__name__}. "
                "Use the default dynamic cache or set skip_kv_cache=False."
            )
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if layer.keys.shape[-2] != length:
            raise ValueError(
                f"cache layer {layer_idx} holds {layer.keys.shape[-2]} positions but the prompt has {length}; "
                "Skip KV-cache pruning runs right after the prefill of an empty cache"
            )
        heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
        index = kept_index[:, None, :, None].expand(batch, heads, num_slots, dim)
        valid = slot_valid[:, None, :, None]
        # torch.where, not a multiply: a skipped entry may hold NaN/inf and must not leak into invalid slots
        layer.keys = torch.where(valid, layer.keys.gather(2, index), 0)
        layer.values = torch.where(valid, layer.values.gather(2, index), 0)
    state = SkipKVState(length, kept_index, slot_valid, all_slots_valid=bool(slot_valid.all()))
    setattr(cache, STATE_ATTR, state)
    return state
