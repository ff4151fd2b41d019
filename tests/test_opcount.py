"""Deterministic launch and wait counts (``skipvision.harness.opcount``): what an eager GPU forward pays per op and per
host sync, counted on the CPU. Skip-Vision's prefill may add at most 6 ops per decoder layer plus 120 and 2 host
syncs to vanilla's; a decode step at most 10 ops and no host sync (vanilla's decode step has HF's one, its SDPA mask
check); the vanilla variant is the Skip-Vision class with the vanilla config, as in ``skipvision bench``."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, images, pair, processor

import skipvision
from skipvision.harness.opcount import count_model_ops, count_ops
from skipvision.skip_kv import prune_skipped_kv

TEXTS = [" what color is it?", "a b", " is the shape on the left", " compare"]
NAMES = [
    "llava",
    "llava-inplace",
    "llava-next",
    "llava-onevision",
    "qwen2.5-vl",
    "qwen2.5-vl-inplace",
    "qwen3-vl",
    "qwen3-vl-inplace",
]


def uniform_batch(name: str, cfg, model_config) -> dict:
    """A left-padded batch of 4 samples with one image of the same size each (the bench's batches)."""
    proc = processor(name, cfg, model_config)
    marker = skipvision.family_of(model_config).image_prompt(proc, model_config)
    size = FAMILIES[name][2][0]
    return dict(proc(text=[marker + t for t in TEXTS], images=images([size] * 4), padding=True, return_tensors="pt"))


@pytest.fixture(scope="module", params=NAMES)
def counts(request):
    name = request.param
    vanilla, model = pair(name)
    native = skipvision.convert(copy.deepcopy(vanilla), skipvision.vanilla_config())
    layers = model.config.get_text_config().num_hidden_layers
    base = count_model_ops(native, uniform_batch(name, None, model.config))
    skip = count_model_ops(model, uniform_batch(name, model.skip_vision_config, model.config))
    return name, layers, base, skip


def test_prefill_adds_at_most_6_ops_per_layer_plus_120_and_2_syncs(counts):
    name, layers, base, skip = counts
    assert skip["prefill"]["ops"] <= base["prefill"]["ops"] + 6 * layers + 120, (name, base, skip)
    assert skip["prefill"]["syncs"] <= base["prefill"]["syncs"] + 2, (name, base, skip)


def test_decode_step_adds_at_most_10_ops_and_no_sync(counts):
    name, _, base, skip = counts
    assert skip["decode"]["ops"] <= base["decode"]["ops"] + 10, (name, base, skip)
    assert skip["decode"]["syncs"] <= base["decode"]["syncs"] <= 1, (name, base, skip)


def test_training_step_adds_at_most_the_prefill_allowance(counts):
    name, layers, base, skip = counts
    # forward and backward: Skip-FFN's gather/scatter per layer, each with its backward
    assert skip["train"]["ops"] <= base["train"]["ops"] + 12 * layers + 240, (name, base, skip)
    assert skip["train"]["syncs"] <= base["train"]["syncs"] + 2, (name, base, skip)


def test_pruning_costs_a_gather_per_tensor_and_layer():
    """Skip KV-cache pruning: one gather per keys/values tensor and layer, plus one masked fill where samples keep
    different counts; no host sync when the kept counts are known (the model reads them once per prefill)."""
    from transformers import DynamicCache

    layers = 3
    for equal in (True, False):
        cache = DynamicCache()
        keys = torch.randn(2, 2, 10, 16)
        for layer in range(layers):
            cache.update(keys, keys.clone(), layer)
        dropped = torch.zeros(2, 10, dtype=torch.bool)
        dropped[:, 2:5] = True
        if not equal:
            dropped[1, 7] = True
        kept = (~dropped).sum(1).tolist()
        with count_ops() as pruning:
            prune_skipped_kv(cache, dropped, kept)
        per_layer = 2 if equal else 4
        assert pruning.syncs == 0
        assert pruning.by_op["aten::gather"] == 2 * layers
        assert pruning.ops <= per_layer * layers + 12, pruning.by_op


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_whole_decode_iteration_waits_no_more_than_vanilla(cache):
    """One iteration of HF's decode loop (mask building, input preparation, the forward, token choice), measured
    as ``generate`` of 4 tokens minus ``generate`` of 3: a pruned static cache's length is a device tensor, so
    nothing may read it on the host per step."""
    vanilla, model = pair("llava")
    native = skipvision.convert(copy.deepcopy(vanilla), skipvision.vanilla_config())

    def per_step(m, cfg):
        inputs = uniform_batch("llava", cfg, m.config)
        runs = []
        for n in (3, 4):
            with torch.no_grad(), count_ops() as counts:
                m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache)
            runs.append(counts)
        return runs[1].ops - runs[0].ops, runs[1].syncs - runs[0].syncs

    base_ops, base_syncs = per_step(native, None)
    ops, syncs = per_step(model, model.skip_vision_config)
    assert syncs <= base_syncs and ops <= base_ops + 10, ((ops, syncs), (base_ops, base_syncs))
