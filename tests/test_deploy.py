"""deploy/: what each file sets up, read offline; the slurm profile honours site jobqueue config.

Schema validation lives in test_deploy_validation.py, script behaviour in test_deploy_scripts.py.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml

from semdask.cluster import connect as cluster
from semdask.cluster import profiles

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


@pytest.fixture
def site_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write YAML files into the only config folder searched, and reload the Dask config."""
    site = tmp_path / "dask"
    site.mkdir()

    def write(name: str, text: str) -> None:
        (site / name).write_text(text)
        dask.config.refresh(paths=[str(site)])  # not this machine's own ~/.config/dask

    yield write
    dask.config.refresh()


SITE_JOBQUEUE = """
jobqueue:
  slurm:
    queue: a100
    walltime: "12:00:00"
    memory: 128GB
    job-extra-directives: ["--gres=gpu:a100:1", "--constraint=ib"]
    worker-extra-args: ["--lifetime", "11h"]
    scheduler-options: {idle_timeout: "1800s", dashboard_address: "127.0.0.1:8790"}
"""


def test_site_jobqueue_config_wins_over_packaged_defaults(site_config: Any) -> None:
    pytest.importorskip("dask_jobqueue")
    site_config("jobqueue.yaml", SITE_JOBQUEUE)
    kw = profiles.slurm_kwargs(profiles.profile_config("slurm"))
    assert kw["queue"] == "a100" and kw["walltime"] == "12:00:00" and kw["memory"] == "128GB"
    assert kw["job_extra_directives"] == ["--gres=gpu:a100:1", "--constraint=ib"]
    # the site's worker args, plus the GPU resource semdask needs
    assert kw["worker_extra_args"] == ["--lifetime", "11h", "--resources", "GPU=1"]
    assert kw["scheduler_options"] == {"idle_timeout": "1800s",
                                       "dashboard_address": "127.0.0.1:8790"}
    assert kw["cores"] == 8  # not set by the site: semdask's packaged default
    # keywords still win over everything
    assert profiles.profile_config("slurm", walltime="00:05:00")["walltime"] == "00:05:00"


def test_site_scheduler_options_reach_the_real_job_script(site_config: Any) -> None:
    pytest.importorskip("dask_jobqueue")
    site_config("jobqueue.yaml", SITE_JOBQUEUE)
    script = cluster.job_script("slurm")
    for line in ("#SBATCH -p a100", "#SBATCH -t 12:00:00", "#SBATCH --gres=gpu:a100:1",
                 "#SBATCH --constraint=ib"):
        assert line in script, script
    worker = next(ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln)
    assert "--lifetime 11h" in worker and "--resources GPU=1" in worker


