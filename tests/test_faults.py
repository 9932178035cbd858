"""Fault tests (local, CPU): a killed worker, a killed driver, a corrupt store, SIGTERM.

Each run writes 20 blocks (300 x 420 px, chunk 64 -> 96 px blocks). Blocks are slowed
down with the fault-injection hook ``semdask.testing.block-delay`` so that a fault
lands mid-run; every recovered output must equal a clean run bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import OutputLockedError
from semdask.inference.segment import segment
from semdask.storage import io as sio
from semdask.storage.integrity import LEDGER
from semdask.storage.ledger import Ledger, verify
from semdask.synthetic.sem import synthetic_mosaic

BLOCKS = 20


@pytest.fixture(scope="module", autouse=True)
def _window(window_mode: None) -> None:
    """These tests count blocks of the blended-window geometry (chunk 64 on the stride grid)."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pristine") / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((300, 420), seed=5, chunk=256))
    return p


@pytest.fixture(scope="module")
def reference(pristine: Path, model_file: Path) -> np.ndarray:
    """Labels of a clean, uninterrupted run (threaded scheduler)."""
    out = pristine.parent / "clean.ome.zarr"
    segment(pristine, model=model_file, output=out, chunk=64, progress=False)
    return np.asarray(sio.open_labels(out).data.compute())


@pytest.fixture
def mosaic(pristine: Path, tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    shutil.copytree(pristine, p)
    return p


def _records(p: Path) -> int:
    return len(list((p / "labels/phases" / LEDGER).glob("b.*.json")))


def _wait_for(pred, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def _cli(args: list[str], delay: float) -> subprocess.Popen[str]:
    env = {**os.environ, "DASK_SEMDASK__TESTING__BLOCK_DELAY": str(delay),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "semdask", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _same(p: Path, reference: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(sio.open_labels(p).data.compute()), reference)
    assert verify(p).ok, verify(p).table()


@pytest.fixture
def cluster() -> Iterator[object]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env={"OMP_NUM_THREADS": "1"}) as lc, \
            Client(lc) as client:
        yield client


def test_killed_worker_run_completes_identically(mosaic: Path, model_file: Path,
                                                 reference: np.ndarray, cluster: object) -> None:
    client = cluster
    killed: dict[str, int] = {}

    def kill_one_worker() -> None:
        _wait_for(lambda: _records(mosaic) >= 2)
        killed["at"] = _records(mosaic)
        addr = sorted(client.scheduler_info()["workers"])[0]  # type: ignore[attr-defined]
        pid = client.run(os.getpid, workers=[addr])[addr]  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)  # the nanny notices and starts a fresh worker
        killed["pid"] = pid

    t = threading.Thread(target=kill_one_worker, daemon=True)
    t.start()
    with dask.config.set({"semdask.testing.block-delay": 0.25}):
        r = segment(mosaic, model=model_file, chunk=64, client=client, progress=False)
    t.join(timeout=30)
    assert "pid" in killed and killed["at"] < BLOCKS, killed  # the kill landed mid-run
    assert killed["pid"] not in client.run(os.getpid).values()  # type: ignore[attr-defined]
    assert r.blocks_computed == BLOCKS
    _same(mosaic, reference)


def test_killed_driver_resume_recomputes_only_missing_blocks(
        mosaic: Path, model_file: Path, reference: np.ndarray) -> None:
    proc = _cli(["segment", str(mosaic), "--model", str(model_file), "--chunks", "64",
                 "--no-cluster"], delay=0.3)
    try:
        _wait_for(lambda: _records(mosaic) >= 4 or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    have = _records(mosaic)
    assert 4 <= have < BLOCKS
    assert not verify(mosaic).ok
    # the killed driver's writer lock is named as stale, never broken silently (test_lock.py)
    with pytest.raises(OutputLockedError, match=f"process {proc.pid} is no longer running"):
        segment(mosaic, model=model_file, chunk=64, resume=True, progress=False)
    assert CliRunner().invoke(main, ["unlock", str(mosaic)]).exit_code == 0
    r = segment(mosaic, model=model_file, chunk=64, resume=True, progress=False)
    assert r.blocks_computed == BLOCKS - have < BLOCKS
    _same(mosaic, reference)


def test_deleted_or_corrupt_shard_is_found_by_verify(mosaic: Path, model_file: Path,
                                                     reference: np.ndarray) -> None:
    segment(mosaic, model=model_file, chunk=64, progress=False)
    shards = mosaic / "labels/phases/0/c"
    (shards / "0" / "1").unlink()  # 96-px blocks in 96-px shards: block (0, 1)
    bad = shards / "2" / "3"
    data = bytearray(bad.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = os.urandom(64)
    bad.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(mosaic)])
    assert r.exit_code == 3, r.output
    a = verify(mosaic)
    assert set(a.problems) == {(0, 1), (2, 3)}, a.table()
    assert a.problems[(0, 1)] == "missing shard labels/phases"
    assert a.problems[(2, 3)].split()[0] in ("unreadable", "checksum")
    assert "--resume" in r.output
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--model", str(model_file),
                                  "--chunks", "64", "--no-cluster", "--resume"])
    assert r.exit_code == 0, r.output
    _same(mosaic, reference)


def test_sigterm_drains_and_resume_completes(mosaic: Path, model_file: Path,
                                             reference: np.ndarray) -> None:
    proc = _cli(["segment", str(mosaic), "--model", str(model_file), "--chunks", "64",
                 "--workers", "2", "--dashboard-address", "127.0.0.1:0"], delay=0.3)
    try:
        _wait_for(lambda: _records(mosaic) >= 2 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        at_signal = _records(mosaic)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert "interrupted; resumable with --resume" in err and "--resume" in err
    have = _records(mosaic)
    assert at_signal < have < BLOCKS  # the blocks in flight finished and recorded themselves
    a = verify(mosaic)
    # drained: every written block is recorded; the others are clean holes (no shards)
    assert set(a.problems.values()) == {"not recorded"}, a.table()
    assert len(a.problems) == BLOCKS - have
    shards = {tuple(int(i) for i in f.relative_to(mosaic / "labels/phases/0/c").parts)
              for f in (mosaic / "labels/phases/0/c").rglob("*") if f.is_file()}
    assert not shards & set(a.problems)
    assert len(Ledger(mosaic, "labels/phases").records()) == have
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--model", str(model_file),
                                  "--chunks", "64", "--no-cluster", "--resume"])
    assert r.exit_code == 0, r.output
    _same(mosaic, reference)


def test_sigterm_drains_the_threaded_scheduler_too(mosaic: Path, model_file: Path,
                                                   reference: np.ndarray) -> None:
    from semdask.inference.runner import EX_TEMPFAIL, InterruptedRun, drain_on_sigterm

    def term_after_first_block() -> None:
        _wait_for(lambda: _records(mosaic) >= 1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=term_after_first_block, daemon=True).start()
    with drain_on_sigterm(), dask.config.set({"semdask.testing.block-delay": 0.1}), \
            pytest.raises(InterruptedRun, match="resumable with --resume") as e:
        segment(mosaic, model=model_file, chunk=64, progress=False)
    assert e.value.exit_code == EX_TEMPFAIL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    have = _records(mosaic)
    assert 0 < have < BLOCKS
    r = segment(mosaic, model=model_file, chunk=64, resume=True, progress=False)
    assert r.blocks_computed == BLOCKS - have
    _same(mosaic, reference)
