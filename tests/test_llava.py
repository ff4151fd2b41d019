"""The LLaVA family's own tests (families/llava.py): what the families suite, which runs this file's configurations
too (tests/families.py), does not cover: CLS-attention selection, vanilla checkpoints, convert, config errors."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, llava_config, pair, prompts, vanilla_model

import skipvision
from skipvision import SkipVisionConfig, SkipVisionLlavaForConditionalGeneration

DEFAULT = SkipVisionConfig(num_retained=16, num_skipped=24)


def gated_reference(model, inputs_embeds, attention_mask, skipped, labels=None):
    """Plain HF forward (no Skip-FFN kwarg) with each layer's MLP output zeroed at skipped positions by hooks."""
    gate = (~skipped).to(inputs_embeds.dtype).unsqueeze(-1)
    hooks = [
        layer.mlp.register_forward_hook(lambda _m, _i, out: out * gate) for layer in model.model.language_model.layers
    ]
    try:
        return super(SkipVisionLlavaForConditionalGeneration, model).forward(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False
        )
    finally:
        for h in hooks:
            h.remove()


def test_no_skipping_equals_vanilla():
    cfg = SkipVisionConfig(num_retained=64, num_skipped=0, selection="position", merge="none", summary_tokens=False)
    vanilla, skip = pair(cfg)
    ids, mask, pixels = prompts([1, 2, 0], 64, [3, 1, 5], [4, 6, 2])
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    ref = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    out = skip(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        DEFAULT,
        SkipVisionConfig(num_retained=16, num_skipped=48, selection="position", merge="none", summary_tokens=False),
        SkipVisionConfig(num_retained=8, num_skipped=20, skip_layers=(0, 2)),
    ],
    ids=["tome+summary", "no-merge", "layer-subset"],
)
def _check_layer_subset(model, cfg, embeds, mask, skipped, logits):
    gate = (~skipped).to(embeds.dtype).unsqueeze(-1)
    hooks = [
        layer.mlp.register_forward_hook(lambda _m, _i, out: out * gate)
        for i, layer in enumerate(model.model.language_model.layers)
        if i in cfg.skip_layers
    ]
    try:
        ref = super(SkipVisionLlavaForConditionalGeneration, model).forward(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False
        )
    finally:
        for h in hooks:
            h.remove()
    assert (logits - ref.logits)[mask.bool()].abs().max() <= 1e-10


def test_skip_ffn_changes_outputs():
    """The gate matters: without skipping the same inputs give different logits (so the tests above can fail)."""
    _, model = pair(DEFAULT, dtype=torch.float64)
    ids, mask, pixels = prompts([1], DEFAULT, [3], [4], dtype=torch.float64)
    embeds, skipped = model.embed_multimodal(ids, pixels)
    plain = super(SkipVisionLlavaForConditionalGeneration, model).forward(inputs_embeds=embeds, attention_mask=mask)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert (out.logits[0, -1] - plain.logits[0, -1]).abs().max() > 1e-4


def test_attention_projections_see_every_token():
    _, model = pair(DEFAULT)
    ids, mask, pixels = prompts([2], DEFAULT, [3], [4])
    seen = []
    hook = model.model.language_model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[1])
    )
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    hook.remove()
    assert seen == [ids.shape[1]]


def test_perturbing_skipped_tokens_leaves_earlier_tokens_unchanged():
    """Causal independence (8.4): prefix, R and sigma_R do not see S; sigma_S and later text do."""
    _, model = pair(DEFAULT, dtype=torch.float64)
    ids, mask, pixels = prompts([1], DEFAULT, [3], [4], dtype=torch.float64)
    embeds, skipped = model.embed_multimodal(ids, pixels)
    states = []
    for noise in (0.0, 1.0):
        perturbed = embeds + noise * skipped.unsqueeze(-1).to(embeds.dtype)
        out = super(SkipVisionLlavaForConditionalGeneration, model).forward(
            inputs_embeds=perturbed,
            attention_mask=mask,
            output_hidden_states=True,
            skip_vision_ffn_rows=skipvision.skip_ffn.ffn_rows(skipped),
        )
        states.append(out.hidden_states[-1][0])
    first_skipped = int(skipped[0].nonzero()[0])
    before = slice(0, first_skipped)
    assert (states[0][before] - states[1][before]).abs().max() == 0
    sigma_s = int(skipped[0].nonzero()[-1]) + 1
    assert (states[0][sigma_s:] - states[1][sigma_s:]).abs().max() > 1e-6


