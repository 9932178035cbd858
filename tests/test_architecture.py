"""The package tree is the data flow: import rules checked on the AST import graph.

Design guide (``ARCHITECTURE.md``, 'Layers and packages'): kernels import no dask/zarr/click;
``storage`` and ``nets`` import nothing from the stages above them; ``inference`` does not
import ``training``; nothing imports ``cli``; no cycles; modules stay under ~400 lines; only
``storage`` opens stores and only ``cluster`` creates clusters or clients; tests import names
from their real homes (no re-export shims).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "semdask"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
STAGES = ("storage", "ingest", "nets", "inference", "training", "labelling", "analysis",
          "cluster", "synthetic", "cli")

#: kernels: one block in, one block out; no dask, no files, no CLI
KERNELS = ("semdask.inference.windows", "semdask.inference.predict", "semdask.storage.ome",
           "semdask.analysis.components", "semdask.labelling.features",
           "semdask.synthetic.microstructure", "semdask.nets.unet", "semdask.nets.resunet",
           "semdask.nets.runtime", "semdask.errors")
#: what each low stage may import from semdask (besides itself)
ALLOWED_BELOW = {
    "storage": {"semdask", "semdask.errors", "semdask.config", "semdask.paths"},
    "nets": {"semdask", "semdask.errors", "semdask.config", "semdask.paths"},
}
#: modules allowed over ~400 lines, with the reason
LONG_MODULES: dict[str, str] = {}
#: modules that may open Zarr stores besides storage/: the lazy patch dataset opens each store
#: once per DataLoader worker process (the torchgeo pattern), read-only
STORE_OPENERS = {"semdask.training.dataset"}


@cache
def _tree(mod: str) -> ast.Module:
    return ast.parse(MODULES[mod].read_text())


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    is_pkg = MODULES[mod].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, *, top_level_only: bool = False) -> set[str]:
    """semdask modules (and external top-level packages) that ``mod`` imports."""
    tree = _tree(mod)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and _attr_chain(block.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(block)}  # annotations only: not a run-time import
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    nodes = [n for n in nodes if id(n) not in typing_only]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            out.add(base)
            for a in node.names:  # `from semdask.storage import io` imports a module
                if f"{base}.{a.name}" in MODULES:
                    out.add(f"{base}.{a.name}")
    return out


def _internal(mod: str, **kw: bool) -> set[str]:
    return {m for m in _imports(mod, **kw) if m in MODULES and m != mod}


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_stage_is_a_package_with_a_docstring():
    for stage in STAGES:
        init = PKG / stage / "__init__.py"
        assert init.exists(), f"semdask/{stage}/ is not a package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"semdask/{stage} has no docstring"


@pytest.mark.parametrize("mod", KERNELS)
def test_kernels_import_no_dask_zarr_or_click(mod):
    heavy = {m.split(".")[0] for m in _imports(mod)} & {"dask", "distributed", "zarr", "click"}
    assert not heavy, f"kernel {mod} imports {sorted(heavy)}"


@pytest.mark.parametrize("mod", ["semdask.inference.windows", "semdask.synthetic.microstructure",
                                 "semdask.errors", "semdask"])
def test_pure_modules_load_no_heavy_library(mod):
    code = (f"import sys; import {mod}; "
            "bad = [m for m in ('torch', 'dask', 'zarr', 'distributed') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {mod} loads {out}"


@pytest.mark.parametrize("stage", sorted(ALLOWED_BELOW))
def test_low_stages_import_nothing_above_them(stage):
    for mod in MODULES:
        if _stage(mod) != stage:
            continue
        bad = {m for m in _internal(mod) if _stage(m) != stage and m not in ALLOWED_BELOW[stage]}
        assert not bad, f"{mod} ({stage}) imports {sorted(bad)} from a stage above it"


def test_inference_does_not_import_training():
    for mod in MODULES:
        if _stage(mod) == "inference":
            bad = {m for m in _internal(mod) if _stage(m) == "training"}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_nothing_imports_cli():
    for mod in MODULES:
        if _stage(mod) == "cli" or mod == "semdask.__main__":
            continue
        bad = {m for m in _internal(mod) if _stage(m) == "cli"}
        assert not bad, f"{mod} imports the CLI ({sorted(bad)})"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles_between_modules():
    # every import counts, deferred ones inside functions too: a cycle is a cycle
    graph = {m: {i for i in _internal(m) if MODULES[i].name != "__init__.py"} for m in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_between_stages():
    graph: dict[str, set[str]] = {}
    for mod in MODULES:
        if (s := _stage(mod)) is not None:
            graph.setdefault(s, set()).update(
                t for m in _internal(mod) if (t := _stage(m)) not in (None, s))
    cycle = _find_cycle(graph)
    assert cycle is None, "stage cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_modules_stay_small(mod):
    n = len(MODULES[mod].read_text().splitlines())
    limit = 560 if mod in LONG_MODULES else 430
    assert n <= limit, f"{mod} has {n} lines; split it along its seams (target < ~400)"


def _attr_chain(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_only_storage_opens_stores():
    for mod in MODULES:
        if _stage(mod) == "storage" or mod in STORE_OPENERS:
            continue
        for node in ast.walk(_tree(mod)):
            if isinstance(node, ast.Attribute):
                chain = _attr_chain(node)
                assert not chain.startswith(("zarr.open", "zarr.create", "zarr.storage",
                                             "zarr.Group", "zarr.Array")), \
                    f"{mod} uses {chain}: open stores through semdask.storage"


def test_only_cluster_creates_clusters_or_clients():
    makers = {"LocalCluster", "SLURMCluster", "KubeCluster", "LocalCUDACluster", "Client",
              "SLURMRunner"}
    for mod in MODULES:
        if _stage(mod) == "cluster":
            continue
        for node in ast.walk(_tree(mod)):
            if isinstance(node, ast.Call):
                name = _attr_chain(node.func).rsplit(".", 1)[-1]
                assert name not in makers, f"{mod} creates a {name}; go through semdask.cluster"


def test_no_print_in_library_code():
    for mod in MODULES:
        if _stage(mod) == "cli":
            continue
        calls = [n for n in ast.walk(_tree(mod)) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{mod} calls print(); use logging"


def _defined(mod: str) -> set[str]:
    """Names a module defines itself (not names it merely imports)."""
    names: set[str] = set()
    for node in _tree(mod).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.If | ast.Try):  # optional-import fallbacks define names too
            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef | ast.ClassDef):
                    names.add(sub.name)
                elif isinstance(sub, ast.Assign):
                    names.update(t.id for t in sub.targets if isinstance(t, ast.Name))
    if mod == "semdask":
        names |= set(_LAZY_NAMES())
    return names


def _LAZY_NAMES() -> list[str]:
    import semdask

    return list(semdask.__all__)


def test_no_module_level_getattr_shims():
    for mod in MODULES:
        if mod == "semdask":
            continue  # the lazy public API
        fns = {n.name for n in _tree(mod).body if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in fns, f"{mod} re-exports names through __getattr__"


@pytest.mark.parametrize("folder", ["tests", "examples", "benchmarks"])
def test_names_are_imported_from_their_real_homes(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and not node.level and node.module
                    and node.module.split(".")[0] == "semdask" and node.module in MODULES):
                continue
            defined = _defined(node.module)
            for a in node.names:
                if a.name not in defined and f"{node.module}.{a.name}" not in MODULES:
                    bad.append(f"{path.relative_to(ROOT)}: {a.name} from {node.module}")
    assert not bad, "import these names from the module that defines them:\n" + "\n".join(bad)
