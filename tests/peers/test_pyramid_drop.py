"""PyramidDrop (peers/pyramid_drop.py) against a reference written from the official code (Cooperx521/PyramidDrop,
``modeling_llama_pdrop.py`` pdrop_forward / pdrop_rank_drop; docs/peers/pyramid_drop.md): between stages, rank by
the next layer's norm and q/k on the stage's output (RoPE at the current positions, softmax over each query row,
head mean, then the mean over queries), keep ``int(N * ratio**s)`` in order, renumber the positions; decoding
continues each stage's positions from its own prompt length."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, pair
from peer_checks import one_image_prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from skipvision.peers import pyramid_drop

LAYERS = 4
SPAN = 64


def _causal(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _scores(layer, h, rotary, queries, start, count) -> torch.Tensor:
    """Mean over heads, then over the query rows, of the softmax attention of ``layer`` on ``h`` to the visual run."""
    attn, n = layer.self_attn, h.shape[1]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rotary(h, torch.arange(n)[None]))
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = q[0][:, queries] @ k[0].transpose(-1, -2) * attn.head_dim**-0.5 + _causal(n, h.dtype)[0, 0][queries]
    return logits.float().softmax(-1).mean(0)[:, start : start + count].mean(0)


def official_pdrop(vanilla, ids, pixels, layer_list, ratio, labels=None, kept=None):
    """``(logits (L', V), kept visual indices per stage)`` of the official prefill (``kept`` given: those sets,
    not re-ranked, as cached decoding continues a prefill)."""
    lm = vanilla.model.language_model
    h = vanilla.get_input_embeddings()(ids)
    feats = vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
    is_image = ids[0] == IMAGE_TOKEN_ID
    h = h.masked_scatter(is_image[None, :, None], feats.to(h.dtype))
    start, total = int(is_image.nonzero()[0]), int(is_image.sum())
    index, stages, first = torch.arange(total), [], 0
    lab = None if labels is None else labels[0]
    for s, rank_layer in enumerate([*layer_list, len(lm.layers)]):
        positions = torch.arange(h.shape[1])[None]  # renumbered after every drop
        rope = lm.rotary_emb(h, positions)
        for layer in lm.layers[first:rank_layer]:
            h = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_ids=positions, position_embeddings=rope)
        first = rank_layer
        if rank_layer == len(lm.layers):
            break
        if kept is None:
            if lab is None:
                queries = torch.tensor([h.shape[1] - 1])
            else:
                queries = ((lab[1:] != -100) & (lab[:-1] == -100)).nonzero()[:, 0]
            score = _scores(lm.layers[rank_layer], h, lm.rotary_emb, queries, start, len(index))
            top = score.topk(int(total * ratio ** (s + 1))).indices.sort().values
        else:
            top = torch.searchsorted(index, kept[s])
        keep = torch.cat([torch.arange(start), start + top, torch.arange(start + len(index), h.shape[1])])
        h, index = h[:, keep], index[top]
        lab = None if lab is None else lab[keep]
        stages.append(index.clone())
    return vanilla.lm_head(lm.norm(h))[0], stages


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_pyramid_drop_equals_the_official_algorithm(ratio):
    cfg = pyramid_drop(ratio, LAYERS, stages=4)
    vanilla, model = pair(cfg, dtype=torch.float64, num_layers=LAYERS)
    layer_list = [end + 1 for end, _ in cfg.llm_drop]  # the official layer_list: the first layer of each next stage
    ids = one_image_prompt(SPAN)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        reference, kept = official_pdrop(vanilla, ids, pixels, layer_list, ratio)
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
    assert [len(k) for k in kept] == [int(SPAN * ratio ** (s + 1)) for s in range(3)]
    assert (out.logits[0, -1] - reference[-1]).abs().max() <= 1e-10
    # each stage's cache holds the text and the stage's kept visual tokens
    text = ids.shape[1] - SPAN
    assert [out.past_key_values.layers[i].keys.shape[2] for i in range(LAYERS)] == [ids.shape[1]] + [
        text + len(k) for k in kept
    ]
    # cached decoding continues the prefill's kept sets at each stage's renumbered positions
    new = 3
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new, do_sample=False)
    with torch.no_grad():
        continued, _ = official_pdrop(vanilla, generated[:, :-1], pixels, layer_list, ratio, kept=kept)
    assert torch.equal(continued[-new:].argmax(-1), generated[0, -new:])


def test_pyramid_drop_training_ranks_by_every_answer():
    """Training: the scores average the queries before every answer span (two turns here)."""
    cfg = pyramid_drop(0.5, LAYERS, stages=4)
    vanilla, model = pair(cfg, dtype=torch.float64, num_layers=LAYERS)
    layer_list = [end + 1 for end, _ in cfg.llm_drop]
    ids = one_image_prompt(SPAN, suffix=12)
    labels = torch.full_like(ids, -100)
    labels[0, -9:-6] = ids[0, -9:-6]  # the first turn's answer
    labels[0, -3:] = ids[0, -3:]  # the second turn's
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        _, kept = official_pdrop(vanilla, ids, pixels, layer_list, 0.5, labels=labels)
        reference, _ = official_pdrop(vanilla, ids, pixels, layer_list, 0.5, kept=kept)
    model.train()
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    # the text after the image reached the last layer in both: its logits are the same rows
    assert (out.logits[0, -12:] - reference[-12:]).abs().max() <= 1e-10
    answers = labels[0, 1:] != -100
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1][answers].double(), ids[0, 1:][answers])
    assert abs(out.loss.item() - expected.item()) <= 1e-6  # HF computes the loss in fp32


def test_true_positions_is_a_named_departure():
    cfg = pyramid_drop(0.5, LAYERS, stages=4, positions="true")
    assert cfg.llm_drop_rule == "pyramid_drop_true_positions"
    with pytest.raises(ValueError, match="positions"):
        pyramid_drop(0.5, LAYERS, positions="shifted")
