"""Which tokens are retained (``selection.py``, ``sequence.in_place_flags``)."""

from __future__ import annotations

import torch

from skipvision import SkipVisionConfig


def test_grid_selection_keeps_a_regular_sub_grid():
    from skipvision.selection import grid_scores

    keep = grid_scores((1, 4, 8)).topk(8).indices.sort().values
    rows, cols = keep // 8, keep % 8
    assert set(rows.tolist()) == {0, 2} and set(cols.tolist()) == {0, 2, 4, 6}  # every 2nd row and column
    keep16 = grid_scores((1, 8, 8)).topk(4).indices.sort().values
    assert keep16.tolist() == [0, 4, 32, 36]  # a sixteenth: every 4th row and column
    video = grid_scores((2, 4, 4))
    assert torch.equal(video[:16], video[16:])  # each frame the same pattern


def test_in_place_flags_follow_the_selection():
    from skipvision.selection import random_scores
    from skipvision.sequence import in_place_flags

    def kept(selection, grid):
        cfg = SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection=selection)
        return (~in_place_flags([32], [grid], cfg, "cpu")).nonzero().squeeze(1).tolist()

    assert kept("grid", (1, 4, 8)) == [0, 2, 4, 6, 16, 18, 20, 22]
    assert kept("random", (1, 4, 8)) == random_scores(32).topk(8).indices.sort().values.tolist()
    assert kept("position", None) == list(range(8))