def test_text_only_equals_base_language_model():
    vanilla, skip = pair(DEFAULT)
    ids, mask, _ = prompts([0, 0], DEFAULT, [3, 6], [4, 2])
    ref = vanilla(input_ids=ids, attention_mask=mask).logits
    out = skip(input_ids=ids, attention_mask=mask).logits
    assert (out - ref)[mask.bool()].abs().max() <= 1e-6


def test_encode_images_layout_position_no_merge():
    cfg = SkipVisionConfig(num_retained=10, num_skipped=54, selection="position", merge="none")
    vanilla, skip = pair(cfg)
    _, _, pixels = prompts([2], cfg, [1], [1])
    features = torch.stack(list(vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output))
    seq = skip.encode_images(pixels)
    assert seq.shape == (2, cfg.num_image_tokens, 64)
    assert torch.allclose(seq[:, :10], features[:, :10])
    assert torch.allclose(seq[:, 11:65], features[:, 10:])
    w_r = skip.summary_scorer.weights(features[:, :10])
    assert torch.allclose(seq[:, 10], (w_r.unsqueeze(-1) * features[:, :10]).sum(1), atol=1e-6)
    w_s = skip.summary_scorer.weights(features[:, 10:])
    assert torch.allclose(seq[:, 65], (w_s.unsqueeze(-1) * features[:, 10:]).sum(1), atol=1e-6)


def test_cls_attention_selects_top_patches_of_feature_layer():
    """Retained tokens = top-N_r by CLS attention of CLIP layer -2, computed independently with eager attention."""
    cfg = SkipVisionConfig(num_retained=12, num_skipped=52, merge="none", summary_tokens=False)
    vanilla, skip = pair(cfg)
    _, _, pixels = prompts([3], cfg, [1], [1])
    tower = vanilla.model.vision_tower
    tower.config._attn_implementation = "eager"
    attentions = tower(pixels, output_attentions=True).attentions
    scores = attentions[-2][:, :, 0, 1:].sum(1)
    top = scores.topk(12, dim=-1).indices.sort(-1).values
    features = torch.stack(list(vanilla.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output))
    expected = features.gather(1, top.unsqueeze(-1).expand(-1, -1, 64))
    seq = skip.encode_images(pixels)
    assert torch.allclose(seq[:, :12], expected, atol=1e-6)
    rest = torch.ones(3, 64, dtype=torch.bool)
    rest.scatter_(1, top, False)
    assert torch.allclose(seq[:, 12:], features[rest].view(3, 52, 64), atol=1e-6)


