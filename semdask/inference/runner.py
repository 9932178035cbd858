"""Block runner: submit a segmentation's blocks a few at a time, with a SIGTERM drain.

:func:`run_blocks` submits the per-block tasks of one segmentation a few at a
time (twice the cluster's threads in flight), so after SIGTERM inside
:func:`drain_on_sigterm` no new block starts, the running ones finish writing
and recording, and :class:`InterruptedRun` (exit status 75, EX_TEMPFAIL) says
how to resume. Any failed block fails the run, after the running ones finished.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask

from semdask.errors import SemdaskError

__all__ = ["EX_TEMPFAIL", "InterruptedRun", "drain_on_sigterm", "run_blocks", "stop_requested"]

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75  # sysexits.h: temporary failure, try again (here: with --resume)
_STOP = threading.Event()


class InterruptedRun(SemdaskError):
    """A run drained after SIGTERM: every finished block is recorded; resume it."""

    exit_code = EX_TEMPFAIL


def stop_requested() -> bool:
    """True once SIGTERM arrived inside :func:`drain_on_sigterm`."""
    return _STOP.is_set()


@contextmanager
def drain_on_sigterm() -> Iterator[threading.Event]:
    """Turn SIGTERM into a drain request while the block is active (main thread only).

    The first SIGTERM sets the returned event: running segmentations start no new
    blocks, let the running ones finish and raise :class:`InterruptedRun`. A second
    SIGTERM terminates at once (the default action).
    """
    _STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield _STOP
        _STOP.clear()
        return

    def handler(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: draining (no new blocks; running blocks finish and record)")
        _STOP.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield _STOP
    finally:
        signal.signal(signal.SIGTERM, old)
        _STOP.clear()  # the request is consumed: later runs in this process go ahead


def run_blocks(tasks: Sequence[Any], *, client: Any, progress: bool, mosaic: Path,
               output: Path, inside: bool, name: str,
               pixels_per_block: float | None = None) -> int:
    """Run block tasks a few at a time; stop submitting after SIGTERM or a failure.

    Parameters
    ----------
    tasks : sequence of Delayed
        One write-and-record task per block.
    client : distributed.Client or None
        At most twice its threads in flight; None: threads in this process, one block per
        thread at a time (:func:`_run_threads`).
    progress : bool
        Report progress: a bar on a terminal, else log lines (:mod:`semdask.progress`).
    mosaic, output, inside, name
        For the resume command in the interruption message.
    pixels_per_block : float, optional
        Mean pixels of one block: the progress report adds MPix/s.

    Returns
    -------
    int
        Blocks written.

    Raises
    ------
    Exception
        The first failed block's error, after the running blocks finished (fail loud).
    InterruptedRun
        When a drain was requested (finished blocks are recorded; the groups stay
        incomplete until ``--resume``).
    """
    from semdask.progress import Progress

    done, error = 0, None
    bar = Progress(len(tasks), "segment", unit="block", enabled=progress,
                   pixels_per_unit=pixels_per_block)
    if client is not None:
        from distributed import as_completed

        pending = iter(tasks)
        running = as_completed()
        limit = max(2, 2 * sum(client.nthreads().values()))

        def submit() -> None:
            t = next(pending, None)
            if t is not None:
                running.add(client.compute(t))

        for _ in range(limit):
            submit()
        for fut in running:
            try:
                fut.result()
                done += 1
            except Exception as e:  # fail loud, after the running blocks are recorded
                log.error("block task %s failed: %s", fut.key, e)
                error = error or e
            bar.update(1)
            if error is None and not _STOP.is_set():
                submit()
    else:
        done, error = _run_threads(tasks, bar)
    bar.close(failed=error is not None or _STOP.is_set())
    if error is not None:
        raise error
    if _STOP.is_set():
        where = "" if inside else f" --output {output}"
        extra = "" if name == "phases" else f" --name {name}"
        raise InterruptedRun("interrupted; resumable with --resume",
                             got=f"{done} of {len(tasks)} blocks written and recorded",
                             fix=f"semdask segment {mosaic}{where}{extra} --resume")
    return done


def _run_threads(tasks: Sequence[Any], bar: Any) -> tuple[int, Exception | None]:
    """No client: one block per thread at a time, ``num_workers`` threads (default: cores).

    Each thread computes its block's graph synchronously, so a new block starts as soon
    as one finishes (no rounds waiting for their slowest block) and at most one block
    per thread is in memory. The blocks' sub-tiles run on ``num_workers`` shared threads
    (:func:`semdask.inference.tiled.subtile_pool`), so the last blocks of a run are not
    left to one thread each while the others idle. Stops submitting after SIGTERM or a
    failure.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    import torch

    from semdask.inference.tiled import subtile_pool

    n = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    done, error = 0, None
    pending = iter(tasks)
    before = torch.get_num_threads()  # the cores shared out: no oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    with subtile_pool(n), ThreadPoolExecutor(max_workers=n,
                                             thread_name_prefix="semdask-block") as pool:
        running: set[Future[Any]] = set()

        def submit() -> None:
            t = next(pending, None)
            if t is not None:
                running.add(pool.submit(dask.compute, t, scheduler="sync"))

        for _ in range(n):
            submit()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                running.discard(fut)
                try:
                    fut.result()
                    done += 1
                except Exception as e:  # fail loud, after the running blocks are recorded
                    log.error("block task failed: %s", e)
                    error = error or e
                bar.update(1)
                if error is None and not _STOP.is_set():
                    submit()
    torch.set_num_threads(before)
    return done, error
