"""The attention-mask policy of Skip-Vision, in one place: which rows may see the skipped columns in a prefill
(:func:`generated_rows_mask`: drafted tokens in assisted decoding, answers in answer-blind training, from
:func:`answer_start`), and the compaction of a per-sample set of kept columns into slots (:func:`compact_slots`),
which Skip KV-cache pruning and in-LLM dropping use for their caches and masks (:func:`compact_prompt_columns`)."""

from __future__ import annotations

import torch


def answer_start(labels: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: each sample's first supervised position (``labels != -100``); the sequence length where none."""
    positions = torch.arange(labels.shape[1], device=labels.device)
    return torch.where(labels != -100, positions, labels.shape[1]).amin(1)


def generated_rows_mask(
    attention_mask: torch.Tensor | None, skipped: torch.Tensor, first_generated: int | torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive 4-D mask for a prefill whose rows from ``first_generated`` on (an int, or one per sample) are
    generated tokens: causal, no padding columns, and generated rows do not see the skipped columns (what they
    would see after pruning). Also the answer-blind training mask, with each sample's first answer token."""
    batch, length = skipped.shape
    rows = torch.arange(length, device=skipped.device)
    first = torch.as_tensor(first_generated, device=skipped.device).reshape(-1, 1, 1)
    allowed = (rows[:, None] >= rows[None, :]).expand(batch, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed & ~((rows[None, :, None] >= first) & skipped[:, None, :])
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=skipped.device)  # padding rows see themselves
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=skipped.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=skipped.device), blocked)[:, None]


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


def compact_prompt_columns(
    attention_mask: torch.Tensor, prompt_length: int, kept_index: torch.Tensor, slot_valid: torch.Tensor
) -> torch.Tensor:
    """A 2-D mask over the full sequence mapped onto a compacted cache: the prompt's kept columns (``kept_index
    (batch, K)``, invalid slots zeroed), then every column after the prompt as it is."""
    prompt = attention_mask[:, :prompt_length].gather(1, kept_index)
    prompt = prompt * slot_valid.to(prompt.dtype)
    return torch.cat([prompt, attention_mask[:, prompt_length:]], dim=1)
