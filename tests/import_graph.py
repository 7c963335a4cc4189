"""The first-party import graph, read from the source: every `import` of `server` and `adapters`
modules, at module level, inside functions or under TYPE_CHECKING alike.

    python -m tests.import_graph    # prints import cycles, then the edges between layers

tests/unit/test_package_layering.py holds the code to LAYERS (below) with it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "server")

# The layers, lowest first, and the layers each may import directly; what a layer may reach
# is the transitive closure. `server` itself (its __init__: the version) is below them all.
LAYERS: dict[str, tuple[str, ...]] = {
    "adapters": (),
    "server.config": (),
    "server.redact": (),
    "server.model": ("adapters", "server.config"),
    "server.kernels": ("server.model",),
    "server.memory": ("server.model",),
    "server.lora": ("server.memory", "server.model", "server.kernels", "adapters"),
    "server.engine": ("server.lora", "server.kernels", "server.config"),
    "server.training": ("server.model", "server.redact", "adapters"),
    "server.metrics_vllm": (),
    "server.metrics": ("server.engine", "server.training", "server.metrics_vllm"),
    "server.serving": ("server.engine",),
    "server.options": ("server.config", "server.model"),
    "server.api": ("server.serving", "server.training", "server.metrics", "server.redact"),
    "server.console": (),
    "server.ray": ("server.api", "server.options"),
    "server.cli": ("server.ray", "server.options", "server.training"),
}


def modules() -> dict[str, Path]:
    """Every first-party module name -> its file."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The first-party module an imported name belongs to (a module, or one's attribute)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> dict[str, set[str]]:
    """module -> the first-party modules it imports, anywhere in its source."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: Iterable[str] = ()
            if isinstance(node, ast.Import):
                names = (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            # `from a.b import c` runs a.b, and a.b.c too when c is a module.
            targets = {_owner(n, known) for n in names} - {None, module}
            graph[module] |= {t for t in targets if t is not None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str | None:
    """The LAYERS entry a module belongs to (the longest matching prefix); None for `server`."""
    matches = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return max(matches, key=len) if matches else None


def reachable(layer: str) -> set[str]:
    """The layers `layer` may import, directly or through others (not itself)."""
    seen: set[str] = set()
    todo = list(LAYERS[layer])
    while todo:
        nxt = todo.pop()
        if nxt not in seen:
            seen.add(nxt)
            todo.extend(LAYERS[nxt])
    return seen


def layer_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(from layer, to layer) -> the module imports behind that edge."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for module, targets in graph.items():
        for target in targets:
            a, b = layer_of(module), layer_of(target)
            if a is not None and b is not None and a != b:
                found.setdefault((a, b), []).append((module, target))
    return found


def main() -> int:
    graph = edges()
    for group in cycles(graph):
        print("cycle:", " <-> ".join(group))
    for (a, b), imports in sorted(layer_edges(graph).items()):
        verdict = "" if b in reachable(a) else "   NOT ALLOWED"
        print(f"{a} -> {b} ({len(imports)} imports){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
