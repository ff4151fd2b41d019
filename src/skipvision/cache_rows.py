"""Per-sample bookkeeping that travels with a cache's batch rows (Skip KV-cache pruning, in-LLM dropping), and the
compaction both use to keep a different number of columns per sample."""

from __future__ import annotations

from typing import Protocol

import torch


class RowState(Protocol):
    @property
    def batch_size(self) -> int: ...

    def select_rows(self, rows: torch.Tensor) -> RowState: ...


class RowStateCacheMixin:
    """Mixed (first) into a cache class that keeps a :class:`RowState` in attribute ``state_attr``: beam
    reordering, batch selection and expansion move it with the cache's rows; ``reset`` drops it and the mixin."""

    state_attr: str

    def _select_state_rows(self, rows: torch.Tensor) -> None:
        setattr(self, self.state_attr, getattr(self, self.state_attr).select_rows(rows))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_state_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_state_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        batch = getattr(self, self.state_attr).batch_size
        self._select_state_rows(torch.arange(batch).repeat_interleave(repeats))

    def reset(self) -> None:
        # an emptied cache (a static cache reused by the next generate) is a plain cache again
        super().reset()
        delattr(self, self.state_attr)
        self.__class__ = self.__class__.__bases__[1]


def compact_slots(keep: torch.Tensor, host_counts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the kept columns of ``keep (batch, L)``: ``(index, valid)``, both ``(batch, K)`` with K the widest
    row's count. Each row lists its kept columns first, in their order; a shorter row's tail points at columns it
    did not keep, marked invalid. ``host_counts``: each row's kept columns, if the host already has them (no wait
    for the device to learn K)."""
    length = keep.shape[1]
    counts = keep.sum(dim=1)
    width = max(host_counts) if host_counts is not None else int(counts.max())
    order = ((~keep).long() * length + torch.arange(length, device=keep.device)).argsort(dim=1)
    valid = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    return order[:, :width], valid
