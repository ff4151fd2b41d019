"""Loading real checkpoints: each family's checkpoint in the key layout its hub checkpoints use loads every weight,
through ``skipvision.from_pretrained`` and through ``skipvision.convert`` on an HF-loaded model; a checkpoint whose
keys do not match is refused by name instead of leaving weights random."""

from __future__ import annotations

import glob
import os

import pytest
import safetensors.torch
import torch
from families import FAMILIES, vanilla_model

import skipvision

#: the families with a full-layout module, each in its hub checkpoints' key layout (model_type: renames of HF's own
#: save_pretrained keys). llava-hf, llava-next and llava-onevision checkpoints keep the tower's ``vision_model``
#: level; Qwen2.5-VL's and Qwen3-VL's are what HF 5.x writes (``model.layers`` / ``model.language_model.layers``).
HUB_LAYOUT = {
    "llava": [("vision_tower.", "vision_tower.vision_model.")],
    "llava-next": [("vision_tower.", "vision_tower.vision_model.")],
    "llava-onevision": [("vision_tower.", "vision_tower.vision_model.")],
    "qwen2.5-vl": [],
    "qwen3-vl": [],
}
#: a key of each hub layout that only the checkpoint conversion maps onto the model (checked to be in the file)
HUB_KEY = {
    "llava": "language_model.model.layers.0.mlp.up_proj.weight",
    "llava-next": "language_model.model.layers.0.mlp.up_proj.weight",
    "llava-onevision": "language_model.model.layers.0.mlp.up_proj.weight",
    "qwen2.5-vl": "model.layers.0.mlp.up_proj.weight",
    "qwen3-vl": "model.language_model.layers.0.mlp.up_proj.weight",
}


def _weights_file(path) -> str:
    (file,) = glob.glob(os.path.join(path, "*.safetensors"))
    return file


def _rewrite(path, edit) -> None:
    file = _weights_file(path)
    tensors = safetensors.torch.load_file(file)
    safetensors.torch.save_file(edit(tensors), file, metadata={"format": "pt"})


def hub_checkpoint(family: str, path) -> torch.nn.Module:
    """Save the family's tiny vanilla model in its hub key layout; returns the model."""
    model = vanilla_model(family)
    model.save_pretrained(path)

    def to_hub(tensors: dict) -> dict:
        out = {}
        for key, value in tensors.items():
            for old, new in HUB_LAYOUT[family]:
                if key.startswith(old) and not key.startswith(new):
                    key = new + key[len(old) :]
            out[key] = value
        return out

    _rewrite(path, to_hub)
    assert HUB_KEY[family] in safetensors.torch.load_file(_weights_file(path))
    return model


def _assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    actual = loaded.state_dict()
    differ = [key for key, value in expected.items() if not torch.equal(actual[key], value)]
    assert not differ, f"{len(differ)} weights differ from the checkpoint, e.g. {differ[:3]}"


@pytest.mark.parametrize("family", list(HUB_LAYOUT))
def test_hub_layout_loads_every_weight(family, tmp_path):
    reference = hub_checkpoint(family, tmp_path)
    cfg = FAMILIES[family][1]
    loaded = skipvision.from_pretrained(tmp_path, skip_vision=cfg)
    _assert_same_weights(loaded, reference)
    hf_loaded = skipvision.family_of(reference).hf_class.from_pretrained(tmp_path)
    _assert_same_weights(skipvision.convert(hf_loaded, cfg), reference)
    # a converted model saves and reloads with everything, the summary scorer included
    loaded.save_pretrained(tmp_path / "converted")
    reloaded = skipvision.from_pretrained(tmp_path / "converted")
    _assert_same_weights(reloaded, loaded)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_mismatched_checkpoint_is_refused_by_name(family, tmp_path):
    hub_checkpoint(family, tmp_path)
    cfg = FAMILIES[family][1]
    dropped = HUB_KEY[family]
    kept = safetensors.torch.load_file(_weights_file(tmp_path))[dropped]
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(ValueError, match=r"1 missing keys \(.*layers\.0\.mlp\.up_proj\.weight"):
        skipvision.from_pretrained(tmp_path, skip_vision=cfg)
    _rewrite(tmp_path, lambda t: {**t, dropped: kept, "stray.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \(stray\.weight\)"):
        skipvision.from_pretrained(tmp_path, skip_vision=cfg)
    # HF's own report is still there for who asks for it
    _, info = skipvision.from_pretrained(tmp_path, skip_vision=cfg, output_loading_info=True)
    assert "stray.weight" in info["unexpected_keys"]


def test_vanilla_flag_and_settings_together_are_refused(tmp_path):
    hub_checkpoint("llava", tmp_path)
    with pytest.raises(ValueError, match="either skip_vision=... or vanilla=True"):
        skipvision.from_pretrained(tmp_path, skip_vision=FAMILIES["llava"][1], vanilla=True)


@pytest.mark.parametrize("family", ["llava", "llava-next", "llava-onevision", "qwen2.5-vl"])
def test_missing_tower_weights_get_the_towers_own_init(family, tmp_path):
    # weights missing from a checkpoint are initialised as HF's class initialises them (CLIP's scaled q/k/v, ...),
    # not with one generic N(0, 0.02): the same seed gives the same weights
    reference = hub_checkpoint(family, tmp_path)
    tower = "visual." if family == "qwen2.5-vl" else "vision_tower."
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if tower not in k})
    hf_class = skipvision.family_of(reference).hf_class
    torch.manual_seed(0)
    hf_loaded = hf_class.from_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded, info = skipvision.from_pretrained(tmp_path, vanilla=True, output_loading_info=True)
    assert info["missing_keys"] and all(tower in key for key in info["missing_keys"])
    _assert_same_weights(loaded, hf_loaded)


@pytest.mark.parametrize("preset", ["tiny", "tiny-next", "tiny-onevision", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_processor_save_pretrained_round_trip(preset, tmp_path):
    """``processor.save_pretrained`` works the HF way for every family (an image-only processor, built without
    torchvision's video side, saves as its parts), and the Quickstart's save (model and processor) loads back."""
    from PIL import Image

    from skipvision.harness.presets import MODEL_PRESETS, init_model

    base = init_model(preset, tmp_path / "base")
    cfg = MODEL_PRESETS[preset].skip_vision
    model = skipvision.from_pretrained(base, skip_vision=cfg)
    processor = skipvision.load_processor(base, cfg)
    model.save_pretrained(tmp_path / "sv")
    processor.save_pretrained(tmp_path / "sv")
    loaded = skipvision.load_processor(tmp_path / "sv")
    image = Image.new("RGB", (96, 80), (10, 200, 30))
    prompt = skipvision.family_of(model).image_prompt(processor, model.config) + " what is it?"
    before = processor(images=[image], text=[prompt], return_tensors="pt")
    after = loaded(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert type(loaded).__name__ == type(processor).__name__
    model.save_pretrained(tmp_path / "again")
    skipvision.save_processor(processor, tmp_path / "again")  # the exported helper does the same
    again = skipvision.load_processor(tmp_path / "again")
    assert torch.equal(again(images=[image], text=[prompt], return_tensors="pt")["input_ids"], before["input_ids"])


def test_convert_refuses_a_text_only_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    text_model = LlamaForCausalLM(config)
    with pytest.raises(TypeError, match="LlamaForCausalLM is not a vision-language model"):
        skipvision.convert(text_model, skipvision.in_place_config(0.5))
    assert type(text_model) is LlamaForCausalLM
