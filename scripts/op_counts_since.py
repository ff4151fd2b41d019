"""Ops and host syncs of every family's prefill, decode step and training step, now and at an earlier commit.

    .venv/bin/python scripts/op_counts_since.py e1bdfbc

The earlier commit is checked out into a temporary git worktree; today's ``skipvision.harness.opcount`` is copied into
it, so both sides are counted the same way, on the same batches: tests/families.py's tiny models (3 decoder
layers), 4 left-padded samples with one image each of the same size. Prints a markdown table, after the prefill's
extra ops per decoder layer and fixed (LLaVA at 3 and 6 layers, batch 1 and 4).
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
from skipvision.harness.opcount import count_model_ops
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


SLOPE = """
import copy, json, sys
sys.path.insert(0, sys.argv[1] + "/tests")
import torch, skipvision
from conftest import pair, prompts
from test_skip_kv import CFG
from skipvision.harness.opcount import count_ops
torch.set_grad_enabled(False)
def prefill(model, cfg, batch):
    span = cfg if cfg.num_retained is not None else 64
    ids, mask, pixels = prompts([1] * batch, span, [3, 6, 2, 5][:batch], [4, 1, 2, 3][:batch])
    with count_ops() as counts:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    return counts.ops
out = {}
for batch in (1, 4):
    extra = {}
    for layers in (3, 6):
        vanilla, skip = pair(CFG, num_layers=layers)
        native = skipvision.convert(copy.deepcopy(vanilla), skipvision.vanilla_config())
        extra[layers] = prefill(skip, CFG, batch) - prefill(native, skipvision.vanilla_config(), batch)
    out[batch] = {"per_layer": (extra[6] - extra[3]) / 3, "fixed": extra[3] - (extra[6] - extra[3])}
print("COUNTS" + json.dumps(out))
"""


def counts(tree: Path, code: str = COUNT, args: tuple[str, ...] = tuple(NAMES)) -> dict:
    env = {"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tree), *args], capture_output=True, text=True, env=env, cwd=tree
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
            # today's counter in the old tree (where harness/ may not exist yet: it came with the layout of issue 21)
            harness = old_tree / "src/skipvision/harness"
            harness.mkdir(exist_ok=True)
            (harness / "__init__.py").touch(exist_ok=True)
            shutil.copy(ROOT / "src/skipvision/harness/opcount.py", harness / "opcount.py")
            before = counts(old_tree)
            before_slope = counts(old_tree, SLOPE, ())
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)
    after = counts(ROOT)
    after_slope = counts(ROOT, SLOPE, ())
    print("Prefill ops over vanilla's, LLaVA (tests/conftest.py's model at 3 and 6 layers, one image per sample):")
    for batch in ("1", "4"):
        old, new = before_slope[batch], after_slope[batch]
        print(
            f"- B={batch}: per decoder layer {old['per_layer']:+.0f} at {base}, {new['per_layer']:+.0f} now; "
            f"fixed {old['fixed']:+.0f} at {base}, {new['fixed']:+.0f} now"
        )
    print()
    print(f"| family (3 layers, B=4) | phase | vanilla now | Skip-Vision at {base} | Skip-Vision now |")
    print("| --- | --- | --- | --- | --- |")
    for name in NAMES:
        for phase in ("prefill", "decode", "train"):
            sides = (after[name]["vanilla"], before[name]["skip_vision"], after[name]["skip_vision"])
            cells = [f"{side[phase]['ops']} ops / {side[phase]['syncs']} syncs" for side in sides]
            print("| " + " | ".join([name, phase, *cells]) + " |")


if __name__ == "__main__":
    main()
