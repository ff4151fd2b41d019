"""Ops and host syncs of every family's prefill, decode step and training step, now and at an earlier commit.

    .venv/bin/python scripts/op_counts_since.py e1bdfbc

The earlier commit is checked out into a temporary git worktree; today's ``skipvision.opcount`` is copied into
it, so both sides are counted the same way, on the same batches: tests/families.py's tiny models (3 decoder
layers), 4 left-padded samples with one image each of the same size. Prints a markdown table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["llava", "llava-inplace", "llava-next", "qwen2.5-vl", "qwen2.5-vl-inplace", "qwen3-vl", "qwen3-vl-inplace"]
COUNT = """
import copy, json, sys
sys.path.insert(0, sys.argv[1] + "/tests")
import skipvision
from families import FAMILIES, images, pair, processor
from skipvision.opcount import count_model_ops
TEXTS = [" what color is it?", "a b", " is the shape on the left", " compare"]
def batch(name, cfg, model_config):
    proc = processor(name, cfg, model_config)
    marker = skipvision.family_of(model_config).image_prompt(proc, model_config)
    pictures = images([FAMILIES[name][2][0]] * 4)
    return dict(proc(text=[marker + t for t in TEXTS], images=pictures, padding=True, return_tensors="pt"))
out = {}
for name in sys.argv[2:]:
    vanilla, model = pair(name)
    native = skipvision.convert(copy.deepcopy(vanilla), skipvision.vanilla_config())
    out[name] = {"vanilla": count_model_ops(native, batch(name, None, model.config)),
                 "skip_vision": count_model_ops(model, batch(name, model.skip_vision_config, model.config))}
print("COUNTS" + json.dumps(out))
"""


def counts(tree: Path) -> dict:
    env = {"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", COUNT, str(tree), *NAMES], capture_output=True, text=True, env=env, cwd=tree
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("COUNTS")), None)
    if line is None:
        raise SystemExit(f"counting at {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("COUNTS"))


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_tree), base], check=True)
        try:
            shutil.copy(ROOT / "src/skipvision/opcount.py", old_tree / "src/skipvision/opcount.py")
            before = counts(old_tree)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)
    after = counts(ROOT)
    print(f"| family (3 layers, B=4) | phase | vanilla now | Skip-Vision at {base} | Skip-Vision now |")
    print("| --- | --- | --- | --- | --- |")
    for name in NAMES:
        for phase in ("prefill", "decode", "train"):
            sides = (after[name]["vanilla"], before[name]["skip_vision"], after[name]["skip_vision"])
            cells = [f"{side[phase]['ops']} ops / {side[phase]['syncs']} syncs" for side in sides]
            print("| " + " | ".join([name, phase, *cells]) + " |")


if __name__ == "__main__":
    main()
