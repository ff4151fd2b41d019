"""Per-sample bookkeeping that travels with a cache's batch rows (Skip KV-cache pruning, in-LLM dropping): beam
reordering, batch selection and expansion move it with the rows."""

from __future__ import annotations

from typing import Protocol

import torch

from .mixing import unmix


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
        unmix(self, type(self).__bases__[0])
