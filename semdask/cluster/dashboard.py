"""Scheduler side of the live block map: a SchedulerPlugin, its web page and Prometheus gauges.

:class:`BlocksPlugin` runs inside the Dask scheduler (registered by
:func:`semdask.cluster.monitor.register_dashboard`). It learns about a segmentation run
from one ``semdask-blocks`` event that the driver logs
(``client.log_event``: block grid, task keys, a thumbnail of the mosaic), then
follows the per-block write tasks through the scheduler's own task transitions,
so the states are right whether the scheduler is local or remote:

    pending   not submitted yet
    running   submitted (its inference is queued or running) or being written
    done      written and recorded in the ledger
    failed    the task erred

On the scheduler's dashboard server (127.0.0.1 by default; no authentication) it
serves

    /semdask/blocks        an HTML page: block states over a mosaic thumbnail,
                           refreshed every second by polling the JSON
    /semdask/blocks.json   the states (``?run=ID``; default: the latest run)
    /semdask/blocks.png    the thumbnail

and, when ``prometheus-client`` is installed, adds ``semdask_blocks_done``,
``semdask_blocks_total``, ``semdask_blocks_failed`` and
``semdask_mpix_per_second`` (labels ``run``, ``output``) to the process's
default registry, i.e. to the scheduler's existing ``/metrics`` endpoint.

Examples
--------
>>> board = BlockBoard()
>>> board.announce({"op": "start", "run": "r1", "output": "m.ome.zarr/labels/phases",
...                 "shape": [64, 64], "thumbnail": "",
...                 "blocks": [["k-0-0", 0, 0, 0, 64, 0, 32, 1],
...                            ["k-0-1", 0, 1, 0, 64, 32, 64, 1]]})
>>> board.transition("k-0-0", "processing")
>>> board.transition("k-0-1", "memory")
>>> board.snapshot()["counts"]
{'pending': 0, 'running': 1, 'done': 1, 'failed': 0}
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

__all__ = ["PLUGIN_NAME", "ROUTE", "STATES", "TOPIC", "BlockBoard", "BlocksPlugin"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "semdask-blocks"
TOPIC = "semdask-blocks"
ROUTE = "/semdask/blocks"
STATES = ("pending", "running", "done", "failed")
_MAX_RUNS = 16  # runs kept per scheduler (oldest dropped first)
#: scheduler task state of a block's write task -> block state
_TASK_STATE = {"waiting": "running", "queued": "running", "no-worker": "running",
               "processing": "running", "memory": "done", "erred": "failed"}


@dataclass
class _Run:
    run: str
    output: str
    shape: tuple[int, int]
    blocks: list[list[int]]  # [iy, ix, y0, y1, x0, x1] per block
    states: list[str]
    todo: list[bool]
    thumbnail: bytes
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"
    computed_px: int = 0

    def counts(self) -> dict[str, int]:
        return {s: self.states.count(s) for s in STATES}

    def mpix_per_s(self) -> float:
        secs = (self.finished or time.time()) - self.started
        return self.computed_px / 1e6 / secs if secs > 0 else 0.0


class BlockBoard:
    """Block states of the recent runs (thread-safe; fed by events and task transitions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._keys: dict[str, tuple[str, int]] = {}

    def announce(self, msg: dict[str, Any]) -> None:
        """Apply a driver event: ``{"op": "start", ...}`` or ``{"op": "finish", ...}``."""
        op, run = msg.get("op"), str(msg.get("run", ""))
        with self._lock:
            if op == "start":
                self._start(run, msg)
            elif op == "finish" and run in self._runs:
                r = self._runs[run]
                r.finished, r.status = time.time(), str(msg.get("status", "done"))

    def _start(self, run: str, msg: dict[str, Any]) -> None:
        rows = [list(map(int, b[1:8])) for b in msg["blocks"]]
        thumb = base64.b64decode(msg.get("thumbnail") or b"")
        h, w = (int(v) for v in msg["shape"])
        self._runs[run] = _Run(run, str(msg.get("output", "")), (h, w),
                               [r[:6] for r in rows],
                               ["pending" if r[6] else "done" for r in rows],
                               [bool(r[6]) for r in rows], thumb)
        for i, b in enumerate(msg["blocks"]):
            self._keys[str(b[0])] = (run, i)
        while len(self._runs) > _MAX_RUNS:
            old = next(iter(self._runs))
            del self._runs[old]
            self._keys = {k: v for k, v in self._keys.items() if v[0] != old}

    def transition(self, key: Any, finish: str) -> None:
        """Follow the scheduler state ``finish`` of task ``key`` (ignored unless a block's)."""
        where = self._keys.get(key) if isinstance(key, str) else None
        if where is None:
            return
        with self._lock:
            r = self._runs.get(where[0])
            if r is None:
                return
            i, old = where[1], r.states[where[1]]
            new = _TASK_STATE.get(finish)
            if new is None:  # released / forgotten: a cancelled block is pending again
                new = "pending" if old == "running" else old
            if new == "done" and old != "done" and r.todo[i]:
                y0, y1, x0, x1 = r.blocks[i][2:6]
                r.computed_px += (y1 - y0) * (x1 - x0)
            r.states[i] = new

    def runs(self) -> list[str]:
        """Run ids, oldest first."""
        with self._lock:
            return list(self._runs)

    def snapshot(self, run: str | None = None) -> dict[str, Any] | None:
        """JSON-ready state of ``run`` (default: the latest), None when unknown."""
        with self._lock:
            if run is None and self._runs:
                run = next(reversed(self._runs))
            r = self._runs.get(run) if run is not None else None
            if r is None:
                return None
            return {"run": r.run, "output": r.output, "shape": list(r.shape),
                    "status": r.status, "counts": r.counts(), "total": len(r.states),
                    "mpix_per_s": round(r.mpix_per_s(), 4), "runs": list(self._runs),
                    "blocks": [[*b, s] for b, s in zip(r.blocks, r.states, strict=True)]}

    def thumbnail(self, run: str | None = None) -> bytes:
        """The PNG thumbnail of ``run`` (default: the latest); empty when none."""
        with self._lock:
            if run is None and self._runs:
                run = next(reversed(self._runs))
            r = self._runs.get(run) if run is not None else None
            return r.thumbnail if r is not None else b""

    def samples(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """Gauge values per run: ``({"run", "output"}, {metric: value})``."""
        with self._lock:
            return [({"run": r.run, "output": r.output},
                     {"blocks_done": r.states.count("done"), "blocks_total": len(r.states),
                      "blocks_failed": r.states.count("failed"),
                      "mpix_per_second": r.mpix_per_s()}) for r in self._runs.values()]


# --- Prometheus: one collector per process over every live board ---------------------------

_BOARDS: weakref.WeakSet[BlockBoard] = weakref.WeakSet()
_COLLECTOR: list[Any] = []
_HELP = {"blocks_done": "Blocks written and recorded", "blocks_total": "Blocks of the run",
         "blocks_failed": "Blocks whose task failed",
         "mpix_per_second": "Megapixels segmented per second in this run"}


class _Collector:
    """Yields the semdask gauges of every board in this process (no describe: no clash)."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        fams = {m: GaugeMetricFamily(f"semdask_{m}", h, labels=["run", "output"])
                for m, h in _HELP.items()}
        for board in list(_BOARDS):
            for labels, values in board.samples():
                for m, v in values.items():
                    fams[m].add_metric([labels["run"], labels["output"]], float(v))
        yield from fams.values()


def _register_collector(board: BlockBoard) -> bool:
    """Add ``board`` to the process-wide collector (registered once); False without prometheus."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    _BOARDS.add(board)
    if not _COLLECTOR:
        _COLLECTOR.append(_Collector())
        REGISTRY.register(_COLLECTOR[0])
    return True


# --- web page ------------------------------------------------------------------------------

class _Handler(web.RequestHandler):
    def initialize(self, board: BlockBoard) -> None:
        self.board = board

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")


class _PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(_PAGE)


class _JsonHandler(_Handler):
    def get(self) -> None:
        snap = self.board.snapshot(self.get_argument("run", None))
        self.set_header("Content-Type", "application/json")
        if snap is None:
            self.set_status(404)
            snap = {"error": "no such semdask run", "runs": self.board.runs()}
        self.write(json.dumps(snap))


class _ThumbHandler(_Handler):
    def get(self) -> None:
        png = self.board.thumbnail(self.get_argument("run", None))
        if not png:
            raise web.HTTPError(404)
        self.set_header("Content-Type", "image/png")
        self.write(png)


class BlocksPlugin(SchedulerPlugin):
    """Scheduler plugin behind the live block map and the semdask Prometheus gauges."""

    name = PLUGIN_NAME
    idempotent = True  # registering again keeps the running plugin (and its state)

    def __init__(self) -> None:
        self.board: BlockBoard | None = None  # built on the scheduler (a lock does not pickle)

    async def start(self, scheduler: Any) -> None:
        self.board = BlockBoard()
        _register_collector(self.board)
        app = getattr(scheduler, "http_application", None)
        if app is None:
            log.info("scheduler serves no HTTP: the semdask block map is unavailable")
            return
        kw = {"board": self.board}
        app.add_handlers(r".*", [(ROUTE, _PageHandler, kw), (ROUTE + ".json", _JsonHandler, kw),
                                 (ROUTE + ".png", _ThumbHandler, kw)])

    async def close(self) -> None:
        if self.board is not None:
            _BOARDS.discard(self.board)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC and isinstance(msg, dict) and self.board is not None:
            try:
                self.board.announce(msg)
            except (KeyError, TypeError, ValueError) as e:  # never break the scheduler
                log.warning("ignoring a malformed semdask-blocks event: %s", e)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if self.board is not None:
            self.board.transition(key, finish)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>semdask blocks</title>
<style>
body{font-family:sans-serif;margin:1em;background:#fafafa;color:#222}
canvas{border:1px solid #888;background:#ddd}
.k{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}
</style></head>
<body><h3>semdask block map <small id="out"></small></h3>
<div id="legend"></div><p id="stat">waiting for a semdask run...</p>
<canvas id="map" width="640" height="640"></canvas>
<script>
"use strict";
const COL = {pending: "rgba(150,150,150,0.35)", running: "rgba(255,185,0,0.6)",
             done: "rgba(0,170,80,0.4)", failed: "rgba(220,20,20,0.75)"};
const img = new Image();
let last = null, imgRun = null;
img.onload = () => { if (last) draw(last); };
document.getElementById("legend").innerHTML = Object.keys(COL).map(
  s => `<span class="k" style="background:${COL[s]}"></span>${s}`).join("");
function draw(s) {
  last = s;
  if (s.run !== imgRun) { imgRun = s.run; img.src = "blocks.png?run=" + encodeURIComponent(s.run); }
  const c = document.getElementById("map"), g = c.getContext("2d");
  const h = s.shape[0], w = s.shape[1], sc = 640 / Math.max(h, w);
  c.width = Math.max(1, Math.round(w * sc)); c.height = Math.max(1, Math.round(h * sc));
  if (img.complete && img.naturalWidth) g.drawImage(img, 0, 0, c.width, c.height);
  else { g.fillStyle = "#ccc"; g.fillRect(0, 0, c.width, c.height); }
  g.strokeStyle = "rgba(255,255,255,0.8)"; g.lineWidth = 1;
  for (const b of s.blocks) {
    const [iy, ix, y0, y1, x0, x1, st] = b;
    g.fillStyle = COL[st] || "magenta";
    g.fillRect(x0 * sc, y0 * sc, (x1 - x0) * sc, (y1 - y0) * sc);
    g.strokeRect(x0 * sc, y0 * sc, (x1 - x0) * sc, (y1 - y0) * sc);
  }
  const n = s.counts;
  document.getElementById("out").textContent = s.output + " (run " + s.run + ", " + s.status + ")";
  document.getElementById("stat").textContent = `${n.done} / ${s.total} done, ${n.running} ` +
    `running, ${n.pending} pending, ${n.failed} failed; ${s.mpix_per_s.toFixed(2)} MPix/s`;
}
async function tick() {
  try {
    const r = await fetch("blocks.json" + location.search, {cache: "no-store"});
    if (r.ok) draw(await r.json());
    else document.getElementById("stat").textContent = "no semdask run on this scheduler yet";
  } catch (e) {
    document.getElementById("stat").textContent = "scheduler unreachable: " + e;
  }
}
tick(); setInterval(tick, 1000);
</script></body></html>
"""
