"""Cluster profiles: resolution from config/env/keywords, builders, reports, metrics (offline)."""

from __future__ import annotations

import os
import sys
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.config
import pytest
import yaml
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.cluster import connect as cluster
from semdask.errors import InputError


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """monkeypatch for DASK_* variables; the dask config is refreshed after the test."""
    yield monkeypatch
    monkeypatch.undo()
    dask.config.refresh()


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with cluster.connect(profile="local", n_workers=1, dashboard_address="127.0.0.1:0") as c:
        yield c


# --- resolution -------------------------------------------------------------------------------

def test_packaged_defaults_and_gpu_flags() -> None:
    assert cluster.resolve_profile() == "local"
    slurm = cluster.profile_config("slurm")
    assert slurm["walltime"] == "02:00:00"
    assert slurm["job-extra-directives"] == ["--gres=gpu:1"]
    gpu = {p: cluster.profile_has_gpu_workers(p) for p in cluster.PROFILES}
    assert gpu == {"local": False, "local-cuda": True, "slurm": True, "slurm-runner": True,
                   "kubernetes": True, "address": False, "scheduler-file": False}
    assert cluster.profile_has_gpu_workers(scheduler_address="tcp://h:8786") is False


def test_env_overrides_config_and_keywords_win(env: pytest.MonkeyPatch) -> None:
    env.setenv("DASK_SEMDASK__CLUSTER__PROFILES__SLURM__QUEUE", "gpu-long")
    env.setenv("DASK_SEMDASK__CLUSTER__PROFILES__SLURM__CORES", "16")
    env.setenv("DASK_SEMDASK__CLUSTER__PROFILES__LOCAL_CUDA__GPU_RESOURCES", "False")
    env.setenv("DASK_SEMDASK__CLUSTER__PROFILE", "slurm")
    dask.config.refresh()
    cfg = cluster.profile_config("slurm")
    assert (cfg["queue"], cfg["cores"], cfg["walltime"]) == ("gpu-long", 16, "02:00:00")
    assert cluster.resolve_profile() == "slurm"
    assert not cluster.profile_has_gpu_workers("local-cuda")
    cfg = cluster.profile_config("slurm", queue="debug", job_extra_directives=["--gpus=2"])
    assert (cfg["queue"], cfg["job-extra-directives"]) == ("debug", ["--gpus=2"])
    with dask.config.set({"semdask.cluster.profiles.slurm.walltime": "00:05:00"}):
        assert cluster.profile_config("slurm")["walltime"] == "00:05:00"


def test_profile_names_and_conflicts() -> None:
    assert cluster.resolve_profile("Local_CUDA") == "local-cuda"
    assert cluster.resolve_profile(scheduler_file="s.json") == "scheduler-file"
    with pytest.raises(InputError, match=r"one of local, local-cuda.*Fix: connect\(profile="):
        cluster.resolve_profile("slurmm")
    with pytest.raises(InputError, match="drop --profile"):
        cluster.resolve_profile("slurm", scheduler_address="tcp://h:8786")
    with pytest.raises(InputError, match="only one"):
        cluster.resolve_profile(scheduler_address="tcp://h:1", scheduler_file="f")


# --- optional packages -------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "module", "fix"), [
    ("local-cuda", "dask_cuda", "pip install 'semdask[gpu]'"),
    ("slurm", "dask_jobqueue", "pip install 'semdask[cluster]'"),
    ("kubernetes", "dask_kubernetes", "pip install 'semdask[k8s]'"),
])
def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, profile: str,
                                             module: str, fix: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(InputError) as e, cluster.connect(profile=profile):
        pass  # pragma: no cover
    assert fix in str(e.value)
    assert e.value.fix is not None


def test_slurm_runner_outside_an_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(InputError, match="sbatch"), cluster.connect(profile="slurm-runner"):
        pass  # pragma: no cover


def test_address_profile_needs_an_address(env: pytest.MonkeyPatch) -> None:
    env.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    dask.config.refresh()
    with pytest.raises(InputError, match="--scheduler-address"), \
            cluster.connect(profile="address"):
        pass  # pragma: no cover


# --- builders with stand-in classes (no GPU, no Kubernetes here) -------------------------------

