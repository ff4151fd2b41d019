"""Measure the package's shape: modules, import arrows (lazy ones included), cycles, imports that run from a lower
layer to a higher one, core modules that import the harness, the largest function and the largest module.

    python scripts/import_graph.py            # prints the numbers; exit 1 when a cycle or a core->harness import
    python scripts/import_graph.py --edges    # also lists every arrow

A module's layer is the first entry of LAYERS whose prefix it starts with; an arrow is *upward* when it runs from a
lower layer to a higher one (an arrow within one layer is fine: a cycle check catches what goes wrong there).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "skipvision"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE

# lowest first; a module takes the layer of the longest matching prefix
LAYERS = (
    ("core", ""),  # every module not named below: the method's torch-only pieces
    ("model", "model"),
    ("families", "families"),
    ("core", "families.base"),  # the adapters' base class sits below the model mixin, as peft's tuners_utils
    ("api", "api"),
    ("api", "lora"),
    ("api", "peers"),
    ("api", "lmms_eval_model"),
    ("api", "__init__"),
    ("harness", "__main__"),  # `python -m skipvision` runs the command line
    ("harness", "harness"),
)
LAYER_RANK = {"core": 0, "model": 1, "families": 2, "api": 3, "harness": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def layer_of(module: str) -> str:
    best = ("core", "")
    for layer, prefix in LAYERS:
        if prefix and (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
            best = (layer, prefix)
    return best[0]


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``import``/``from`` names (a ``from x import y`` names ``x.y`` when that is a module)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1] if node.level > 1 else base
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    else:
        if not node.module or not node.module.startswith(PACKAGE):
            return []
        target = node.module[len(PACKAGE) + 1 :]
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}" if target else alias.name
        out.append(sub if sub in MODULES else target)
    return [m for m in out if m in MODULES]


def arrows() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = resolve(module, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name[len(PACKAGE) + 1 :] for a in node.names if a.name.startswith(PACKAGE + ".")]
            else:
                continue
            graph[module].update(t for t in targets if t != module and t in MODULES)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_parent_package(a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules is how it exports them, not a layer crossing."""
    return b.startswith(a + ".") or a == "__init__"


def largest_functions(top: int = 5) -> list[tuple[int, str]]:
    sizes = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    return sorted(sizes, reverse=True)[:top]


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="list every import arrow")
    args = parser.parse_args()
    graph = arrows()
    found = cycles(graph)
    upward = [
        (a, b)
        for a in sorted(graph)
        for b in sorted(graph[a])
        if LAYER_RANK[layer_of(a)] < LAYER_RANK[layer_of(b)] and not is_parent_package(a, b)
    ]
    to_harness = [(a, b) for a, b in upward if layer_of(b) == "harness" and layer_of(a) != "harness"]
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    print(f"modules: {len(MODULES)}, import arrows: {sum(map(len, graph.values()))}")
    print(f"cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"upward imports: {len(upward)}" + "".join(f"\n  {a} -> {b}" for a, b in upward))
    print(f"core -> harness imports: {len(to_harness)}")
    print("largest functions: " + ", ".join(f"{name} {n}" for n, name in largest_functions()))
    big = sorted(((n, m) for m, n in lines.items()), reverse=True)[:5]
    print("largest modules: " + ", ".join(f"{m} {n}" for n, m in big))
    if args.edges:
        for a in sorted(graph):
            print(f"{a} -> {', '.join(sorted(graph[a]))}")
    return 1 if found or to_harness else 0


if __name__ == "__main__":
    sys.exit(main())
