"""PyramidDrop (Xing et al., 2024): the language model is cut into ``stages`` equal stages; at the end of each
stage but the last, the visual tokens are reduced by ``ratio`` (lambda), ranked by the attention of the last
instruction token in the stage's last layer. Used in training and in inference, as in the paper.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SkipVisionConfig, vanilla_config


def stage_ends(num_layers: int, stages: int) -> list[int]:
    """The last layer of each stage but the final one (32 layers, 4 stages: 7, 15, 23)."""
    if not 2 <= stages <= num_layers:
        raise ValueError(f"PyramidDrop needs 2 <= stages <= the {num_layers} layers, got stages={stages}")
    return [round(num_layers * (s + 1) / stages) - 1 for s in range(stages - 1)]


def pyramid_drop(ratio: float, num_layers: int, stages: int = 4) -> SkipVisionConfig:
    """Visual tokens times ``ratio`` at each of the ``stages - 1`` stage ends of a ``num_layers``-layer model."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"PyramidDrop's ratio must be in (0, 1], got {ratio!r}")
    schedule = tuple((end, ratio ** (i + 1)) for i, end in enumerate(stage_ends(num_layers, stages)))
    return replace(vanilla_config(), llm_drop=schedule)
