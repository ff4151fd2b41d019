"""ToMe (peers/tome.py) against a reference written from the official code's math (facebookresearch/ToMe @ af95e4b:
``tome/merge.py`` bipartite_soft_matching :18-97, merge_wavg :210-224, merge_source :227-238; ``tome/patch/timm.py``
ToMeBlock :34-56, ToMeAttention :66-96; see docs/peers/tome.md): the CLIP tower run block by block by hand, with
proportional attention, the keys averaged over heads as the metric and the size-weighted merge between the
attention and the MLP; and the post-projector variant's rounds on HF's own projected features."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import pair
from peer_checks import check_cached_decoding, one_image_prompt, reference_logits

import skipvision
from skipvision.peers import tome, tome_after_projector
from skipvision.peers.tome import ToMeLayerMixin
from skipvision.tower_reduction import tower_reduction

PATCHES = 64  # conftest's tower: 32 px images, 4 px patches


def official_matching(metric: torch.Tensor, r: int, class_token: bool):
    """merge.py:36-80 (no distillation token): A = even, B = odd positions; the r best-matched A tokens reduce
    into their B partner; output [unmerged A (ascending with a class token), B]."""
    r = min(r, (metric.shape[1] - int(class_token)) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, unm = order[:, :r], order[:, r:]
    if class_token:
        unm = unm.sort(dim=-1).values
    dst = partner.gather(1, src)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        expand = lambda idx: idx[..., None].expand(-1, -1, x.shape[-1])  # noqa: E731
        xa, xb = x[:, ::2], x[:, 1::2]
        xb = xb.scatter_reduce(1, expand(dst), xa.gather(1, expand(src)), reduce=mode)
        return torch.cat([xa.gather(1, expand(unm)), xb], dim=1)

    return merge


def official_wavg(merge, x: torch.Tensor, size: torch.Tensor | None):
    """merge.py:217-224."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    return merge(x * size, mode="sum") / merge(size, mode="sum"), merge(size, mode="sum")