def test_from_vanilla_checkpoint_loads_every_weight(tmp_path):
    """A llava-hf style checkpoint (legacy key layout) loads completely: N_s = 0 logits equal vanilla's."""
    vanilla = vanilla_model()
    vanilla.save_pretrained(tmp_path)
    cfg = SkipVisionConfig(num_retained=64, num_skipped=0, selection="position", merge="none", summary_tokens=False)
    loaded = SkipVisionLlavaForConditionalGeneration.from_pretrained(tmp_path, skip_vision=cfg).eval()
    ids, mask, pixels = prompts([1, 0], 64, [3, 5], [4, 2])
    ref = vanilla(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (out - ref).abs().max() <= 1e-5
    loaded.save_pretrained(tmp_path / "skip")  # and vanilla HF loads a Skip-Vision checkpoint's shared weights
    back = type(vanilla).from_pretrained(tmp_path / "skip").eval()
    assert torch.equal(back.lm_head.weight, vanilla.lm_head.weight)


@pytest.mark.parametrize("load", [{}, {"device_map": "cpu"}], ids=["default", "meta-device-init"])
def test_from_vanilla_checkpoint_initialises_scorer(tmp_path, load):
    """The scorer is missing from a vanilla checkpoint; it gets the paper's init on every loading path, including
    the low-memory one that builds the model on the meta device first."""
    vanilla_model().save_pretrained(tmp_path)
    model = SkipVisionLlavaForConditionalGeneration.from_pretrained(tmp_path, skip_vision=DEFAULT, **load)
    assert model.summary_scorer.score.weight.device.type == "cpu"
    scorer = model.summary_scorer
    assert torch.equal(scorer.score.bias, torch.zeros(1))
    assert torch.equal(scorer.norm.weight, torch.ones(64)) and torch.equal(scorer.norm.bias, torch.zeros(64))
    std = scorer.score.weight.std().item()
    assert 0.01 < std < 0.04, std
    with pytest.raises(ValueError, match="no skip_vision settings"):
        SkipVisionLlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_convert_keeps_weights_and_validates():
    vanilla = vanilla_model()
    state = {k: v.clone() for k, v in vanilla.state_dict().items()}
    model = skipvision.convert(vanilla, DEFAULT)
    assert model is vanilla and isinstance(model, SkipVisionLlavaForConditionalGeneration)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="already"):
        skipvision.convert(model, DEFAULT)
    fresh = vanilla_model()
    with pytest.raises(ValueError, match="larger than the 64 visual tokens"):
        skipvision.convert(fresh, SkipVisionConfig(num_retained=40, num_skipped=30))
    assert type(fresh).__name__ == "LlavaForConditionalGeneration"  # a failed convert leaves the model as it was


def test_config_errors_against_model():
    siglip = llava_config()
    from transformers import SiglipVisionConfig

    siglip.vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4
    )
    siglip.vision_feature_select_strategy = "full"
    siglip.skip_vision = SkipVisionConfig(num_retained=16, num_skipped=24).to_dict()
    with pytest.raises(ValueError, match="cls_attention.*without CLS"):
        SkipVisionLlavaForConditionalGeneration(siglip)
    siglip.skip_vision = SkipVisionConfig(num_retained=16, num_skipped=24, selection="position").to_dict()
    model = SkipVisionLlavaForConditionalGeneration(siglip).eval()  # position selection works without CLS
    assert model.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, 42, 64)

    config = llava_config()
    config.skip_vision = SkipVisionConfig(num_retained=16, num_skipped=24, skip_layers=(0, 3)).to_dict()
    with pytest.raises(ValueError, match="skip_layers \\[0, 3\\] out of range.*3 layers"):
        SkipVisionLlavaForConditionalGeneration(config)
    config.skip_vision = {"num_retained": 16, "num_skipped": 24, "retain_ratio": 0.5}
    with pytest.raises(ValueError, match="unknown SkipVisionConfig option.*retain_ratio"):
        SkipVisionLlavaForConditionalGeneration(config)
    config.skip_vision = SkipVisionConfig(num_retained=16, num_skipped=40, merge="none").to_dict()
    with pytest.raises(ValueError, match="merge='none' needs num_skipped == the 48 skip candidates"):
        SkipVisionLlavaForConditionalGeneration(config)


def test_summary_scorer_gets_gradient_on_text_only_batches():
    """DDP/ZeRO reduce the same parameters on every rank, so a text-only batch must still touch the scorer."""
    _, model = pair(DEFAULT)
    model.train()
    ids, mask, _ = prompts([0, 0], DEFAULT, [3, 6], [4, 2])
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.summary_scorer.parameters())
