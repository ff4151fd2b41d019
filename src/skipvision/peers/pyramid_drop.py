"""PyramidDrop (Xing et al., 2024), as its official code does it (Cooperx521/PyramidDrop,
``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward`` and ``pdrop_rank_drop``):
the language model is cut into ``stages`` equal stages (32 layers, 4 stages: ``layer_list = [8, 16, 24]``); between
the last layer of a stage and the first of the next, the visual tokens are reduced to ``int(N * ratio**s)`` of the
original N, ranked by the attention that the next stage's first layer (its input norm and q/k, on the stage's output)
gives them from the last instruction token (in training: the mean over the token before every answer of a multi-turn
record), averaged over heads; kept tokens keep their order, and the positions are renumbered after each drop (decoding
continues each stage's positions from its own prompt length). Used in training and in inference, as in the paper.

Additions, each reducing to the official behaviour at batch 1: batches with left padding (padding leaves at the first
drop, as the official code removes it), grouped-query attention (keys repeated per head, as the attention layer does;
the official product needs as many key/value heads as query heads), and a KV cache whose later layers hold only the
tokens they saw (as the official ``DynamicCache`` does).

Departure, named and never the default: ``positions="true"`` keeps every token's true position instead of renumbering
(``llm_drop_rule="pyramid_drop_true_positions"``); M-RoPE families (Qwen-VL) need it, since the official code has no
rule for 3-D positions. Notes on the official code: docs/peers/pyramid_drop.md.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SkipVisionConfig, vanilla_config

POSITIONS = {"renumbered": "pyramid_drop", "true": "pyramid_drop_true_positions"}


def stage_ends(num_layers: int, stages: int) -> list[int]:
    """The last layer of each stage but the final one (32 layers, 4 stages: 7, 15, 23)."""
    if not 2 <= stages <= num_layers:
        raise ValueError(f"PyramidDrop needs 2 <= stages <= the {num_layers} layers, got stages={stages}")
    return [round(num_layers * (s + 1) / stages) - 1 for s in range(stages - 1)]


def pyramid_drop(ratio: float, num_layers: int, stages: int = 4, positions: str = "renumbered") -> SkipVisionConfig:
    """Visual tokens ``int(N * ratio**s)`` after stage ``s`` of a ``num_layers``-layer model cut into ``stages``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"PyramidDrop's ratio must be in (0, 1], got {ratio!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {tuple(POSITIONS)}, got {positions!r}")
    schedule = tuple((end, ratio ** (i + 1)) for i, end in enumerate(stage_ends(num_layers, stages)))
    return replace(vanilla_config(), llm_drop=schedule, llm_drop_rule=POSITIONS[positions])