def test_semdask_profile_set_by_the_user_wins_with_a_warning(
        site_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("dask_jobqueue")
    site_config("jobqueue.yaml", SITE_JOBQUEUE)
    site_config("semdask.yaml", "semdask:\n  cluster:\n    profiles:\n      slurm:\n"
                "        walltime: '06:00:00'\n        dashboard-address: 127.0.0.1:9000\n")
    with caplog.at_level(logging.WARNING, logger="semdask.cluster.profiles"):
        kw = profiles.slurm_kwargs(profiles.profile_config("slurm"))
    assert kw["walltime"] == "06:00:00" and kw["queue"] == "a100"
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:9000"
    assert kw["scheduler_options"]["idle_timeout"] == "1800s"  # merged, not replaced
    (msg,) = [r.getMessage() for r in caplog.records if "walltime" in r.getMessage()]
    assert "'06:00:00'" in msg and "'12:00:00'" in msg and "jobqueue.slurm.walltime" in msg


def test_a_site_dashboard_off_loopback_is_honoured_with_a_warning(
        site_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("dask_jobqueue")
    site_config("jobqueue.yaml", "jobqueue:\n  slurm:\n    scheduler-options:\n"
                "      dashboard_address: ':8787'\n")
    with caplog.at_level(logging.WARNING, logger="semdask.cluster.profiles"):
        kw = profiles.slurm_kwargs(profiles.profile_config("slurm"))
    assert kw["scheduler_options"] == {"dashboard_address": ":8787"}
    assert any("without authentication" in r.getMessage() for r in caplog.records)


def test_without_site_config_the_packaged_defaults_apply(site_config: Any) -> None:
    pytest.importorskip("dask_jobqueue")
    site_config("empty.yaml", "{}\n")
    kw = profiles.slurm_kwargs(profiles.profile_config("slurm"))
    assert kw["walltime"] == "02:00:00" and kw["job_extra_directives"] == ["--gres=gpu:1"]
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787"}
    assert "queue" not in kw  # null: dask-jobqueue's own default


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
    assert d["--gpus-per-task"] == "1" and int(d["--ntasks"]) >= 1  # workers only
    assert re.fullmatch(r"\d+:\d\d:\d\d", d["--time"])
    assert "--requeue" in d and re.fullmatch(r"B:TERM@\d+", d["--signal"])  # batch shell only
    call = re.search(r"^semdask (.*?) &$", text.replace("\\\n", " "), re.M)
    assert call is not None
    args = shlex.split(call.group(1))
    assert args[:2] == ["-v", "segment"] and "--resume" in args and "--overwrite" not in args
    assert "--scheduler-file" in args and "--gpu-resources" in args
    from semdask.cli.main import main  # the options exist: parse them (nothing runs)

    ctx = main.make_context("semdask", args[:1])
    segment = main.get_command(ctx, "segment")
    assert segment is not None
    segment.make_context("segment", [re.sub(r"\$\{\w+\}", "x", a) for a in args[2:]],
                         parent=ctx)
    assert "scontrol requeue" in text
    # no #SBATCH after the first command (SLURM ignores those)
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    first = text.splitlines().index(body[0])
    assert not any(ln.startswith("#SBATCH") for ln in text.splitlines()[first:])


def test_scrontab_is_a_locked_nightly_entry() -> None:
    lines = [ln for ln in (DEPLOY / "slurm" / "scrontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    assert _cron_ok(" ".join(lines[0].split()[:5]))
    command = lines[0].split(None, 5)[5]
    assert "flock -n " in command and "deploy/slurm/nightly.sh" in command
    assert "--overwrite" not in command


# --- Kubernetes ---------------------------------------------------------------------------------

def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "operator-values.yaml"
            for d in _docs(p)]


def test_every_kubernetes_manifest_has_api_version_kind_and_name() -> None:
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"DaskJob", "CronJob", "NetworkPolicy",
                                            "PersistentVolumeClaim"}
    for name, d in docs:
        assert re.fullmatch(r"v1|[a-z0-9.]+/v\w+", str(d.get("apiVersion"))), name
        assert re.fullmatch(r"[A-Z]\w+", d["kind"]), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), name
    # the launcher's ConfigMap holds daskjob.yaml alone: nothing else may live in that file
    assert [d["kind"] for d in _docs(K8S / "daskjob.yaml")] == ["DaskJob"]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _manifests() if d["kind"] == kind]
    return doc


