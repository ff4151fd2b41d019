"""transformers' own model test suite (``ModelTesterMixin`` of the installed version) on the Skip-Vision classes.

For each family a ``unittest.TestCase`` runs every test of HF's ``ModelTesterMixin`` with ``all_model_classes`` the
Skip-Vision class and ``config.skip_vision`` set, on tiny configs (``hf_suites/testers.py``): the vanilla config for
the five families, then two real Skip-Vision configs, the in-place layout and the full layout.

HF's mixin is loaded from the files that ``scripts/fetch_hf_tests.py`` installs (``hf_suites/__init__.py``); without
them this module fails and names the command, unless ``SKIPVISION_HF_SUITES_OPTIONAL=1``. HF's generate tests
(``GenerationTesterMixin``) are not on PyPI; the project's ``tests/test_hf_paths.py`` checks every ``generate`` path.

Every test skipped here is named, with its reason, in one dict per family (and ``COMMON_SKIPS`` for all).
``SKIPVISION_HF_SUITES_CONTROL=1`` runs the same harness on the plain HF classes, with no skips: how a failure is
checked to be HF's own (on 5.23.0 only ``test_generation_tester_mixin_inheritance`` fails there, as explained below).
"""

from __future__ import annotations

import os
import unittest

import pytest
import transformers
from packaging import version

import hf_suites
import skipvision
from hf_suites import testers
from skipvision import SkipVisionConfig, in_place_config, vanilla_config

try:
    common = hf_suites.load_common()
except hf_suites.MissingHFTests as error:
    if os.environ.get("SKIPVISION_HF_SUITES_OPTIONAL") == "1":
        pytest.skip(str(error), allow_module_level=True)
    raise

CONTROL = os.environ.get("SKIPVISION_HF_SUITES_CONTROL") == "1"


def _alias_skip_class_names() -> None:
    """HF's tests decide what a class is (a causal LM? an image-text-to-text model?) by looking its *name* up in
    the auto mappings' name tables. Give each Skip-Vision class the entries of its HF class, in the copies that the
    test module sees (transformers' own tables are untouched)."""
    names = {family.hf_class.__name__: family.skip_class.__name__ for family in skipvision.FAMILIES.values()}
    for attr, table in list(vars(common).items()):
        if not attr.endswith("_MAPPING_NAMES") or not isinstance(table, dict):
            continue
        aliased = {}
        for key, value in table.items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            extra = tuple(names[v] for v in values if v in names)
            aliased[key] = tuple(values) + extra if extra else value
        setattr(common, attr, type(table)(aliased))


_alias_skip_class_names()


