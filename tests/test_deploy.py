"""deploy/: SLURM scripts rendered offline, Kubernetes / compose YAML parsed and validated."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml

from semdask.cluster import connect as cluster

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "kubernetes"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys: dask.config.set({"a": {...}}) would replace all of "a"."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _cron_ok(expr: str) -> bool:
    """Five standard cron fields (numbers, ranges, steps, lists, names)."""
    fields = expr.split()
    limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    if len(fields) != 5:
        return False
    for f, (lo, hi) in zip(fields, limits, strict=True):
        for part in f.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if m is None:
                if not re.fullmatch(r"[a-zA-Z]{3}", part):
                    return False
                continue
            nums = [int(n) for n in m.group(2, 3) if n is not None]
            if any(not lo <= n <= hi for n in nums) or (m.group(4) and int(m.group(4)) < 1):
                return False
    return True


def test_cron_checker() -> None:
    assert _cron_ok("30 1 * * *") and _cron_ok("*/15 0-6 1,15 * mon")
    assert not _cron_ok("61 1 * * *") and not _cron_ok("* * *") and not _cron_ok("0 0 * * 9")


# --- SLURM --------------------------------------------------------------------------------------

def test_jobqueue_yaml_renders_a_gpu_job_script(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    jq = pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)  # the cluster creates its log-directory
    conf = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    assert conf["jobqueue"]["slurm"]["scheduler-options"]["dashboard_address"].startswith(
        "127.0.0.1:")
    with dask.config.set(_flat(conf)), jq.SLURMCluster(
            silence_logs="error",
            scheduler_options={"host": "127.0.0.1", "port": 0,
                               "dashboard_address": "127.0.0.1:0"}) as c:
        script = c.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 04:00:00",
                 "#SBATCH --mem=60G", "#SBATCH --cpus-per-task=8",
                 "source .venv/bin/activate"):
        assert line in script, script
    worker = next(ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln)
    assert "--resources GPU=1" in worker and "--nthreads 8" in worker


def _sbatch() -> tuple[dict[str, str], str]:
    text = (DEPLOY / "slurm" / "segment.sbatch").read_text()
    directives = {}
    for ln in text.splitlines():
        if ln.startswith("#SBATCH"):
            key, _, value = ln.split()[1].partition("=")
            directives[key] = value
    return directives, text


def test_segment_sbatch_directives_and_call() -> None:
    d, text = _sbatch()
    assert text.startswith("#!/bin/bash\n")
    assert d["--gpus-per-task"] == "1" and int(d["--ntasks"]) >= 3  # scheduler, client, worker
    assert re.fullmatch(r"\d+:\d\d:\d\d", d["--time"])
    assert "--requeue" in d and d["--signal"].startswith("B:USR1@")
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    args = shlex.split(srun.rstrip("\\"))
    assert args[args.index("semdask"):][:3] == ["semdask", "-v", "segment"]
    assert "--profile" in text and "slurm-runner" in text
    assert "scontrol requeue" in text and "--resume" in text
    # no #SBATCH after the first command (SLURM ignores those)
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    first = text.splitlines().index(body[0])
    assert not any(ln.startswith("#SBATCH") for ln in text.splitlines()[first:])
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / "segment.sbatch")], check=True)


def test_sbatch_scheduler_file_variable_reaches_the_profile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, text = _sbatch()
    m = re.search(r"export (DASK_SEMDASK__\w+)=", text)
    assert m is not None
    monkeypatch.setenv(m.group(1), "/shared/logs/scheduler-7.json")
    dask.config.refresh()
    try:
        assert cluster.profile_config("slurm-runner")["scheduler-file"] == (
            "/shared/logs/scheduler-7.json")
    finally:
        monkeypatch.undo()
        dask.config.refresh()


def test_scrontab_is_a_valid_nightly_entry() -> None:
    lines = [ln for ln in (DEPLOY / "slurm" / "scrontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    assert _cron_ok(" ".join(lines[0].split()[:5]))
    assert "sbatch deploy/slurm/segment.sbatch" in lines[0]


# --- Kubernetes ---------------------------------------------------------------------------------

def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "operator-values.yaml"
            for d in _docs(p)]


def test_every_kubernetes_manifest_has_api_version_kind_and_name() -> None:
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"DaskJob", "CronJob"}
    for name, d in docs:
        assert re.fullmatch(r"v1|[a-z0-9.]+/v\w+", str(d.get("apiVersion"))), name
        assert re.fullmatch(r"[A-Z]\w+", d["kind"]), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), name


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _manifests() if d["kind"] == kind]
    return doc


def test_daskjob_has_a_gpu_worker_group_and_runs_semdask() -> None:
    job = _one("DaskJob")
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    cl = job["spec"]["cluster"]["spec"]
    (worker,) = cl["worker"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][worker["args"].index("--resources") + 1] == "GPU=1"
    assert cl["worker"]["replicas"] >= 1
    (sched,) = cl["scheduler"]["spec"]["containers"]
    assert {p["containerPort"] for p in sched["ports"]} == {8786, 8787}
    assert cl["scheduler"]["service"]["type"] == "ClusterIP"  # dashboard not exposed
    assert cl["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == (
        job["metadata"]["name"])
    (runner,) = job["spec"]["job"]["spec"]["containers"]
    args = runner["args"]
    assert args[:3] == ["semdask", "-v", "segment"]
    assert "$(DASK_SCHEDULER_ADDRESS)" in args and "--gpu-resources" in args
    claims = {v["persistentVolumeClaim"]["claimName"]
              for spec in (job["spec"]["job"]["spec"], cl["worker"]["spec"])
              for v in spec["volumes"]}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}


def test_cronjob_launches_the_daskjob_nightly() -> None:
    cj = _one("CronJob")
    assert cj["apiVersion"] == "batch/v1"
    assert _cron_ok(cj["spec"]["schedule"])
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    script = " ".join(pod["containers"][0]["command"])
    assert "kubectl apply -f /manifests/daskjob.yaml" in script
    role = _one("Role")
    assert any("daskjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]


def test_operator_helm_values() -> None:
    (values,) = _docs(K8S / "operator-values.yaml")
    assert values["image"]["name"] == "ghcr.io/dask/dask-kubernetes-operator"
    assert values["rbac"]["create"] is True
    assert values["metrics"]["scheduler"]["enabled"] is True


# --- Docker ----------------------------------------------------------------------------------

def test_compose_scheduler_workers_job_and_loopback_dashboard() -> None:
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "job"}
    assert services["scheduler"]["ports"] == ["127.0.0.1:8787:8787"]
    assert all("ports" not in s for n, s in services.items() if n != "scheduler")
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "tcp://scheduler:8786" in services["worker"]["command"]
    cmd = services["job"]["command"]
    assert cmd[:3] == ["semdask", "-v", "segment"]
    assert cmd[cmd.index("--scheduler-address") + 1] == "tcp://scheduler:8786"
    for s in services.values():  # the anchor gives every service the shared volume
        assert s["volumes"] == ["data:/data"]
    assert "data" in compose["volumes"]


def _instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize(("name", "base", "index", "extras"), [
    ("Dockerfile.gpu", r"nvidia/cuda:[\w.-]+-runtime-", "whl/cu126", "[gpu,cluster]"),
    ("Dockerfile.cpu", r"python:3\.11-slim$", "whl/cpu", "[cluster]"),
])
def test_dockerfiles_install_pinned_torch_first(name: str, base: str, index: str,
                                               extras: str) -> None:
    lines = _instructions(DEPLOY / name)
    assert re.search(base, lines[0].split()[1]) and lines[0].startswith("FROM ")
    pips = [(i, ln) for i, ln in enumerate(lines) if "pip install" in ln]
    torch = [(i, ln) for i, ln in pips if re.search(r"pip install[^&;]*\btorch\b", ln)]
    assert len(torch) == 1
    i_torch, ln = torch[0]
    assert "torch==2.13.0" in ln and f"--index-url https://download.pytorch.org/{index}" in ln
    i_sd = next(i for i, ln in pips if f"/src{extras}" in ln)
    assert i_torch < i_sd
    assert any(ln.startswith("USER ") and "root" not in ln for ln in lines)


# --- TLS and docs --------------------------------------------------------------------------------

def test_tls_example_configures_distributed_security() -> None:
    from distributed.security import Security

    conf = yaml.safe_load((DEPLOY / "tls" / "dask-tls.yaml").read_text())
    with dask.config.set(_flat(conf)):
        sec = Security()
    assert sec.require_encryption is True
    assert sec.tls_ca_file == "/etc/dask/tls/ca.pem"
    assert sec.tls_scheduler_cert and sec.tls_worker_key and sec.tls_client_cert
    text = (DEPLOY / "tls" / "README.md").read_text()
    assert "openssl req -x509" in text and "openssl x509 -req" in text


def test_readme_covers_choice_tunnel_sizing_and_metrics() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in ("ssh -L 8787:127.0.0.1:8787", "/metrics", "dask_scheduler_workers",
                   "(chunk + 2·halo)²", "--batch-size", "local-cuda", "slurm-runner",
                   "kubernetes", "tls/README.md", ".performance.html"):
        assert needle in text, needle
