"""Driver side of run monitoring: live block map, Prometheus gauges, forwarded worker logs.

Three hooks, each a no-op when it cannot work (monitoring never fails a run):

:func:`attach`
    For a client that semdask created: records logged by ``semdask.*`` inside
    tasks on the workers are forwarded to this process
    (``client.forward_logging``), at the level the driver shows.
:func:`watch_blocks`
    Around the block loop of :func:`semdask.inference.segment.segment`: registers the
    :class:`semdask.cluster.dashboard.BlocksPlugin` on the scheduler, announces the run
    (block grid, write-task keys, a PNG thumbnail of a coarse pyramid level) with
    one ``semdask-blocks`` event and logs the link of the live block map
    (``http://127.0.0.1:8787/semdask/blocks?run=ID``); on exit it logs how the run
    ended. The scheduler then follows the write tasks itself, so this works with a
    remote scheduler too (semdask must be importable there).
:func:`serve_metrics`
    Serve this process's Prometheus registry on ``127.0.0.1:PORT``. The gauges
    (``semdask_blocks_done``, ``semdask_blocks_total``, ``semdask_blocks_failed``,
    ``semdask_mpix_per_second``; labels ``run`` and ``output``) live where the
    scheduler runs: in this process for a LocalCluster, else on the scheduler's
    own ``/metrics`` (the dashboard port).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from semdask.errors import InputError

__all__ = ["BlockWatch", "attach", "block_map_link", "register_dashboard", "serve_metrics",
           "thumbnail_png", "watch_blocks"]

log = logging.getLogger(__name__)
_KEY = re.compile(r"^semdask-write-([0-9a-f]+)-\d+-\d+$")


def attach(client: Any, *, level: int | str | None = None) -> bool:
    """Forward ``semdask`` log records from tasks on the workers to this process.

    Parameters
    ----------
    client : distributed.Client
        A client that semdask created (its logging set-up is ours to change).
    level : int or str, optional
        The least severe level forwarded; default: what the driver's ``semdask``
        logger shows. The workers' ``semdask`` logger is lowered to it as well.

    Returns
    -------
    bool
        False when nothing was set up: no client, distributed older than
        2022.12, or workers running inside this process (their records are
        handled here already; forwarding them would echo each one forever).
    """
    if client is None or not hasattr(client, "forward_logging"):
        return False
    lvl = logging.getLogger("semdask").getEffectiveLevel() if level is None else level
    try:
        pids = client.run(os.getpid)
        if pids and all(p == os.getpid() for p in pids.values()):
            return False
        from distributed.diagnostics.plugin import WorkerPlugin

        class _Level(WorkerPlugin):  # applies to workers that join later, too
            idempotent = False

            def setup(self, worker: Any) -> None:
                logging.getLogger("semdask").setLevel(lvl)

        client.register_plugin(_Level(), name="semdask-log-level")
        client.forward_logging("semdask", level=lvl)
    except Exception as e:  # monitoring never fails a run
        log.warning("worker logs stay on the workers (forwarding failed: %s)", e)
        return False
    return True


def register_dashboard(client: Any) -> str:
    """Register the block-map plugin on ``client``'s scheduler; return the page URL.

    Registering again keeps the running plugin. The URL is empty when the
    scheduler serves no dashboard.
    """
    from semdask.cluster.dashboard import PLUGIN_NAME, BlocksPlugin

    client.register_plugin(BlocksPlugin(), name=PLUGIN_NAME)
    return block_map_link(client)


def block_map_link(client: Any, run: str | None = None) -> str:
    """URL of the block map on ``client``'s dashboard (empty without a dashboard).

    >>> class C: dashboard_link = "http://127.0.0.1:8787/status"
    >>> block_map_link(C(), "ab12")
    'http://127.0.0.1:8787/semdask/blocks?run=ab12'
    """
    from semdask.cluster.dashboard import ROUTE

    try:
        link = str(client.dashboard_link or "")
    except Exception:  # a scheduler without HTTP
        return ""
    if not link:
        return ""
    base = link[: -len("/status")] if link.endswith("/status") else link.rstrip("/")
    return base + ROUTE + (f"?run={run}" if run else "")


def thumbnail_png(levels: Sequence[Any], *, max_px: int = 400) -> bytes:
    """A greyscale PNG of the finest pyramid level that fits ``max_px`` (else strided).

    ``levels`` are the (y, x) arrays of a pyramid, finest first (numpy or dask,
    read here with the synchronous scheduler); intensities are stretched between
    the 1st and 99th percentiles.

    >>> png = thumbnail_png([np.arange(64 * 96).reshape(64, 96)], max_px=32)
    >>> png[:4] == b"\\x89PNG"
    True
    """
    from PIL import Image

    if not levels:
        raise InputError("thumbnail", expected="at least one pyramid level", got="none")
    fits = [a for a in levels if max(a.shape[-2:]) <= max_px]
    a = fits[0] if fits else levels[-1]
    step = max(1, -(-max(a.shape[-2:]) // max_px))
    a = a[..., ::step, ::step]
    x = np.asarray(a.compute(scheduler="sync") if hasattr(a, "compute") else a, np.float64)
    x = x.reshape(x.shape[-2:]) if x.ndim > 2 else x
    finite = x[np.isfinite(x)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    g = np.clip((np.nan_to_num(x, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((g * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class BlockWatch:
    """What :func:`watch_blocks` announced: ``run`` id and the block-map ``link``."""

    def __init__(self, run: str, link: str, active: bool) -> None:
        self.run, self.link, self.active = run, link, active

    def __repr__(self) -> str:
        return f"BlockWatch(run={self.run!r}, link={self.link!r}, active={self.active})"


@contextmanager
def watch_blocks(client: Any, *, output: Any, group: str,
                 blocks: Mapping[tuple[int, int], Any], todo: Sequence[tuple[int, int]],
                 tasks: Sequence[Any], mosaic: Any = None) -> Iterator[BlockWatch]:
    """Show the blocks of one run on the scheduler's block map while inside.

    Parameters
    ----------
    client : distributed.Client or None
        None (the threaded scheduler): nothing is shown.
    output, group
        The output store and label group (the ``output`` gauge label is both).
    blocks : mapping
        ``(iy, ix) -> ((y0, y1), (x0, x1))`` of every block (``ledger.block_slices``).
    todo, tasks : sequences of equal length
        The blocks to compute this run and their write tasks (``dask.delayed``; the
        key of each is followed on the scheduler). Blocks not in ``todo`` are done.
    mosaic : semdask.storage.io.Mosaic, optional
        Its coarse pyramid levels give the thumbnail (None: no picture).

    Yields
    ------
    BlockWatch
        ``active`` is False when the map could not be set up (logged, never raised).
    """
    run = _run_id(tasks)
    watch = BlockWatch(run, "", False)
    if client is None:
        yield watch
        return
    try:
        from semdask.cluster.dashboard import TOPIC

        register_dashboard(client)
        keys = {tuple(int(i) for i in b): str(t.key) for b, t in zip(todo, tasks, strict=True)}
        rows = [[keys.get(idx, ""), int(idx[0]), int(idx[1]), int(sl[0][0]), int(sl[0][1]),
                 int(sl[1][0]), int(sl[1][1]), int(idx in keys)]
                for idx, sl in sorted(blocks.items())]
        shape = (max((int(s[0][1]) for s in blocks.values()), default=0),
                 max((int(s[1][1]) for s in blocks.values()), default=0))
        levels = [mosaic.level(i) for i in range(mosaic.levels)] if mosaic is not None else []
        thumb = base64.b64encode(thumbnail_png(levels)).decode() if levels else ""
        client.log_event(TOPIC, {"op": "start", "run": run, "output": f"{output}/{group}",
                                 "shape": list(shape), "blocks": rows,
                                 "thumbnail": thumb})
        watch = BlockWatch(run, block_map_link(client, run), True)
        if watch.link:
            log.info("live block map: %s", watch.link)
    except Exception as e:  # monitoring never fails a run
        log.warning("live block map unavailable (%s: %s); the run goes on", type(e).__name__, e)
    status = "failed"
    try:
        yield watch
        status = "done"
    except BaseException as e:
        status = "interrupted" if type(e).__name__ in ("InterruptedRun",
                                                       "KeyboardInterrupt") else "failed"
        raise
    finally:
        if watch.active:
            try:
                client.log_event(TOPIC, {"op": "finish", "run": run, "status": status})
            except Exception as e:
                log.debug("could not announce the end of run %s: %s", run, e)


def serve_metrics(port: int, *, addr: str = "127.0.0.1") -> Any:
    """Serve this process's Prometheus registry on ``addr:port`` (needs prometheus-client).

    Returns the server object of ``prometheus_client.start_http_server``.
    """
    try:
        import prometheus_client
    except ImportError as e:
        raise InputError("--metrics-port", expected="prometheus-client installed",
                         got="no module prometheus_client",
                         fix="pip install 'semdask[cluster]' (or prometheus-client)") from e
    return prometheus_client.start_http_server(int(port), addr=addr)


def _run_id(tasks: Sequence[Any]) -> str:
    """The run token of segment's write-task keys (``semdask-write-RUN-iy-ix``), else new."""
    for t in tasks[:1]:
        m = _KEY.match(str(getattr(t, "key", "")))
        if m:
            return m.group(1)
    return uuid.uuid4().hex[:8]
