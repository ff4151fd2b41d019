"""LoRA fine-tuning through PEFT (optional extra ``skipvision[lora]``), the usual LLaVA recipe.

LoRA adapters go on the language model's linear projections only (never the vision tower or the projector); the
projector and the summary scorer are trained in full (PEFT ``modules_to_save``), as LLaVA's LoRA scripts do for
the projector. The Skip-Vision model stays the PEFT base model, so Skip-FFN and Skip KV-cache run unchanged: PEFT
swaps the ``Linear`` modules inside each decoder layer, not the layer, whose Skip-FFN class is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

#: the language model's attention and FFN projections in Llama/Qwen2-style decoder layers
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: modules trained in full next to the adapters (when the model has them)
FULLY_TRAINED = ("multi_modal_projector", "summary_scorer")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not all(re.fullmatch(r"\w+", t) for t in self.targets):
            raise ValueError(f"LoRA targets must be module names such as q_proj; got {self.targets!r}")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs PEFT: pip install 'skipvision[lora]'") from None
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings) -> Any:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA on the language model's ``settings.targets``."""
    from .api import family_of

    peft = _peft()
    modules = dict(model.named_modules())
    layers = family_of(model).decoder_layers(model)
    layer_path = next((name for name, module in modules.items() if module is layers), None)
    if layer_path is None:
        raise ValueError("the decoder layers are not a submodule of the model")
    pattern = rf"{re.escape(layer_path)}\.\d+\..*\b({'|'.join(settings.targets)})"
    if not any(re.fullmatch(pattern, name) for name in modules):
        raise ValueError(
            f"no LoRA target among the language model's layers ({layer_path}.N...) is named one of {settings.targets}"
        )
    present = {name.rsplit(".", 1)[-1] for name in modules}
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        modules_to_save=[name for name in FULLY_TRAINED if name in present],
        bias="none",
    )
    return peft.get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The Skip-Vision model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def load_adapter_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a saved adapter (and its fully trained modules) into ``model``, insisting on every key."""
    peft = _peft()
    from safetensors.torch import load_file

    state = load_file(f"{checkpoint}/adapter_model.safetensors")
    result = peft.set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"{checkpoint}: adapter weights do not fit the model: {unexpected[:5]}")
