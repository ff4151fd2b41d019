"""Load transformers' shared model-test mixins (``tests/test_modeling_common.py`` of the installed version).

``scripts/fetch_hf_tests.py`` extracts them from transformers' sdist on PyPI at install time into
``<venv>/hf-tests/transformers-<version>/tests/`` (``SKIPVISION_HF_TESTS`` points elsewhere). They are imported as
the package ``_hf_tests``. The sdist ships only the top-level ``tests/test_*.py`` files: the two sibling modules
that ``test_modeling_common`` imports and that the sdist lacks get stand-ins here:

- ``generation/test_utils.py`` (``GenerationTesterMixin``, HF's generate tests): an empty mixin. HF's generate
  tests are not on PyPI; the project's own ``tests/test_hf_paths.py`` checks every ``generate`` path.
- ``exporters/test_export.py`` (``ExportTesterMixin``, torch.export / ONNX tests): an empty mixin.

Without the files, importing this package fails with the command that installs them, unless
``SKIPVISION_HF_SUITES_OPTIONAL=1`` says that skipping is fine (then the caller skips).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import transformers

PACKAGE = "_hf_tests"
FETCH = ".venv/bin/python scripts/fetch_hf_tests.py"


class MissingHFTests(RuntimeError):
    pass


def tests_dir() -> Path:
    root = os.environ.get("SKIPVISION_HF_TESTS")
    base = Path(root) if root else Path(sys.prefix) / "hf-tests" / f"transformers-{transformers.__version__}"
    return base / "tests"


def _stand_in(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__dict__.update(attrs)
    sys.modules[module.__name__] = module
    return module


class GenerationTesterMixin:
    """Stand-in for transformers' ``tests/generation/test_utils.GenerationTesterMixin`` (not on PyPI)."""


class ExportTesterMixin:
    """Stand-in for transformers' ``tests/exporters/test_export.ExportTesterMixin`` (not on PyPI)."""


def load_common() -> types.ModuleType:
    """transformers' ``tests/test_modeling_common`` module of the installed version."""
    if f"{PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{PACKAGE}.test_modeling_common"]
    folder = tests_dir()
    if not (folder / "test_modeling_common.py").is_file():
        raise MissingHFTests(
            f"transformers {transformers.__version__}'s test files are not installed (looked in {folder}): run "
            f"`{FETCH}` once after installing (it extracts them from transformers' sdist on PyPI), or set "
            "SKIPVISION_HF_TESTS to a folder that holds tests/test_modeling_common.py"
        )
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    for sub in ("generation", "exporters"):
        _stand_in(sub).__path__ = []
    _stand_in("generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _stand_in("exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
