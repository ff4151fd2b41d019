"""Install step: put the installed transformers' shared model-test files where ``tests/hf_suites`` finds them.

transformers' source distribution on PyPI ships the shared test mixins of its ``tests/`` folder
(``test_modeling_common.py``, ``test_configuration_common.py``, ...), the same version as the installed library.
This script downloads that sdist with pip (PyPI only), and extracts ``tests/*.py`` into
``<venv>/hf-tests/transformers-<version>/tests/``. The tests themselves never download anything: without these
files ``tests/hf_suites/test_hf_suites.py`` fails and names this script. Usage (after ``pip install -e ".[test]"``)::

    .venv/bin/python scripts/fetch_hf_tests.py            # idempotent: does nothing when the files are there
    .venv/bin/python scripts/fetch_hf_tests.py --dest DIR  # elsewhere; point SKIPVISION_HF_TESTS at DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: the files tests/hf_suites/test_hf_suites.py imports; present means installed
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py")


def default_dest(version: str) -> Path:
    """Where the files go by default: inside the running environment, per transformers version."""
    return Path(sys.prefix) / "hf-tests" / f"transformers-{version}"


def installed(dest: Path) -> bool:
    return all((dest / "tests" / name).is_file() for name in REQUIRED)


def fetch(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + [f"transformers=={version}", "-d", tmp],
            check=True,
        )
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if len(archives) != 1:
            raise SystemExit(f"expected one transformers sdist in {tmp}, found {[a.name for a in archives]}")
        prefix = f"transformers-{version}/tests/"
        staging = Path(tmp) / "staging" / "tests"
        staging.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                # only the top-level test files, plain files, plain names
                if not name or "/" in name or not name.endswith(".py") or not member.isfile():
                    continue
                with tar.extractfile(member) as src, open(staging / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        missing = [name for name in REQUIRED if not (staging / name).is_file()]
        if missing:
            raise SystemExit(f"the transformers {version} sdist has no tests/{', tests/'.join(missing)}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.move(str(staging), str(dest / "tests"))


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="target folder (default: <venv>/hf-tests/...)")
    parser.add_argument("--force", action="store_true", help="download again even if the files are there")
    args = parser.parse_args()
    version = transformers.__version__
    dest = args.dest or Path(os.environ.get("SKIPVISION_HF_TESTS") or default_dest(version))
    if installed(dest) and not args.force:
        print(f"transformers {version} test files already in {dest}")
        return
    fetch(version, dest)
    print(f"transformers {version} test files installed in {dest}")


if __name__ == "__main__":
    main()
