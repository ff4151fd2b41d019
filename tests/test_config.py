"""``SkipVisionConfig``: validation, serialisation, layouts and the in-place settings (``config.py``)."""

from __future__ import annotations

import pytest

import skipvision
from skipvision import ImageLayout, SkipVisionConfig, num_image_tokens
from skipvision.config import VisionFacts


def test_config_validation_and_round_trip():
    cfg = SkipVisionConfig(num_retained=100, num_skipped=156, skip_layers=[3, 1])
    assert cfg.skip_layers == (1, 3)
    assert num_image_tokens(cfg) == 258 and cfg.skipped_span == (101, 257)
    assert SkipVisionConfig.from_dict(cfg.to_dict()) == cfg
    plain = SkipVisionConfig(num_retained=4, num_skipped=6, summary_tokens=False)
    assert num_image_tokens(plain) == 10 and plain.skipped_span == (4, 10)
    bad = [
        (dict(num_retained=-1, num_skipped=3), "num_retained must be a non-negative int"),
        (dict(num_retained=2, num_skipped=3, selection="diagonal"), "unknown selection"),
        (dict(num_retained=2, num_skipped=3, merge="avg"), "unknown merge"),
        (dict(num_retained=2, num_skipped=0), "summary_tokens=True pools over R and over S"),
        (dict(num_retained=2, num_skipped=3, skip_layers=(1, 1)), "duplicates"),
        (dict(num_retained=2, num_skipped=3, skip_layers=(-1,)), "non-negative layer indices"),
        (dict(num_retained=0, num_skipped=0, summary_tokens=False), "at least 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            SkipVisionConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown SkipVisionConfig option"):
        SkipVisionConfig.from_dict({"num_retained": 1, "num_skipped": 1, "ratio": 2})
    with pytest.raises(ValueError, match="larger than the 576 visual tokens"):
        SkipVisionConfig(num_retained=500, num_skipped=100).check_against(VisionFacts(576, 576, True, 32))
    # a variable-size (anyres) family: N_r is bounded by the base image, N_s by nothing
    SkipVisionConfig(num_retained=576, num_skipped=2000).check_against(VisionFacts(576, None, True, 32))
    with pytest.raises(ValueError, match="larger than the 576 tokens the model can retain per image"):
        SkipVisionConfig(num_retained=600, num_skipped=10).check_against(VisionFacts(576, None, True, 32))
    with pytest.raises(ValueError, match="num_retained=None keeps every visual token"):
        SkipVisionConfig(num_retained=None, num_skipped=3)
    with pytest.raises(ValueError, match="skip_layers must be a list"):
        SkipVisionConfig(num_retained=2, num_skipped=3, skip_layers=3)


def test_image_layout_per_image_count():
    cfg = SkipVisionConfig(num_retained=4, num_skipped=6)
    assert cfg.image_layout(20) == ImageLayout(4, 6, True)  # 16 candidates merged to 6
    assert cfg.image_layout(8) == ImageLayout(4, 4, True)  # 4 candidates, fewer than N_s: all skipped, unmerged
    assert cfg.image_layout(4) == ImageLayout(4, 0, False)  # nothing to skip: R alone, no summaries
    assert cfg.image_layout(20).total == 12 and cfg.image_layout(8).skipped_span == (5, 9)
    native = skipvision.vanilla_config().image_layout(37)
    assert native.native and native.total == 37 and native.skipped == 0


def test_in_place_and_fractional_configs():
    cfg = SkipVisionConfig(0.25, layout="inplace", merge="none", summary_tokens=False, selection="grid")
    layout = cfg.image_layout(36)
    assert (layout.retained, layout.skipped, layout.total, layout.in_place) == (9, 27, 36, True)
    assert SkipVisionConfig(0.25, 4, selection="grid").image_layout(32).total == 8 + 4 + 2
    assert SkipVisionConfig(0.01, 4).retained_count(10) == 1  # a fraction keeps at least one token
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        SkipVisionConfig(1.5, 4)
    with pytest.raises(ValueError, match="layout='inplace'"):
        SkipVisionConfig(0.25, 4, layout="inplace")  # merge / summary / num_skipped of the full layout
    with pytest.raises(ValueError, match="unknown layout"):
        SkipVisionConfig(0.25, 4, layout="sideways")
    with pytest.raises(ValueError, match="full_layout|depends on the image"):
        SkipVisionConfig(0.25, 4).full_layout()
    round_trip = SkipVisionConfig.from_dict(cfg.to_dict())
    assert round_trip == cfg


def test_in_place_config_is_the_valid_in_place_setting():
    cfg = skipvision.in_place_config(0.25)
    assert cfg == SkipVisionConfig(0.25, None, "grid", "none", summary_tokens=False, layout="inplace")
    assert skipvision.in_place_config(9, "random", skip_kv_cache=False).skip_kv_cache is False
