"""Monitoring: live block map on the scheduler, Prometheus gauges, forwarded worker logs."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import torch

from semdask.cluster import monitor
from semdask.cluster.dashboard import BlockBoard
from semdask.inference.segment import segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import io as sio
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic

prometheus_client = pytest.importorskip("prometheus_client")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _sample(name: str, run: str) -> float | None:
    for fam in prometheus_client.REGISTRY.collect():
        for s in fam.samples:
            if s.name == name and s.labels.get("run") == run:
                return float(s.value)
    return None


def _fail(x: int) -> int:
    raise RuntimeError(f"block {x} broke")


@pytest.fixture
def client() -> Iterator[Any]:
    """An in-process cluster whose dashboard listens on a random 127.0.0.1 port."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address="127.0.0.1:0") as lc, Client(lc) as c:
        yield c


def _snap(b: BlockBoard, run: str | None = None) -> dict[str, Any]:
    snap = b.snapshot(run)
    assert snap is not None
    return snap


def test_board_follows_task_states() -> None:
    b = BlockBoard()
    blocks = [["a", 0, 0, 0, 10, 0, 10, 1], ["b", 0, 1, 0, 10, 10, 20, 1],
              ["", 1, 0, 10, 20, 0, 10, 0]]  # the last one was done by an earlier run
    b.announce({"op": "start", "run": "r", "output": "o", "shape": [20, 20], "blocks": blocks})
    assert _snap(b, "r")["counts"] == {"pending": 2, "running": 0, "done": 1, "failed": 0}
    b.transition("a", "waiting")
    b.transition("b", "processing")
    b.transition("b", "released")  # cancelled (drain): pending again
    b.transition(("x", 0), "memory")  # not a block: ignored
    assert [s[-1] for s in _snap(b)["blocks"]] == ["running", "pending", "done"]
    b.transition("a", "memory")
    b.transition("a", "released")  # the result is released: still done
    b.transition("b", "erred")
    snap = _snap(b)
    assert [s[-1] for s in snap["blocks"]] == ["done", "failed", "done"]
    assert snap["mpix_per_s"] > 0 and snap["status"] == "running"
    b.announce({"op": "finish", "run": "r", "status": "failed"})
    assert _snap(b)["status"] == "failed" and b.snapshot("nope") is None
    (labels, values), = b.samples()
    assert labels == {"run": "r", "output": "o"}
    assert (values["blocks_done"], values["blocks_total"], values["blocks_failed"]) == (2, 3, 1)