def official_source(merge, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """merge.py:234-238."""
    if source is None:
        source = torch.eye(x.shape[1], dtype=x.dtype)[None].expand(x.shape[0], -1, -1)
    return merge(source, mode="amax")


def reference_schedule(patches: int, target: int, rounds: int) -> list[int]:
    """docs/peers/reference/tome_ref.py schedule_for_target: the reduction spread evenly, as much as possible in a
    round where the later ones could not absorb the rest."""

    def removable(p: int, k: int) -> int:
        start = p
        for _ in range(k):
            p -= p // 2
        return start - p

    out, left = [], patches - target
    for layer in range(rounds):
        cap = patches // 2
        r = min(cap, math.ceil(left / (rounds - layer)) if left > 0 else 0)
        if left - r > removable(patches - r, rounds - layer - 1):
            r = cap
        out.append(r)
        patches, left = patches - r, left - r
    assert left == 0
    return out


def proportional_attention(attn, x: torch.Tensor, size: torch.Tensor | None):
    """timm.py:70-96 for HF's CLIPAttention: softmax(q k^T * scale + log size) v, projected; and k's head mean."""
    b, t, c = x.shape
    heads = lambda proj: proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
    return attn.out_proj(out), k.mean(dim=1)


@torch.no_grad()
def official_tome_features(vanilla, pixels: torch.Tensor, schedule: list[int]):
    """ToMeBlock.forward (timm.py:34-56) on every layer up to the feature layer (hidden_states[-2]): returns the
    feature layer's tokens (CLS first) and the sources (n, tokens, 1 + PATCHES)."""
    tower = vanilla.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    x = inner.pre_layrnorm(inner.embeddings(pixels))
    size = source = None
    for layer, r in zip(inner.encoder.layers, schedule):
        attended, metric = proportional_attention(layer.self_attn, layer.layer_norm1(x), size)
        x = x + attended
        if r > 0:
            merge = official_matching(metric, r, class_token=True)
            source = official_source(merge, x, source)
            x, size = official_wavg(merge, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, source


def model_sources(model, pixels: torch.Tensor, cfg) -> tuple[torch.Tensor, list[int]]:
    """The groups the skipvision model merged (its tower run with source tracing) and its schedule."""
    family = skipvision.family_of(model)
    layers, feature = family.vision_layers(model), family.feature_index(model) - 1
    with torch.no_grad(), tower_reduction("tome").tower_context(layers, feature, cfg, trace_source=True) as state:
        family.vision_tower(model)(pixels, output_hidden_states=True)
    return state.sources[feature + 1], state.schedule


def _pixels(n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("budget", [8, 20, 45])
def test_tome_in_the_tower_equals_the_official_algorithm(budget):
    cfg = tome(budget)
    vanilla, model = pair(cfg, dtype=torch.float64, vision_layers=4)  # features: layer 2's output, 3 rounds
    pixels = _pixels()
    schedule = reference_schedule(PATCHES, budget, 3)
    features, source = official_tome_features(vanilla, pixels, schedule)
    assert features.shape[1] == budget + 1 and (source[:, 0, 0] == 1).all() and source[:, 0].sum() == 1  # CLS alone
    reference = vanilla.model.multi_modal_projector(features[:, 1:])
    sources, used = model_sources(model, pixels, cfg)
    assert used == schedule and sum(used) == PATCHES - budget
    assert torch.equal(sources, source)  # the same merged groups, in the same (ToMe's) order
    tokens = model.encode_images(pixels)
    assert tokens.shape == (1, budget, reference.shape[-1])
    assert (tokens - reference).abs().max() <= 1e-10
    ids = one_image_prompt(skipvision.num_image_tokens(cfg))
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert (logits[:, -1] - reference_logits(vanilla, ids, reference[0])[:, -1]).abs().max() <= 1e-10
    check_cached_decoding(model, ids, pixels)
    # every image is matched on its own: a batch gives each image what it gets alone
    batch = _pixels(2, seed=2)
    together = model.encode_images(batch)
    alone = torch.cat([model.encode_images(batch[i : i + 1]) for i in range(2)])
    assert (together - alone).abs().max() <= 1e-10


def test_an_unreachable_budget_names_the_smallest_reachable_count():
    # 4 layers, features from layer 2: three rounds at most halve 64 three times, to 8
    _, model = pair(tome(7), dtype=torch.float64, vision_layers=4)
    with pytest.raises(ValueError, match="smallest reachable count is 8"):
        model.encode_images(_pixels())
    # the default 2-layer tower (features: layer 0's output) has one round: 32 at least
    _, model = pair(tome(31), dtype=torch.float64)
    with pytest.raises(ValueError, match="smallest reachable count is 32"):
        model.encode_images(_pixels())
    layers = skipvision.family_of(model).vision_layers(model)
    assert all(ToMeLayerMixin not in type(layer).__mro__ for layer in layers)  # HF's layers again after the error
    assert all("_tome_state" not in layer.__dict__ for layer in layers)


@pytest.mark.parametrize("make", [tome, tome_after_projector], ids=["tome", "tome_after_projector"])
def test_a_budget_of_every_patch_is_the_vanilla_model(make):
    vanilla, model = pair(make(PATCHES), dtype=torch.float64, vision_layers=4)
    ids, pixels = one_image_prompt(PATCHES), _pixels()
    reference = vanilla(input_ids=ids, pixel_values=pixels).logits
    assert (model(input_ids=ids, pixel_values=pixels).logits - reference).abs().max() <= 1e-10


@pytest.mark.parametrize("budget", [1, 10, 40])
def test_tome_after_projector_equals_its_reference(budget):
    """Rounds of the official matching (no class token: the metric is the projected tokens themselves) and the
    size-weighted merge, each round removing as many as ToMe's cap (half) allows until the budget."""
    cfg = tome_after_projector(budget)
    vanilla, model = pair(cfg, dtype=torch.float64, vision_layers=4)
    pixels = _pixels()
    with torch.no_grad():
        x = torch.stack(list(vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output))
        size = None
        while x.shape[1] > budget:
            merge = official_matching(x, min(x.shape[1] // 2, x.shape[1] - budget), class_token=False)
            x, size = official_wavg(merge, x, size)
    tokens = model.encode_images(pixels)
    assert tokens.shape == x.shape == (1, budget, x.shape[-1])
    assert (tokens - x).abs().max() <= 1e-10
    ids = one_image_prompt(skipvision.num_image_tokens(cfg))
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert (logits[:, -1] - reference_logits(vanilla, ids, x[0])[:, -1]).abs().max() <= 1e-10
    check_cached_decoding(model, ids, pixels)