#: HF's eager-vs-SDPA test, one name per entry of HF's parameterization (dtype, padding side, mask, kernels)
EAGER_SDPA_TESTS = [
    f"test_eager_matches_sdpa_inference_{index:02d}_{params[0]}"
    for index, params in enumerate(common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
]

#: skipped for every family and config
COMMON_SKIPS: dict[str, str] = {
    "test_generation_tester_mixin_inheritance": (
        "checks that the test class inherits HF's GenerationTesterMixin, whose file (tests/generation/test_utils.py) "
        "is not in transformers' PyPI sdist (a stand-in is used); tests/test_hf_paths.py covers generate"
    ),
}

LLAVA_SKIPS: dict[str, str] = {}
LLAVA_NEXT_SKIPS: dict[str, str] = {}
#: transformers 5.17's shared suite tests OneVision's video features in a way that fails for HF's own class too in
#: this harness (SKIPVISION_HF_SUITES_CONTROL=1 shows it); 5.18 and later pass
VIDEO_FEATURES_517 = "fails for HF's own class too on transformers 5.17 (SKIPVISION_HF_SUITES_CONTROL=1)"
LLAVA_ONEVISION_SKIPS: dict[str, str] = (
    {
        name: VIDEO_FEATURES_517
        for name in (
            "test_get_video_features_attentions",
            "test_get_video_features_hidden_states",
            "test_get_video_features_output_0",
            "test_get_video_features_output_1",
            "test_get_video_features_output_2",
        )
    }
    if version.parse(transformers.__version__) < version.parse("5.18")
    else {}
)
MERGE_IN_HALF_PRECISION = (
    "by design: the full layout's ToMe merge is discrete (which tokens merge, and into which, comes from a sort and "
    "an argmax of token similarities); in fp16/bf16 the eager and SDPA vision towers differ by rounding (0.2%), enough "
    "to pair the tiny model's candidates differently in every image, so the merged tokens and what follows differ "
    "by far more than the tolerance (10-30%); the fp32 cases run"
)
LLAVA_ONEVISION_FULL_SKIPS: dict[str, str] = {
    **LLAVA_ONEVISION_SKIPS,
    **{name: MERGE_IN_HALF_PRECISION for name in EAGER_SDPA_TESTS if "fp32" not in name},
}
QWEN_EAGER_SDPA = (
    "by design: HF's test feeds input_ids alone, image placeholders included, without pixel_values; Skip-Vision "
    "refuses placeholders without images (ValueError, as for any placeholder count that does not match the images) "
    "where HF embeds them as text. Unlike the LLaVA families (eager_sdpa_with_images), Qwen's images cannot be "
    "passed: the test cuts every extra input to 7 rows, and Qwen's pixel_values are (patches, dim)"
)
QWEN2_5_VL_SKIPS: dict[str, str] = dict.fromkeys(EAGER_SDPA_TESTS, QWEN_EAGER_SDPA)
QWEN3_VL_SKIPS: dict[str, str] = dict.fromkeys(EAGER_SDPA_TESTS, QWEN_EAGER_SDPA)


def _skipped(reason: str):
    @unittest.skip(reason)
    def test(self):
        pass

    return test


class SkipVisionSuite(common.ModelTesterMixin):
    """HF's model tests on the Skip-Vision class of ``model_type``, with ``config.skip_vision = skip_vision``."""

    model_type: str
    model_tester_class: type[testers.Tester]
    skip_vision = vanilla_config()
    skips: dict[str, str] = {}
    _is_composite = True
    #: HF's eager-vs-SDPA test passes ``input_ids`` alone (plus ``additional_model_inputs``) and pads the batch to 7
    #: rows of random ids; with this set it gets 7 prompts and their images instead (``setUp``)
    eager_sdpa_with_images = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        family = skipvision.FAMILIES[cls.model_type]
        variant = cls.skip_vision != vanilla_config()
        if CONTROL:
            cls.all_model_classes = (family.hf_class,)
            if variant:  # the control run is HF's class alone
                cls.__unittest_skip__, cls.__unittest_skip_why__ = True, "control run: no Skip-Vision config"
            return
        cls.all_model_classes = (family.skip_class,)
        for name, reason in {**COMMON_SKIPS, **cls.skips}.items():
            if not callable(getattr(cls, name, None)):
                raise AttributeError(f"{cls.__name__} skips {name!r}, which is no test of HF's suite")
            setattr(cls, name, _skipped(reason))

    def setUp(self):
        self.model_tester = self.model_tester_class(self, None if CONTROL else self.skip_vision)
        if self.eager_sdpa_with_images and self._testMethodName.startswith("test_eager_matches_sdpa_inference"):
            self.model_tester.batch_size = EAGER_SDPA_BATCH  # no random rows (with stray placeholders, no images)
            self.additional_model_inputs = list(self.model_tester.image_inputs())


#: the batch of HF's eager-vs-SDPA test (``_test_eager_matches_sdpa_inference``)
EAGER_SDPA_BATCH = 7


class TestLlava(SkipVisionSuite, unittest.TestCase):
    model_type, model_tester_class, skips = "llava", testers.LlavaTester, LLAVA_SKIPS
    eager_sdpa_with_images = True
    # HF's own setting for such towers: LLaVA takes hidden states, so CLIP's post_layernorm (pooled output only)
    # gets no gradient, for HF's class as for ours
    test_all_params_have_gradient = False


class TestLlavaNext(SkipVisionSuite, unittest.TestCase):
    model_type, model_tester_class, skips = "llava_next", testers.LlavaNextTester, LLAVA_NEXT_SKIPS
    eager_sdpa_with_images = True
    test_all_params_have_gradient = False  # CLIP's post_layernorm is unused, as in TestLlava
    # get_image_features returns one row per tower pass (base + tiles: 3 images give 15 rows), for HF's class too
    skip_test_image_features_output_shape = True


class TestLlavaOnevision(SkipVisionSuite, unittest.TestCase):
    model_type, model_tester_class, skips = "llava_onevision", testers.LlavaOnevisionTester, LLAVA_ONEVISION_SKIPS
    eager_sdpa_with_images = True
    test_all_params_have_gradient = False  # SigLIP's post_layernorm and pooling head are unused, as in TestLlava
    # one row per tower pass / frame: HF's mixin reads the (3, 5, ...) anyres pixels as 3 videos of 5 frames
    skip_test_image_features_output_shape = True
    skip_test_video_features_output_shape = True


class TestQwen2_5_VL(SkipVisionSuite, unittest.TestCase):
    model_type, model_tester_class, skips = "qwen2_5_vl", testers.Qwen2_5_VLTester, QWEN2_5_VL_SKIPS


class TestQwen3VL(SkipVisionSuite, unittest.TestCase):
    model_type, model_tester_class, skips = "qwen3_vl", testers.Qwen3VLTester, QWEN3_VL_SKIPS


# The same suites with a real Skip-Vision config. In place: half of each image's tokens retained (grid selection),
# the others skip the FFN in every layer where they are.
class TestLlavaInPlace(TestLlava):
    skip_vision = in_place_config(0.5)


class TestLlavaNextInPlace(TestLlavaNext):
    skip_vision = in_place_config(0.5)


class TestLlavaOnevisionInPlace(TestLlavaOnevision):
    skip_vision = in_place_config(0.5)


class TestQwen2_5_VLInPlace(TestQwen2_5_VL):
    skip_vision = in_place_config(0.5)


class TestQwen3VLInPlace(TestQwen3VL):
    skip_vision = in_place_config(0.5)


# The full layout, [R, sigma_R, S, sigma_S] per image (the prompts hold the Skip-Vision placeholder count): LLaVA keeps
# 4 of its 16 tokens by CLS attention and merges the other 12 into 6; LLaVA-NeXT / OneVision keep 8 of the base image's
# 16 (by CLS attention / on a grid) and merge the other 8 and the 64 tile tokens into 20; Qwen keeps 2 of each image's
# 2x2 tokens on a grid and merges the other 2 into 1.
class TestLlavaFull(TestLlava):
    skip_vision = SkipVisionConfig(num_retained=4, num_skipped=6)


class TestLlavaNextFull(TestLlavaNext):
    skip_vision = SkipVisionConfig(num_retained=8, num_skipped=20)


class TestLlavaOnevisionFull(TestLlavaOnevision):
    skip_vision = SkipVisionConfig(num_retained=8, num_skipped=20, selection="grid")
    skips = LLAVA_ONEVISION_FULL_SKIPS


class TestQwen2_5_VLFull(TestQwen2_5_VL):
    skip_vision = SkipVisionConfig(0.5, 1, selection="grid")


class TestQwen3VLFull(TestQwen3VL):
    skip_vision = SkipVisionConfig(0.5, 1, selection="grid")