def test_daskjob_has_a_gpu_worker_group_and_runs_semdask() -> None:
    job = _one("DaskJob")
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    cl = job["spec"]["cluster"]["spec"]
    (worker,) = cl["worker"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # a string, as the CRD says
    assert worker["args"][worker["args"].index("--resources") + 1] == "GPU=1"
    assert cl["worker"]["replicas"] >= 1
    (sched,) = cl["scheduler"]["spec"]["containers"]
    assert {p["containerPort"] for p in sched["ports"]} == {8786}  # dashboard: loopback only
    assert sched["args"][sched["args"].index("--dashboard-address") + 1].startswith("127.0.0.1:")
    assert cl["scheduler"]["service"]["type"] == "ClusterIP"
    assert cl["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == (
        job["metadata"]["name"])
    (runner,) = job["spec"]["job"]["spec"]["containers"]
    args = runner["args"]
    assert args[:3] == ["semdask", "-v", "segment"]
    assert "$(DASK_SCHEDULER_ADDRESS)" in args and "--gpu-resources" in args
    assert "--resume" in args and "--overwrite" not in args
    claims = {v["persistentVolumeClaim"]["claimName"]
              for spec in (job["spec"]["job"]["spec"], cl["worker"]["spec"])
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}


def test_cronjob_launches_the_daskjob_nightly_without_overlap() -> None:
    cj = _one("CronJob")
    assert cj["apiVersion"] == "batch/v1"
    assert _cron_ok(cj["spec"]["schedule"])
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (launch,) = pod["containers"]
    script = launch["args"][0]
    assert "kubectl create -f /manifests/daskjob.yaml" in script
    job_name = _one("DaskJob")["metadata"]["name"]
    assert {"name": "JOB", "value": job_name} in launch["env"]
    mounts = {m["name"]: m["mountPath"] for m in launch["volumeMounts"]}
    (cm,) = [v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "manifests"]
    assert mounts["manifests"] == "/manifests" and cm == "semdask-daskjob"
    role = _one("Role")
    verbs = {v for r in role["rules"] if "daskjobs" in r["resources"] for v in r["verbs"]}
    assert verbs >= {"get", "create", "delete"}
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]


def test_operator_helm_values() -> None:
    (values,) = _docs(K8S / "operator-values.yaml")
    assert values["image"]["name"] == "ghcr.io/dask/dask-kubernetes-operator"
    assert re.fullmatch(r"\d{4}\.\d+\.\d+", values["image"]["tag"])
    assert values["rbac"]["create"] is True
    # the DaskJob's dashboard is on loopback: a ServiceMonitor could not reach it
    assert values["metrics"]["scheduler"]["enabled"] is False


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
    assert "--resume" in cmd and "--overwrite" not in cmd
    for s in services.values():  # the anchor gives every service the shared volume
        assert s["volumes"] == ["data:/data"]
        assert s["user"] == "10001:10001" and s["read_only"] is True
        assert s["cap_drop"] == ["ALL"] and "no-new-privileges:true" in s["security_opt"]
    assert "data" in compose["volumes"]


def _instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize(("name", "base", "index", "extras"), [
    ("Dockerfile.gpu", r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu\d+\.\d+$", "whl/cu126",
     "[gpu,cluster]"),
    ("Dockerfile.cpu", r"python:3\.11\.\d+-slim-\w+$", "whl/cpu", "[cluster]"),
])
def test_dockerfiles_install_pinned_torch_first(name: str, base: str, index: str,
                                               extras: str) -> None:
    lines = _instructions(DEPLOY / name)
    (final,) = [ln for ln in lines if ln.startswith("FROM ") and " AS " not in ln]
    assert re.search(base, final.split()[1]), final
    pips = [(i, ln) for i, ln in enumerate(lines) if "pip install" in ln]
    torch = [(i, ln) for i, ln in pips if re.search(r"pip install[^&;]*\btorch\b", ln)]
    assert len(torch) == 1
    i_torch, ln = torch[0]
    assert "torch==2.13.0" in ln and f"--index-url https://download.pytorch.org/{index}" in ln
    i_sd = next(i for i, ln in pips if f"/src{extras}" in ln)
    assert i_torch < i_sd and "--constraint /src/deploy/constraints-" in lines[i_sd]
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


def test_readme_covers_choice_tunnel_sizing_metrics_and_validation() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in ("ssh -L 8787:127.0.0.1:8787", "/metrics", "dask_scheduler_workers",
                   "(chunk + 2·halo)²", "--batch-size", "local-cuda", "slurm-runner",
                   "kubernetes", "tls/README.md", ".performance.html", "--signal=B:TERM",
                   "What is validated", "never run"):
        assert needle in text, needle
