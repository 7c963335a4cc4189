"""The memory tier stays generic: server.memory never imports server.lora, and both import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import server

# Entry points from which an import cycle between these packages would surface.
FIRST_IMPORTS = (
    "server.memory.kv_cache",
    "server.memory.prefix_cache",
    "server.lora.residency",
    "server.lora.batch",
    "server.engine.sequence",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_each_module_imports_first_in_a_fresh_interpreter():
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:2]]"
    for name in FIRST_IMPORTS:
        done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True)
        assert done.returncode == 0, f"importing {name} first fails:\n{done.stderr[-2000:]}"


def test_memory_never_imports_lora():
    memory = Path(server.__file__).parent / "memory"
    for path in memory.glob("*.py"):
        offending = {n for n in _imports(path) if n.startswith("server.lora")}
        assert not offending, f"{path.name} imports {offending}"


def test_lora_imports_memory_only_through_the_page_pool_and_its_eviction_policy():
    lora = Path(server.__file__).parent / "lora"
    for path in lora.glob("*.py"):
        memory = {n for n in _imports(path) if n.startswith("server.memory")}
        allowed = {"server.memory.page_pool", "server.memory.reclaim"}
        assert memory <= allowed, f"{path.name} imports {memory}"
