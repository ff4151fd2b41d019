"""Skip KV-cache: physically remove the skipped tokens' keys/values after prefill (method.md 3.8, 7.3).

Positions are not renumbered: decoding continues at the true position L + t. The cache is compacted per sample,
so the 2-D attention mask that ``generate`` keeps growing in full coordinates must be compacted the same way;
:class:`SkipKVState` (attached to the cache) does that.

A pruned cache keeps speaking full coordinates to ``generate``: ``get_seq_length()`` is the number of tokens seen
(prompt + generated), as for an unpruned cache, so HF's input slicing on cache continuation (multi-turn chat),
assisted decoding's ``crop`` arithmetic and beam reordering work unchanged, while the attention mask is built from
the slots the cache really holds (``get_query_offset``). Dynamic and static caches can both be pruned; a static
one is compacted into its first slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .cache_rows import RowStateCacheMixin
from .masks import compact_prompt_columns, compact_slots
from .mixing import mix_into

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
    def batch_size(self) -> int:
        return self.kept_index.shape[0]

    @property
    def num_slots(self) -> int:
        return self.kept_index.shape[1]

    def select_rows(self, rows: torch.Tensor) -> SkipKVState:
        """The state of a cache whose batch rows were reindexed by ``rows`` (beam reordering, expansion)."""
        rows = rows.to(self.kept_index.device)
        return replace(self, kept_index=self.kept_index[rows], slot_valid=self.slot_valid[rows])

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
        if attention_mask is None:
            if self.all_slots_valid:
                return None
            full = self.full_length(cache_length, query_length)
            attention_mask = torch.ones(self.kept_index.shape[0], full, dtype=torch.long, device=self.kept_index.device)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
            # a 4-D mask (or HF's per-layer-type dict of them) is the caller's own, already in cache coordinates
            return attention_mask
        # checked where the length is a host number only: a static cache's is a device tensor, which a compiled step
        # must not branch on and an eager one would wait for
        if not torch.compiler.is_compiling() and not isinstance(cache_length, torch.Tensor):
            full = self.full_length(cache_length, query_length)
            if attention_mask.shape[1] != full:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns; after Skip KV-cache pruning it must "
                    f"cover the full sequence, {full} columns (prompt + generated tokens, pruned positions included)"
                )
        return compact_prompt_columns(attention_mask, self.prompt_length, self.kept_index, self.slot_valid)

    def without_trailing_prompt(self, count: int) -> CroppedPrompt:
        """The state after removing the prompt's last ``count`` columns, and the slots each sample keeps.

        Every sample holds those columns as its last valid slots (they are text: assisted decoding's drafts), else
        a pruned key would be needed and ``ValueError`` says so. A sample's valid slots before them stay in place;
        its invalid tail (a sample that lost more tokens than the widest) moves up behind them.
        """
        length = self.prompt_length
        counts = self.slot_valid.sum(dim=1, keepdim=True)
        tail = counts - count + torch.arange(count, device=counts.device)
        columns = torch.arange(length - count, length, device=counts.device)
        if count > length or not bool(((tail >= 0) & (self.kept_index.gather(1, tail.clamp_min(0)) == columns)).all()):
            raise ValueError(
                f"cannot crop {count} prompt token(s) from a Skip KV-cache: the pruned prompt no longer holds them in "
                "every sample (its skipped keys are gone), so prefill a new cache to change the prompt"
            )
        slots = torch.arange(self.num_slots - count, device=counts.device).unsqueeze(0)
        source = slots + count * (slots >= counts - count)
        state = SkipKVState(
            length - count,
            self.kept_index.gather(1, source),
            self.slot_valid.gather(1, source),
            self.all_slots_valid,
        )
        return CroppedPrompt(state, source)

    def positions(self, attention_mask: torch.Tensor | None, cache_length: int, query_length: int) -> torch.Tensor:
        """True position ids of the next ``query_length`` tokens, from a full-coordinate 2-D mask (or none)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            return (attention_mask.long().cumsum(-1) - 1)[:, -query_length:].clamp_min(0)
        start = self.full_length(cache_length, query_length) - query_length
        arange = torch.arange(query_length, device=self.kept_index.device) + start
        return arange.unsqueeze(0).expand(self.kept_index.shape[0], -1)


@dataclass
class CroppedPrompt:
    """A pruned cache's state after a crop into its prompt, and ``source_slots (batch, K')``: the old slot each new
    slot is copied from."""

    state: SkipKVState
    source_slots: torch.Tensor


class PrunedCacheMixin(RowStateCacheMixin):
    """Mixed into a pruned cache's class: lengths in full coordinates for ``generate``, real slots for masks."""

    state_attr = STATE_ATTR

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state: SkipKVState = getattr(self, STATE_ATTR)
        return state.full_length(super().get_seq_length(layer_idx), query_length=0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        super().reset()
        for layer in self.layers:
            if isinstance(layer, StaticLayer):
                _restore_static_layer(layer)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens seen (a positive value: the length to keep, as older
        transformers pass it). Generated tokens go as in any cache; a crop into the prompt (assisted decoding
        verifies its first drafts in the prefill, so rejected drafts are prompt columns) removes the prompt's
        trailing columns when every sample still holds them, and is refused only where it would need a pruned key.
        """
        state: SkipKVState = getattr(self, STATE_ATTR)
        seen = self.get_seq_length()
        remove = seen - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        generated = seen - state.prompt_length
        from_prompt = remove - generated
        if from_prompt <= 0:
            super().crop(-remove)
            return
        kept = state.without_trailing_prompt(from_prompt)  # raises when a pruned key would be needed
        if generated:
            super().crop(-generated)
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                _keep_slots(layer, kept.source_slots, state.num_slots)
        setattr(self, STATE_ATTR, kept.state)


def _keep_slots(layer: DynamicLayer | StaticLayer, source: torch.Tensor, num_slots: int) -> None:
    """Rebuild a layer's first ``num_slots`` (pruned prompt) slots as ``source (batch, K')``'s picks of them."""
    width = source.shape[1]
    for name in ("keys", "values"):
        stored = getattr(layer, name)
        batch, heads, _, dim = stored.shape
        picked = stored[:, :, :num_slots].gather(2, source[:, None, :, None].expand(batch, heads, width, dim))
        if isinstance(layer, StaticLayer):  # a static cache keeps its tensors' addresses
            stored[:, :, :width].copy_(picked)
            stored[:, :, width:num_slots].zero_()
        else:
            setattr(layer, name, picked)
    if isinstance(layer, StaticLayer):
        layer.cumulative_length.fill_(width)


def _shrink_static_layer(layer: StaticLayer, num_slots: int) -> None:
    """Finish resizing a static layer whose keys and values were just replaced by smaller ones."""
    layer.skip_vision_full_max_cache_len = getattr(layer, "skip_vision_full_max_cache_len", layer.max_cache_len)
    layer.max_cache_len = layer.keys.shape[2]
    layer.cumulative_length.fill_(num_slots)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def _restore_static_layer(layer: StaticLayer) -> None:
    """An emptied static layer gets its full size back (allocated at its next prefill), so a reused cache holds the
    next prompt."""
    full = getattr(layer, "skip_vision_full_max_cache_len", None)
    if full is not None:
        layer.max_cache_len = full
        layer.is_initialized = False
        del layer.skip_vision_full_max_cache_len


def cache_slots(cache: Cache, layer_idx: int = 0) -> int:
    """Entries the cache really holds (for a pruned cache, fewer than the tokens seen)."""
    return Cache.get_seq_length(cache, layer_idx)


def skip_kv_state(cache: Cache | None) -> SkipKVState | None:
    """The pruning state of ``cache``, or None if it was never pruned."""
    return getattr(cache, STATE_ATTR, None)


def prune_skipped_kv(cache: Cache, skipped: torch.Tensor, kept_counts: list[int] | None = None) -> SkipKVState:
    """Remove the columns marked in ``skipped (batch, L)`` from every layer of ``cache``, in place.

    Kept entries are copied bitwise (post-RoPE keys), in their original order. The cache keeps the width of the
    row with the most kept entries. The model also marks left-padding columns, which no query reads, so a short
    prompt batched with a long one does not widen the cache. ``kept_counts``: each row's kept columns, when the
    host has them already (the model reads them once per prefill); otherwise they are read here.

    Each layer costs one gather per keys/values tensor, plus one masked fill when rows keep different counts.
    """
    if skip_kv_state(cache) is not None:
        raise ValueError("this cache was already pruned by Skip KV-cache; prefill a new cache for new images")
    batch, length = skipped.shape
    if kept_counts is None:
        kept_counts = (~skipped).sum(dim=1).tolist()
    # kept columns first, in original order; the tail of shorter rows points at skipped columns (masked, zeroed)
    kept_index, slot_valid = compact_slots(~skipped, kept_counts)
    num_slots = kept_index.shape[1]
    all_valid = min(kept_counts) == num_slots
    # rows with fewer kept entries than the widest: their tail slots point at skipped columns, which may hold NaN/inf
    # and must not leak into the masked slots, so they are zeroed (a fill, not a product: NaN * 0 is NaN)
    invalid = None if all_valid else ~slot_valid[:, None, :, None]
    for layer_idx, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, StaticLayer):
            raise NotImplementedError(
                f"Skip KV-cache prunes full-attention dynamic or static cache layers; layer {layer_idx} is "
                f"{type(layer).__name__} (sliding-window, quantized and offloaded layers would lose their own "
                "bookkeeping). Use the default dynamic cache, a static one, or set skip_kv_cache=False."
            )
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if isinstance(layer, DynamicLayer) and layer.keys.shape[-2] != length:
            raise ValueError(
                f"cache layer {layer_idx} holds {layer.keys.shape[-2]} positions but the prompt has {length}; "
                "Skip KV-cache pruning runs right after the prefill of an empty cache"
            )
        for name in ("keys", "values"):
            stored = getattr(layer, name)
            heads, dim = stored.shape[1], stored.shape[-1]
            index = kept_index[:, None, :, None].expand(batch, heads, num_slots, dim)
            kept = stored[:, :, :length].gather(2, index)
            if invalid is not None:
                kept.masked_fill_(invalid, 0)
            if isinstance(layer, StaticLayer):
                # a static cache shrinks to the pruned prompt plus the room left for new tokens, so every compiled
                # decode step reads only what the cache holds; the new tensors get fixed addresses before the
                # first decode step is compiled (the prefill is never compiled)
                room = stored.shape[2] - length
                resized = stored.new_zeros(batch, heads, num_slots + room, dim)
                resized[:, :, :num_slots] = kept
                setattr(layer, name, resized)
            else:
                setattr(layer, name, kept)
        if isinstance(layer, StaticLayer):
            _shrink_static_layer(layer, num_slots)
    state = SkipKVState(length, kept_index, slot_valid, all_slots_valid=all_valid)
    setattr(cache, STATE_ATTR, state)
    mix_into(cache, PrunedCacheMixin)
    return state
