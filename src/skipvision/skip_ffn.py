"""Skip-FFN: skipped tokens get the attention residual only, no post-attention norm and no FFN (method.md 3.5).

A decoder layer's class is swapped for a subclass (as ToMe does), so the state dict and every checkpoint stay
unchanged. The subclass runs the FFN on a gathered subset of rows and adds the result back, so the FFN really
runs on fewer rows: FLOPs and time drop with the number of skipped tokens.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from . import llm_drop

#: Keyword argument, passed down through the HF decoder stack, holding the flat ``(batch * seq)`` row indices
#: that run the FFN. A forward kwarg (not module state) so gradient checkpointing replays it.
FFN_ROWS_KWARG = "skip_vision_ffn_rows"

#: the parts of a Llama-style (pre-norm attention, then pre-norm FFN) decoder layer
LLAMA_STYLE_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
#: parts that mean another layer formula (Gemma2/3 sandwich norms: post_attention_layernorm normalises the attention
#: output, and the FFN has its own pre/post norms), which the Llama-style Skip-FFN would compute wrongly
SANDWICH_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class SkipFFNLayerMixin:
    """Mixed into a Llama-style decoder layer class (pre-norm attention block, then pre-norm FFN block)."""

    skip_ffn: bool = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # in-LLM dropping (FastV, PyramidDrop): a prefill carries its plan; decode steps read the cache's state
        plan = kwargs.pop(llm_drop.DROP_PLAN_KWARG, None)
        if plan is not None:
            return llm_drop.run_layer(
                self, self.self_attn.layer_idx, self._skip_ffn_forward, hidden_states, kwargs, plan
            )
        cache = kwargs.get("past_key_values")
        state = llm_drop.cache_state(cache)
        if state is not None:
            layer_idx = self.self_attn.layer_idx
            cached = int(cache.layers[layer_idx].get_seq_length()) if layer_idx < len(cache.layers) else 0
            kwargs["attention_mask"] = state.decode_mask(
                layer_idx, kwargs.get("attention_mask"), hidden_states.shape[1], cached
            )
        return self._skip_ffn_forward(hidden_states, *args, **kwargs)

    def _skip_ffn_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ffn_rows = kwargs.pop(FFN_ROWS_KWARG, None)
        if ffn_rows is None or not self.skip_ffn:
            return super().forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("Skip-FFN layers take every argument but hidden_states by keyword")
        residual = hidden_states
        attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + attn_out
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        update = self.mlp(self.post_attention_layernorm(flat.index_select(0, ffn_rows)))
        # in place: the sum above is this layer's own tensor and no backward reads it (autograd would refuse). Under
        # autocast the FFN's output is in the autocast dtype and the residual stream is not: HF's ``residual + mlp``
        # promotes to the stream's dtype, and so does this cast
        return flat.index_add_(0, ffn_rows, update.to(flat.dtype)).view_as(hidden_states)


@cache
def _skip_ffn_class(base: type) -> type:
    return type(base.__name__, (SkipFFNLayerMixin, base), {"__module__": base.__module__})


def enable_skip_ffn(layers: nn.ModuleList, skip_layers: tuple[int, ...] | None) -> None:
    """Swap every layer's class so it accepts :data:`FFN_ROWS_KWARG`; layers in ``skip_layers`` (all if None) skip.

    Every layer is swapped, skipping or not, so the kwarg never reaches a module that does not expect it.
    """
    chosen = set(range(len(layers))) if skip_layers is None else set(skip_layers)
    for index, layer in enumerate(layers):
        missing = [name for name in LLAMA_STYLE_PARTS if not hasattr(layer, name)]
        if missing:
            raise TypeError(f"Skip-FFN needs Llama-style decoder layers; {type(layer).__name__} lacks {missing}")
        extra = [name for name in SANDWICH_PARTS if hasattr(layer, name)]
        if extra:
            raise TypeError(
                f"Skip-FFN needs Llama-style decoder layers; {type(layer).__name__} also has {extra} (sandwich norms: "
                "its post_attention_layernorm normalises the attention output), which the Llama-style skip would "
                "compute wrongly. This family is not supported."
            )
        if not isinstance(layer, SkipFFNLayerMixin):
            layer.__class__ = _skip_ffn_class(type(layer))
        layer.skip_ffn = index in chosen


def ffn_rows(skipped: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Flat row indices of ``skipped (batch, seq)`` that are *not* skipped, i.e. that run the FFN. With their
    ``count`` known on the host, the indices come without the host waiting for the device (``nonzero_static``)."""
    keep = (~skipped).flatten()
    if count is None:
        return keep.nonzero().squeeze(1)
    return torch.nonzero_static(keep, size=count).squeeze(1)
