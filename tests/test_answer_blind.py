"""The answer-blind training mask (train_mask="answer_blind"): a teacher-forced training forward computes, for the
answer rows, exactly what cached decoding under Skip KV-cache computes (the answer never sees S)."""

from __future__ import annotations

import pytest
import torch
from conftest import pair, prompts

import skipvision
from skipvision.skip_kv import skip_kv_state

CFG = skipvision.SkipVisionConfig(8, 8, train_mask="answer_blind")
ANSWER = 3


def test_training_logits_equal_cached_decoding_under_skip_kv():
    _, model = pair(CFG)
    model.double()
    ids, mask, pixels = prompts([1, 2], CFG, [3, 1], [4, 5])
    pixels = pixels.double()
    labels = ids.clone()
    labels[:, :-ANSWER] = -100
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    model.train()
    train_logits = model(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, position_ids=positions
    ).logits
    model.eval()
    with torch.no_grad():
        prompt = model(
            input_ids=ids[:, :-ANSWER],
            attention_mask=mask[:, :-ANSWER],
            pixel_values=pixels,
            position_ids=positions[:, :-ANSWER],
            use_cache=True,
        )
        assert skip_kv_state(prompt.past_key_values) is not None
        answer = model(
            input_ids=ids[:, -ANSWER:],
            attention_mask=mask,
            past_key_values=prompt.past_key_values,
            use_cache=True,
        )
    assert (train_logits[:, -ANSWER - 1] - prompt.logits[:, -1]).abs().max() <= 1e-9
    assert (train_logits[:, -ANSWER:] - answer.logits).abs().max() <= 1e-9
    # the canonical causal mask lets the answer see S: different logits
    _, causal = pair(skipvision.SkipVisionConfig(8, 8))
    causal.double().train()
    seen = causal(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, position_ids=positions)
    seen = seen.logits
    assert (seen[:, -ANSWER:] - answer.logits).abs().max() > 1e-4


def test_unknown_train_mask_is_refused():
    with pytest.raises(ValueError, match="unknown train_mask"):
        skipvision.SkipVisionConfig(8, 8, train_mask="blind")
