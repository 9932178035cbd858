"""Import rules of the layered design (docs: ARCHITECTURE.md, 'Layers')."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "semdask"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def _imports(mod: str) -> set[str]:
    tree = ast.parse((PKG / f"{mod}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names.add(base)
            if node.level and not node.module:
                names.update("." + a.name for a in node.names)
    return names


@pytest.mark.parametrize("mod", ["tiling", "synthetic", "errors"])
def test_pure_modules_do_not_import_heavy_libraries(mod):
    code = (f"import sys; import semdask.{mod}; "
            "bad = [m for m in ('torch', 'dask', 'zarr', 'distributed') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"semdask.{mod} imports {out} at module level"


@pytest.mark.parametrize("mod", MODULES)
def test_nothing_imports_cli(mod):
    if mod.startswith("cli"):
        return  # the CLI modules (cli, cli_common, cli_ops, cli_analysis) may use each other
    bad = [n for n in _imports(mod) if n.lstrip(".").split(".")[-1].startswith("cli")
           or "semdask.cli" in n]
    assert not bad, f"{mod} imports the CLI ({bad})"


@pytest.mark.parametrize("mod", MODULES)
def test_only_io_and_ome_open_stores(mod):
    allowed = {"io", "ome", "export", "dataset"}
    src = (PKG / f"{mod}.py").read_text()
    opens = any(s in src for s in ("zarr.open", "zarr.create", "open_group", "zarr.storage"))
    assert mod in allowed or not opens, f"{mod} opens Zarr stores directly; go through semdask.io"


@pytest.mark.parametrize("mod", MODULES)
def test_only_cluster_builds_clusters(mod):
    src = (PKG / f"{mod}.py").read_text()
    builds = any(s in src for s in ("LocalCluster(", "SLURMCluster(", "KubeCluster(",
                                    "LocalCUDACluster(", "Client("))
    assert mod == "cluster" or not builds, f"{mod} creates a cluster or client"


@pytest.mark.parametrize("mod", MODULES)
def test_modules_stay_small(mod):
    n = len((PKG / f"{mod}.py").read_text().splitlines())
    assert n <= 560, f"{mod}.py has {n} lines; split it (target < ~400)"


def test_no_print_in_library_code():
    for mod in MODULES:
        if mod.startswith("cli"):
            continue
        tree = ast.parse((PKG / f"{mod}.py").read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{mod} calls print(); use logging"