class _Fake:
    calls: list[tuple[str, dict[str, Any]]]

    def __init__(self, **kw: Any) -> None:
        self.calls = [("init", kw)]

    def add_worker_group(self, **kw: Any) -> None:
        self.calls.append(("add_worker_group", kw))

    def adapt(self, **kw: Any) -> None:
        self.calls.append(("adapt", kw))


def test_local_cuda_workers_carry_gpu_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=_Fake))
    cfg = cluster.profile_config("local-cuda", cuda_visible_devices=[0, 1], n_workers=2)
    kw = cluster._build("local-cuda", cfg).calls[0][1]
    assert kw["resources"] == {"GPU": 1}
    assert (kw["CUDA_VISIBLE_DEVICES"], kw["n_workers"], kw["host"]) == ("0,1", 2, "127.0.0.1")
    assert kw["dashboard_address"].startswith("127.0.0.1:")
    assert "gpu_resources" not in kw and "cuda_visible_devices" not in kw
    cores = len(os.sched_getaffinity(0))
    assert kw["threads_per_worker"] == max(1, min(8, cores // 2))  # auto: cores per GPU


def test_local_cuda_threads_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=_Fake))
    cfg = cluster.profile_config("local-cuda", cuda_visible_devices="0", threads_per_worker=3)
    assert cluster._build("local-cuda", cfg).calls[0][1]["threads_per_worker"] == 3
    cfg = cluster.profile_config("local-cuda", threads_per_worker=0)
    with pytest.raises(InputError, match="threads-per-worker"):
        cluster._build("local-cuda", cfg)