def test_block_map_page_json_and_gauges(client: Any, tmp_path: Path) -> None:
    """Push a run, compute some of its tasks, read the page, the JSON and the registry."""
    p = tmp_path / "m.ome.zarr"
    m = sio.write_synthetic(p, synthetic_mosaic((96, 128), seed=2, chunk=64))
    blocks = {(iy, ix): ((iy * 48, iy * 48 + 48), (ix * 64, ix * 64 + 64))
              for iy in range(2) for ix in range(2)}
    todo = sorted(blocks)
    tasks = [dask.delayed(_fail if idx == (1, 1) else int, pure=False)(
        idx[0], dask_key_name=f"semdask-write-feed0123-{idx[0]}-{idx[1]}") for idx in todo]
    with monitor.watch_blocks(client, output=p, group="labels/phases", blocks=blocks,
                              todo=todo, tasks=tasks, mosaic=m) as w:
        port = client.scheduler_info()["services"]["dashboard"]
        assert w.active and w.run == "feed0123"
        assert w.link.endswith(f":{port}/semdask/blocks?run=feed0123")
        base = f"http://127.0.0.1:{port}/semdask/blocks"  # the dashboard listens on 127.0.0.1
        st, body = _get(base + ".json?run=feed0123")
        assert st == 200 and json.loads(body)["counts"]["pending"] == 4
        client.compute(tasks[0]).result()
        client.compute(tasks[1]).result()
        with pytest.raises(RuntimeError, match="broke"):
            client.compute(tasks[3]).result()
        st, body = _get(base + ".json?run=feed0123")
    snap = json.loads(body)
    assert st == 200 and snap["output"] == f"{p}/labels/phases" and snap["shape"] == [96, 128]
    assert {(b[0], b[1]): b[-1] for b in snap["blocks"]} == {
        (0, 0): "done", (0, 1): "done", (1, 0): "pending", (1, 1): "failed"}
    assert _sample("semdask_blocks_done", "feed0123") == 2
    assert _sample("semdask_blocks_failed", "feed0123") == 1
    assert _sample("semdask_blocks_total", "feed0123") == 4
    assert (_sample("semdask_mpix_per_second", "feed0123") or 0) > 0
    st, html = _get(base)
    assert st == 200 and b"semdask block map" in html and b"blocks.json" in html
    st, png = _get(base + ".png?run=feed0123")
    assert st == 200 and png[:4] == b"\x89PNG"
    assert _get(base + ".json?run=unknown")[0] == 404
    # the scheduler's own /metrics endpoint carries the gauges (scheduler in this process)
    st, text = _get(base.replace("/semdask/blocks", "/metrics"))
    assert st == 200 and b'semdask_blocks_done{output="' in text
    st, body = _get(base + ".json?run=feed0123")
    assert json.loads(body)["status"] == "done"  # announced on leaving the block


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    m = UNet(widths=(4, 8), dropout=(0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=0.04458, window=32, receptive_field=receptive_field(m))
    return save_model(m, cfg, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_segment_logs_block_map_and_counts_blocks(client: Any, tmp_path: Path,
                                                   model_file: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((128, 192), seed=4, chunk=64))
    with caplog.at_level(logging.INFO, logger="semdask"):
        r = segment(p, model=model_file, chunk=64, client=client, progress=False)
    links = [rec.getMessage().split(": ", 1)[1] for rec in caplog.records
             if rec.getMessage().startswith("live block map: ")]
    port = client.scheduler_info()["services"]["dashboard"]
    assert len(links) == 1 and f":{port}/semdask/blocks?run=" in links[0]
    run = links[0].rsplit("=", 1)[1]
    snap = json.loads(_get(f"http://127.0.0.1:{port}/semdask/blocks.json?run={run}")[1])
    assert r.blocks_total == 6 and snap["counts"]["done"] == 6 and snap["status"] == "done"
    assert _sample("semdask_blocks_done", run) == _sample("semdask_blocks_total", run) == 6
    assert _sample("semdask_blocks_failed", run) == 0


def test_serve_metrics_on_localhost() -> None:
    b = BlockBoard()
    b.announce({"op": "start", "run": "srv1", "output": "x", "shape": [8, 8],
                "blocks": [["k", 0, 0, 0, 8, 0, 8, 1]]})
    from semdask.cluster.dashboard import _register_collector

    _register_collector(b)
    server, thread = monitor.serve_metrics(0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        st, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert st == 200
        assert b'semdask_blocks_total{output="x",run="srv1"} 1.0' in text
    finally:
        server.shutdown()
        thread.join(5)


def test_worker_logs_reach_the_driver() -> None:
    from distributed import Client, LocalCluster

    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    handler, lg = Keep(), logging.getLogger("semdask")
    lg.addHandler(handler)
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as lc, Client(lc) as c:
            assert monitor.attach(c, level=logging.INFO)
            c.submit(logging.getLogger("semdask.remote").info, "hello from %s", "a worker",
                     pure=False).result()
            deadline = time.monotonic() + 15
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        lg.removeHandler(handler)
    (rec,) = [r for r in got if r.name == "semdask.remote"]
    assert rec.getMessage() == "hello from a worker" and rec.levelno == logging.INFO
    assert str(getattr(rec, "worker", "")).startswith("tcp://127.0.0.1:")


def test_attach_skips_in_process_workers(client: Any) -> None:
    assert monitor.attach(client) is False  # forwarding would echo records forever
    assert monitor.attach(None) is False


def test_thumbnail_picks_a_coarse_level() -> None:
    import io

    from PIL import Image

    big, small = np.zeros((4000, 4000), np.uint8), np.arange(250 * 300).reshape(250, 300)
    png = monitor.thumbnail_png([big, small], max_px=400)
    assert Image.open(io.BytesIO(png)).size == (300, 250)
    png = monitor.thumbnail_png([np.ones((1000, 900), np.float32)], max_px=400)
    assert Image.open(io.BytesIO(png)).size == (300, 334)
