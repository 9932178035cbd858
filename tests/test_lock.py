"""Writer lock of an output store: exclusive, named, stale detection, released on every path.

The concurrency test runs two real ``python -m semdask segment`` processes on one
output: the second fails fast with the lock message while the first completes, and
the first's labels equal a clean run bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import ForeignOutputError, OutputLockedError
from semdask.inference.run import resolve
from semdask.inference.runner import InterruptedRun, drain_on_sigterm
from semdask.inference.segment import execute, segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import io as sio
from semdask.storage.integrity import LEDGER
from semdask.storage.ledger import verify
from semdask.storage.lock import (
    break_lock,
    lock_path,
    read_lock,
    stale_reason,
    writer_lock,
)
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pristine") / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((300, 420), seed=5, chunk=256))
    return p


@pytest.fixture
def mosaic(pristine: Path, tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    shutil.copytree(pristine, p)
    return p


def _fake_lock(out: Path, **fields: object) -> Path:
    """A lock file as another writer would have left it."""
    path = lock_path(out)
    rec = {"output": str(out), "group": "labels/phases", "owner": "someone",
           "host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 60,
           "process_start": None, "boot_id": None, "command": "semdask segment ...",
           "token": "f" * 32, **fields}
    path.write_text(json.dumps(rec))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ the lock itself


def test_second_writer_fails_fast_and_the_lock_is_released(tmp_path: Path) -> None:
    out = tmp_path / "o.ome.zarr"
    with writer_lock(out, group="labels/phases") as held:
        path = lock_path(out)
        assert path == tmp_path / "o.ome.zarr.semdask-lock" and path.is_file()
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["owner"] and info["command"] and info["group"] == "labels/phases"
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as e:
            writer_lock(tmp_path / "x" / ".." / "o.ome.zarr")  # another spelling, one lock
        assert time.monotonic() - t0 < 1.0
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "a running semdask segment holds" in msg and "semdask unlock" in msg
        assert e.value.exit_code == 73
        held.check()
    assert not path.exists()
    with pytest.raises(RuntimeError), writer_lock(out):
        raise RuntimeError("a failing run")
    assert not path.exists()  # released on the exception path too


def test_relative_and_symlinked_spellings_share_one_lock(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    with writer_lock("real/o.ome.zarr"), pytest.raises(OutputLockedError):
        writer_lock(tmp_path / "link" / "o.ome.zarr")


def test_stale_locks_are_named_never_broken_silently(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.ome.zarr"
    dead = _dead_pid()
    path = _fake_lock(out, pid=dead)
    assert stale_reason(read_lock(out)) == f"process {dead} is no longer running on " \
                                            f"{socket.gethostname()}"
    with pytest.raises(OutputLockedError, match="stale writer lock") as e:
        writer_lock(out)
    assert f"semdask unlock {out}" in str(e.value) and f"pid {dead}" in str(e.value)
    assert path.is_file()  # named, not broken
    # this hostname in another PID namespace (a container): its pid says nothing here
    _fake_lock(out, pid=dead, pid_ns=1)
    assert stale_reason(read_lock(out)) is None
    # another host: stale only after semdask.lock.stale-after seconds without a heartbeat
    _fake_lock(out, host="node-elsewhere")
    assert stale_reason(read_lock(out)) is None
    os.utime(path, (time.time() - 700, time.time() - 700))
    assert "no heartbeat from host node-elsewhere" in (stale_reason(read_lock(out)) or "")
    with dask.config.set({"semdask.lock.stale-after": 3600}):
        assert stale_reason(read_lock(out)) is None
    # our own pid, but a different process start time: the pid was reused
    _fake_lock(out, process_start=12.0)
    assert "pid was reused" in (stale_reason(read_lock(out)) or "")
    # a requeued SLURM job finds the lock of its own earlier run
    _fake_lock(out, host="node-a", slurm_job="4242", slurm_restart=0)
    assert stale_reason(read_lock(out)) is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "earlier run (restart 0) of this SLURM job 4242" in (stale_reason(read_lock(out))
                                                                  or "")


def test_unlock_removes_stale_locks_only_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "o.ome.zarr"
    assert break_lock(out) is None
    _fake_lock(out, pid=_dead_pid())
    r = CliRunner().invoke(main, ["unlock", str(out)])
    assert r.exit_code == 0 and "removed the writer lock" in r.output, r.output
    assert not lock_path(out).exists()
    _fake_lock(out)  # this (live) process
    r = CliRunner().invoke(main, ["unlock", str(out)])
    assert r.exit_code == 73 and "--force" in r.output, r.output
    assert lock_path(out).is_file()
    r = CliRunner().invoke(main, ["unlock", str(out), "--force"])
    assert r.exit_code == 0 and not lock_path(out).exists(), r.output


def test_heartbeat_and_a_broken_lock_is_noticed(tmp_path: Path) -> None:
    out = tmp_path / "o.ome.zarr"
    with writer_lock(out, heartbeat=0.05) as held:
        os.utime(held.path, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert time.time() - held.path.stat().st_mtime < 5  # touched again
        held.path.unlink()  # someone ran semdask unlock --force
        time.sleep(0.2)
        with pytest.raises(OutputLockedError, match="was removed while this run was writing"):
            held.check()
        _fake_lock(out, token="0" * 32)  # and a new writer took it
    assert read_lock(out) is not None  # release leaves the new writer's lock alone


# ------------------------------------------------------------------ segment holds it


def test_segment_releases_the_lock_on_every_exit_path(mosaic: Path, model_file: Path) -> None:
    path = lock_path(mosaic)
    seen: dict[str, bool] = {}

    def term_after_first_block() -> None:
        t0 = time.monotonic()
        while not list((mosaic / "labels/phases" / LEDGER).glob("b.*.json")):
            if time.monotonic() - t0 > 60:
                return
            time.sleep(0.02)
        seen["held while writing"] = path.is_file()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=term_after_first_block, daemon=True).start()
    with drain_on_sigterm(), dask.config.set({"semdask.testing.block-delay": 0.2}), \
            pytest.raises(InterruptedRun):
        segment(mosaic, model=model_file, chunk=128, progress=False)
    assert seen == {"held while writing": True}
    assert not path.exists()  # released after the drain (exit status 75)
    assert not verify(mosaic).ok  # the interrupted output stays incomplete
    with writer_lock(mosaic), pytest.raises(OutputLockedError, match="running semdask segment"):
        segment(mosaic, model=model_file, chunk=128, progress=False, resume=True)
    r = segment(mosaic, model=model_file, chunk=128, progress=False, resume=True)
    assert 0 < r.blocks_computed < 9 and not path.exists() and verify(mosaic).ok
    # foreign labels appear between resolve() and execute(): refused under the lock
    run = resolve(mosaic, model=model_file, name="manual", chunk=128)
    sio.write_labels(mosaic, np.zeros((300, 420), np.uint8), name="manual", classes=["a"])
    with pytest.raises(ForeignOutputError, match="labels/manual"):
        execute(run, progress=False)
    assert not path.exists()
    assert not np.asarray(sio.open_labels(mosaic, "manual").data.compute()).any()


# ------------------------------------------------------------------ two real processes


def _other_model(path: Path) -> Path:
    torch.manual_seed(11)
    m = UNet(widths=(4, 4, 8, 8, 8), dropout=(0, 0, 0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=0.04458, window=64, receptive_field=receptive_field(m))
    return save_model(m, cfg, path)


def _cli(args: list[str], delay: float = 0.0) -> subprocess.Popen[str]:
    env = {**os.environ, "DASK_SEMDASK__TESTING__BLOCK_DELAY": str(delay),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "semdask", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_second_writer_in_process_fails_while_the_first_writes(
        mosaic: Path, pristine: Path, model_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import semdask.inference.segment as seg

    clean = tmp_path / "clean.ome.zarr"
    shutil.copytree(pristine, clean)
    segment(clean, model=model_file, chunk=128, progress=False)
    reference = np.asarray(sio.open_labels(clean).data.compute())
    writing, go = threading.Event(), threading.Event()
    real = seg.run_blocks

    def paused(*args: object, **kw: object) -> int:  # the first writer pauses mid-run
        if not writing.is_set():
            writing.set()
            go.wait(120)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(seg, "run_blocks", paused)
    result: dict[str, object] = {}
    first = threading.Thread(target=lambda: result.update(r=segment(
        mosaic, model=model_file, chunk=128, progress=False)))
    first.start()
    try:
        assert writing.wait(120)
        other = _other_model(tmp_path / "other.safetensors")
        for kw in ({"model": other, "overwrite": True}, {"model": model_file, "resume": True}):
            with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
                segment(mosaic, chunk=128, progress=False, **kw)  # type: ignore[arg-type]
    finally:
        go.set()
        first.join(120)
    assert "r" in result and not lock_path(mosaic).exists()
    np.testing.assert_array_equal(np.asarray(sio.open_labels(mosaic).data.compute()), reference)
    assert verify(mosaic).ok


@pytest.mark.slow  # three CLI processes: about 15 s on an idle 2-core machine, 60 s loaded
def test_two_processes_one_output_second_fails_fast(mosaic: Path, pristine: Path,
                                                    model_file: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean.ome.zarr"
    shutil.copytree(pristine, clean)
    segment(clean, model=model_file, chunk=128, progress=False)
    reference = np.asarray(sio.open_labels(clean).data.compute())
    other = _other_model(tmp_path / "other.safetensors")
    base = ["segment", str(mosaic), "--chunks", "128", "--no-cluster"]
    first = _cli([*base, "--model", str(model_file)], delay=0.2)
    try:
        t0 = time.monotonic()
        while not lock_path(mosaic).is_file():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.01)
        # freeze the first writer (a stopped process is alive) for as long as the rivals take
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and lock_path(mosaic).is_file()
        rivals = [_cli([*base, "--model", str(other), "--overwrite"]),
                  _cli([*base, "--model", str(model_file), "--resume"])]
        errs = [p.communicate(timeout=300)[1] for p in rivals]
        for p, err in zip(rivals, errs, strict=True):
            assert p.returncode == 73, err
            assert f"pid {first.pid}" in err and "a running semdask segment holds" in err, err
            assert "Traceback" not in err
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert not lock_path(mosaic).exists()
    np.testing.assert_array_equal(np.asarray(sio.open_labels(mosaic).data.compute()), reference)
    a = verify(mosaic)
    assert a.ok, a.table()
    head = json.loads((mosaic / "labels/phases" / LEDGER / "zarr.json").read_text())
    assert head["attributes"]["semdask-ledger"]["model"] == segment(
        clean, model=model_file, chunk=128, progress=False, resume=True).model_sha256
