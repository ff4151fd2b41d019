"""Skip-FFN: skipped tokens get the attention residual only, no post-attention norm and no FFN (method.md 3.5).

A decoder layer's class is swapped for a subclass (as ToMe does), so the state dict and every checkpoint stay
unchanged. The subclass runs the FFN on a gathered subset of rows and adds the result back, so the FFN really
runs on fewer rows: FLOPs and time drop with the number of skipped tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .mixing import mix_into

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
        mix_into(layer, SkipFFNLayerMixin)
        layer.skip_ffn = index in chosen


def ffn_rows(skipped: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Flat row indices of ``skipped (batch, seq)`` that are *not* skipped, i.e. that run the FFN. With their
    ``count`` known on the host, the indices come without the host waiting for the device (``nonzero_static``)."""
    keep = (~skipped).flatten()
    if count is None:
        return keep.nonzero().squeeze(1)
    return torch.nonzero_static(keep, size=count).squeeze(1)