def test_kubernetes_gpu_worker_group(monkeypatch: pytest.MonkeyPatch) -> None:
    op = types.SimpleNamespace(KubeCluster=_Fake)
    monkeypatch.setitem(sys.modules, "dask_kubernetes", types.SimpleNamespace(operator=op))
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", op)
    cfg = cluster.profile_config("kubernetes", image="reg/semdask:gpu", n_workers=3,
                                 adapt={"minimum": 1, "maximum": 4})
    calls = dict(cluster._build("kubernetes", cfg).calls)
    assert calls["init"]["image"] == "reg/semdask:gpu"
    assert calls["init"]["n_workers"] == 1  # CPU worker group
    group = calls["add_worker_group"]
    assert (group["name"], group["n_workers"]) == ("gpu", 3)
    assert group["worker_command"][-2:] == ["--resources", "GPU=1"]
    assert group["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the CRD types it a string
    assert calls["adapt"] == {"minimum": 1, "maximum": 4}


def test_slurm_job_script_of_the_profile(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    env.chdir(tmp_path)
    script = cluster.job_script("slurm", queue="gpu", account="proj1",
                                worker_extra_args=["--resources", "GPU=1"])
    for line in ("#SBATCH -p gpu", "#SBATCH -A proj1", "#SBATCH -t 02:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem="):
        assert line in script, script
    assert script.count("--resources GPU=1") == 1  # not added twice
    with pytest.raises(InputError, match=r"cores=8, memory="):
        cluster.job_script("slurm", cores=0, memory="0")
    with pytest.raises(InputError, match="a profile of kind slurm"):
        cluster.job_script("local")


SITE_PROFILES = """
semdask:
  cluster:
    profiles:
      slurm-gpu: {kind: slurm, queue: gpu, walltime: "04:00:00"}
      slurm-cpu:
        kind: slurm
        queue: cpu
        job-extra-directives: []
        gpu-resources: false
      laptop: {kind: local, n-workers: 1, threads-per-worker: 2}
      broken: {kind: pbs}
"""


@pytest.fixture
def site_profiles(tmp_path: Path) -> Iterator[None]:
    """A site's YAML that defines several named profiles of the same kinds."""
    (tmp_path / "site.yaml").write_text(SITE_PROFILES)
    site = dask.config.collect([str(tmp_path / "site.yaml")], env={})
    profiles = site["semdask"]["cluster"]["profiles"]  # merged like ~/.config/dask/*.yaml
    with dask.config.set({f"semdask.cluster.profiles.{k}": v for k, v in profiles.items()}):
        yield


def test_site_defines_named_profiles_of_one_kind(site_profiles: None) -> None:
    from semdask.cluster.profiles import profile_kind, profile_names

    names = profile_names()
    assert names[: len(cluster.PROFILES)] == cluster.PROFILES
    assert {"slurm-gpu", "slurm-cpu", "laptop"} <= set(names)
    assert profile_kind("slurm-gpu") == profile_kind("slurm-cpu") == "slurm"
    gpu, cpu = cluster.profile_config("slurm-gpu"), cluster.profile_config("slurm-cpu")
    # each starts from the packaged slurm defaults, then its own keys
    assert gpu["queue"] == "gpu" and gpu["walltime"] == "04:00:00" and gpu["cores"] == 8
    assert cpu["queue"] == "cpu" and cpu["walltime"] == "02:00:00"
    assert cluster.profile_has_gpu_workers("slurm-gpu")
    assert not cluster.profile_has_gpu_workers("slurm-cpu")
    kw = cluster.local_cluster_kwargs(profile="laptop")
    assert (kw["n_workers"], kw["threads_per_worker"]) == (1, 2)
    with pytest.raises(InputError, match="kind: one of local, local-cuda, slurm"):
        cluster.profile_config("broken")
    with pytest.raises(InputError, match="slurm-gpu"):  # the error lists the site's profiles
        cluster.resolve_profile("slurm-gpx")


def test_job_script_of_a_named_slurm_profile(site_profiles: None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)
    gpu, cpu = cluster.job_script("slurm-gpu"), cluster.job_script("slurm-cpu")
    assert "#SBATCH -p gpu" in gpu and "#SBATCH -t 04:00:00" in gpu and "--resources GPU=1" in gpu
    assert "#SBATCH -p cpu" in cpu and "--gres" not in cpu and "GPU=1" not in cpu
    r = CliRunner().invoke(main, ["cluster-info", "--profile", "slurm-cpu"])
    assert r.exit_code == 0, r.output
    info = yaml.safe_load(r.output.split("# job script")[0])
    assert info["kind"] == "slurm" and info["settings"]["queue"] == "cpu"
    assert "#SBATCH -p cpu" in r.output


# --- a real local cluster -----------------------------------------------------------------------

def test_local_profile_starts_on_loopback(client: Any) -> None:
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 1 and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    assert cluster.dashboard_link(client).startswith("http://127.0.0.1:")
    assert client.submit(sum, [1, 2]).result() == 3


def test_prometheus_metrics_on_the_dashboard_port(client: Any) -> None:
    pytest.importorskip("prometheus_client")
    url = cluster.dashboard_link(client).replace("/status", "/metrics")
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    assert "dask_scheduler_workers" in text


def test_performance_report_beside_the_output(client: Any, tmp_path: Path) -> None:
    out = cluster.performance_report_path(tmp_path / "a.ome.zarr")
    assert out == tmp_path / "a.ome.zarr.performance.html"
    with cluster.report(client, out) as path:
        dask.compute(dask.delayed(sum)([1, 2]))
    assert path == out and out.stat().st_size > 0
    with cluster.report(None, tmp_path / "b.html") as none:
        assert none is None
    assert not (tmp_path / "b.html").exists()
    with cluster.report(client, tmp_path / "missing-dir" / "c.html"):
        pass  # an unwritable report is logged, never raised


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_cluster_info_prints_yaml_and_job_script(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(main, ["cluster-info", "--profile", "local_cuda"])
    assert r.exit_code == 0, r.output
    info = yaml.safe_load(r.output)
    assert info["profile"] == "local-cuda" and info["gpu-workers"] is True
    assert info["settings"]["gpu-resources"] is True
    r = CliRunner().invoke(main, ["cluster-info", "--profile", "nope"])
    assert r.exit_code == 2 and "--profile local" in r.output
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["cluster-info", "--profile", "slurm"])
    assert r.exit_code == 0, r.output
    assert "#SBATCH --gres=gpu:1" in r.output and "--resources GPU=1" in r.output


def test_cli_profile_option() -> None:
    for cmd in ("segment", "demo"):
        assert "--profile NAME" in CliRunner().invoke(main, [cmd, "--help"]).output
    r = CliRunner().invoke(main, ["segment", "x.ome.zarr", "--no-cluster", "--profile", "slurm"])
    assert r.exit_code == 2 and "exclude each other" in r.output
