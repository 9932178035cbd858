"""The in-process fast path (issue 13): small mosaics skip the LocalCluster, same outputs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.cluster.inprocess import in_process, threaded
from semdask.errors import InputError
from semdask.inference.graph import _subtile
from semdask.inference.runner import run_blocks
from semdask.inference.segment import segment
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic

NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def mosaic(tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((300, 420), seed=5, chunk=256))
    return p


@pytest.mark.skipif(not NO_GPU, reason="the fast path is CPU-only")
def test_in_process_only_without_cluster_options() -> None:
    assert in_process(4096 * 4096)
    for kw in ({"profile": "local"}, {"scheduler_address": "tcp://h:8786"},
               {"scheduler_file": "s.json"}, {"n_workers": 2},
               {"dashboard_address": "127.0.0.1:0"}, {"gpu": True}):
        assert not in_process(64, **kw), kw
    with dask.config.set({"semdask.cluster.in-process-max-mpix": 1}):
        assert in_process(1000 * 1000) and not in_process(1001 * 1000)
    with dask.config.set({"semdask.cluster.in-process-max-mpix": 0}):
        assert not in_process(1)
    with dask.config.set({"semdask.cluster.profile": "slurm"}):
        assert not in_process(1)


@pytest.mark.skipif(not NO_GPU, reason="the fast path is CPU-only")
def test_cli_segment_runs_in_process_and_equals_the_api(mosaic: Path, model_file: Path) -> None:
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--model", str(model_file),
                                  "--chunks", "128"])
    assert r.exit_code == 0, r.output
    assert "Dask dashboard" not in r.output  # no cluster was started
    assert not (mosaic.parent / "m.ome.zarr.performance.html").exists()
    a = np.asarray(sio.open_labels(mosaic).data.compute())
    segment(mosaic, model=model_file, chunk=64, name="other", progress=False)
    np.testing.assert_array_equal(a, sio.open_labels(mosaic, "other").data.compute())


def test_threads_run_every_block_and_fail_loud_after_the_others() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def block(i: int) -> int:
        if i == 2:
            raise ValueError("block 2 broke")
        with lock:
            seen.append(torch.get_num_threads())
        return i

    before = torch.get_num_threads()
    tasks = [dask.delayed(block)(i) for i in range(5)]
    with threaded(2), pytest.raises(ValueError, match="block 2 broke"):
        run_blocks(tasks, client=None, progress=False, mosaic=Path("m"), output=Path("o"),
                   inside=True, name="phases")
    assert len(seen) >= 2  # the blocks already running finished; no new one after the error
    assert set(seen) == {max(1, (os.cpu_count() or 1) // 2)}
    assert torch.get_num_threads() == before
    with threaded(1):
        assert run_blocks(tasks[:2], client=None, progress=False, mosaic=Path("m"),
                          output=Path("o"), inside=True, name="phases") == 2


def test_subtile_setting() -> None:
    assert _subtile() == -1
    with dask.config.set({"semdask.segment.tile": 0}):
        assert _subtile() == 0
    with dask.config.set({"semdask.segment.tile": 256}):
        assert _subtile() == 256
    with dask.config.set({"semdask.segment.tile": 100}), pytest.raises(InputError,
                                                                        match="multiple of 16"):
        _subtile()
