"""Counts of what a forward launches and where it waits for the device: aten ops and host syncs.

On a GPU an eager forward is host-bound at small batches: every launched op costs host time, and every host sync
(a value read back to Python, a data-dependent output shape) stalls the host until the device has drained its
queue, so the launches of the next ops no longer overlap the kernels before them. Both are deterministic and can
be counted on the CPU, where the same Python code dispatches the same ops, so they can be held in tests without a
GPU (``skipvision bench --count-ops``).

- **ops**: aten ops that launch a kernel: every op that reaches the dispatcher below autograd, except views and
  other metadata-only ops (``view``, ``expand``, ``slice``, ``as_strided``, ...), which launch nothing.
- **syncs**: ops whose result the host must wait for on a GPU: a tensor read back as a Python number or list
  (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``) and ops with a data-dependent output shape (``nonzero``,
  boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``).
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops whose output shape depends on tensor data, or that return a host value: a device sync on a GPU
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::unique_dim",
        "aten::is_nonzero",
        "aten::equal",
    }
)


@dataclass
class OpCounts:
    """What one region launched: ``ops`` (kernel-launching aten ops), ``syncs`` (host syncs) and which ops."""

    ops: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return {"ops": self.ops, "syncs": self.syncs}


#: ops that only make a new view of their input although their schema does not say so
UNANNOTATED_VIEWS = frozenset({"aten::_unsafe_view", "aten::_reshape_alias", "aten::lift_fresh"})


def _launches(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` launches a kernel: not a view (its output aliases an input without writing it)."""
    if func._schema.name in UNANNOTATED_VIEWS:
        return False
    returns = func._schema.returns
    if not returns:
        return True
    alias = returns[0].alias_info
    return alias is None or alias.is_write


class _Counter(TorchDispatchMode):
    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS or _is_sync_call(func, args, kwargs or {}):
            self.counts.syncs += 1
            self.counts.sync_ops[name] += 1
        if _launches(func) and name != "aten::_local_scalar_dense":
            self.counts.ops += 1
            self.counts.by_op[name] += 1
        return func(*args, **(kwargs or {}))


def _is_sync_call(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("aten::index.Tensor", "aten::index_put", "aten::index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    """Count the ops and host syncs of the code run inside the block. ``.cpu()`` and ``.tolist()`` are counted too:
    on the CPU they read memory without the dispatcher, on a GPU each is a copy the host waits for (a ``.tolist()``
    of what ``.cpu()`` returned is not counted again)."""
    counts = OpCounts()
    tolist, cpu = torch.Tensor.tolist, torch.Tensor.cpu

    def counted_tolist(self: torch.Tensor):
        if not getattr(self, "_read_to_host", False):
            counts.syncs += 1
            counts.sync_ops["Tensor.tolist"] += 1
        return tolist(self)

    def counted_cpu(self: torch.Tensor, *args, **kwargs):
        counts.syncs += 1
        counts.sync_ops["Tensor.cpu"] += 1
        out = cpu(self, *args, **kwargs)
        if out is self:  # already on the CPU: mark an alias, not the tensor itself, as the host's copy
            out = self.view_as(self)
        out._read_to_host = True
        return out

    torch.Tensor.tolist, torch.Tensor.cpu = counted_tolist, counted_cpu
    try:
        with _Counter(counts):
            yield counts
    finally:
        torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu


def count_model_ops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool = True) -> dict[str, dict]:
    """Ops and host syncs of a greedy ``generate`` on ``inputs`` (a processor's batch), as HF's loop runs it:
    ``prefill`` is ``generate`` of one token (HF's preparation of positions and masks, the prefill forward, pruning,
    the first token), ``decode`` the model's forward at the second decode step (the cache in its steady state).
    With ``train``, also one training step (forward with labels, backward)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), count_ops() as prefill:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    counted: list[OpCounts] = []
    forward = model.forward

    @functools.wraps(forward)  # generate validates its kwargs against the forward's signature
    def counting_forward(*args, **kwargs):
        with count_ops() as counts:
            out = forward(*args, **kwargs)
        counted.append(counts)
        return out

    model.forward = counting_forward
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        del model.forward
    counts = {"prefill": prefill.as_dict(), "decode": counted[2].as_dict()}
    if train:
        model.train()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        with count_ops() as step:
            model(**inputs, labels=labels, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        counts["train"] = step.as_dict()
    model.train(was_training)
    return counts
