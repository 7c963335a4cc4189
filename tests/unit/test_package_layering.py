"""Layers point one way (tests/import_graph.py's LAYERS, docs/architecture.md): what importing
a layer loads stays within the layers below it, and no first-party import cycle exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.import_graph import LAYERS, ROOT, cycles, edges, layer_edges, layer_of, reachable

# Imports every module of one layer in a fresh interpreter and prints what got loaded; modules
# whose third-party extras are not installed here (ray, the console's browser tools) are left
# out, as their import fails before it loads anything first-party worth checking.
_PROBE = """
import importlib, json, pkgutil, sys
name = sys.argv[1]
root = importlib.import_module(name)
names = [name]
if hasattr(root, "__path__"):
    names += [m.name for m in pkgutil.walk_packages(root.__path__, name + ".")]
skipped = []
for module in names:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("server", "adapters"):
            raise
        skipped.append(module)
loaded = [m for m in sys.modules if m.split(".")[0] in ("server", "adapters")]
print(json.dumps({"loaded": loaded, "skipped": skipped}))
"""


def test_the_layer_table_has_no_cycle_and_names_only_layers() -> None:
    for layer, below in LAYERS.items():
        assert set(below) <= set(LAYERS), f"{layer} names unknown layers {set(below) - set(LAYERS)}"
        assert layer not in reachable(layer), f"{layer} reaches itself"


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [m for m in edges() if m != "server" and layer_of(m) is None]
    assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


def test_no_import_cycles_between_modules_type_only_ones_included() -> None:
    found = cycles(edges())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_import_in_the_source_points_down_the_layers() -> None:
    wrong = {
        pair: imports
        for pair, imports in layer_edges(edges()).items()
        if pair[1] not in reachable(pair[0])
    }
    assert not wrong, "imports against the layers:\n" + "\n".join(
        f"{a} -> {b}: {imports[:3]}" for (a, b), imports in wrong.items()
    )


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_importing_a_layer_loads_only_the_layers_below_it(layer: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, layer], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, f"importing {layer} fails:\n{done.stderr[-2000:]}"
    loaded = json.loads(done.stdout.splitlines()[-1])["loaded"]
    allowed = reachable(layer) | {layer}
    outside = sorted(
        m for m in loaded if (owner := layer_of(m)) is not None and owner not in allowed
    )
    assert not outside, f"importing {layer} loads {outside}"
