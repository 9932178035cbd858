"""Progress reports: a bar on a terminal, log lines in batch logs, nothing with ``-q``.

A :class:`Progress` counts units of work (blocks, tasks, steps). Where it shows up
depends on the stream it would draw on:

* a terminal (TTY): a tqdm bar, redrawn in place;
* anything else (a SLURM or Kubernetes log file, a pipe, ``CliRunner``): one ``INFO``
  log line of the ``semdask.progress`` logger at most every ``interval`` seconds and at
  every ``step`` percent, e.g. ``segment: 37/64 blocks (58 %), 1.2 MPix/s, ETA 0:41``,
  and a final line when an earlier one was logged. No carriage returns;
* off: when :func:`configure` was called with ``quiet=True`` (``semdask -q``) or the
  caller passes ``enabled=False``.

:class:`DaskProgress` feeds a :class:`Progress` from the local dask schedulers
(threads, processes, synchronous); it replaces ``dask.diagnostics.ProgressBar``.

Examples
--------
>>> import io, logging
>>> buf = io.StringIO()
>>> h = logging.StreamHandler(buf)
>>> lg = logging.getLogger("semdask.progress")
>>> lg.addHandler(h); lg.setLevel(logging.INFO)
>>> with Progress(4, "demo", unit="block", stream=io.StringIO(), interval=0) as p:
...     for _ in range(4):
...         p.update()
>>> lg.removeHandler(h)
>>> buf.getvalue().splitlines()[-1]
'demo: 4/4 blocks (100 %), done in 0:00'
"""

from __future__ import annotations

import logging
import math
import sys
import time
from types import TracebackType
from typing import IO, Any

from dask.callbacks import Callback

__all__ = ["DaskProgress", "Progress", "configure", "is_quiet"]

log = logging.getLogger("semdask.progress")

_STATE = {"quiet": False}


def configure(*, quiet: bool = False) -> None:
    """Turn every progress report of this process off (``quiet=True``) or back on."""
    _STATE["quiet"] = bool(quiet)


def is_quiet() -> bool:
    """Whether :func:`configure` turned progress reports off."""
    return _STATE["quiet"]


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Count ``total`` units of work and report the progress where it can be seen.

    Parameters
    ----------
    total : int
        Units of work expected.
    desc : str
        What is running (the first word of every line), e.g. ``"segment"``.
    unit : str
        Name of one unit (``"block"``; an ``s`` is added for plurals).
    pixels_per_unit : float, optional
        Pixels per unit: adds a throughput in MPix/s.
    enabled : bool
        False: report nothing (also off after ``configure(quiet=True)``).
    interval : float
        Seconds between two log lines (non-terminal streams).
    step : float
        A log line also whenever another ``step`` percent is done.
    stream : file, optional
        Where a bar would be drawn (default ``sys.stderr``); decides bar or log lines.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "block",
                 pixels_per_unit: float | None = None, enabled: bool = True,
                 interval: float = 30.0, step: float = 10.0, stream: IO[str] | None = None):
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.pixels_per_unit = pixels_per_unit
        self.interval, self.step = float(interval), float(step)
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._next_pct = self.step
        self._closed = self._logged = False
        stream = sys.stderr if stream is None else stream
        on = enabled and not is_quiet() and self.total > 0
        self.mode = "off" if not on else ("bar" if _isatty(stream) else "log")
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream,
                             mininterval=0.5, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc is not None)

    def _units(self, n: int) -> str:
        return self.unit if n == 1 else f"{self.unit}s"

    def line(self, *, final: bool = False) -> str:
        """The current state as one line (what a log line says)."""
        dt = time.monotonic() - self._t0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self._units(self.total)} ({pct:.0f} %)"]
        if dt > 0 and self.n:
            if self.pixels_per_unit:
                parts.append(f"{self.n * self.pixels_per_unit / dt / 1e6:.2f} MPix/s")
            elif not final:
                parts.append(f"{self.n / dt:.2f} {self._units(2)}/s")
        if final:
            parts.append(f"done in {_clock(dt)}" if self.n >= self.total
                         else f"stopped after {_clock(dt)}")
        elif self.n:
            parts.append(f"ETA {_clock(dt * (self.total - self.n) / self.n)}")
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        """Record ``n`` more finished units."""
        self.n = min(self.total, self.n + int(n))
        if self.mode == "bar":
            self._bar.update(n)
        elif self.mode == "log" and self.n < self.total:
            now = time.monotonic()
            pct = 100.0 * self.n / self.total
            if now - self._last >= self.interval or pct >= self._next_pct:
                log.info(self.line())
                self._logged = True
                self._last = now
                self._next_pct = (math.floor(pct / self.step) + 1) * self.step

    def close(self, *, failed: bool = False) -> None:
        """Finish: close the bar, or log the final line (once, after an earlier one)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar":
            self._bar.close()
        elif self.mode == "log" and self._logged and not failed:
            log.info(self.line(final=True))


class DaskProgress(Callback):
    """Report the tasks of a local dask computation through a :class:`Progress`.

    Use it like ``dask.diagnostics.ProgressBar``: ``with DaskProgress("convert"):
    dask.compute(...)``. Computations shorter than ``minimum`` seconds report nothing;
    on a distributed client it reports nothing either (the dashboard shows the tasks).
    """

    def __init__(self, desc: str, *, minimum: float = 1.0, enabled: bool = True,
                 interval: float = 30.0, stream: IO[str] | None = None):
        super().__init__()
        self.desc, self.minimum, self.enabled = desc, float(minimum), enabled
        self.interval, self.stream = interval, stream
        self._progress: Progress | None = None
        self._total = 0
        self._t0 = 0.0

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self._t0 = time.monotonic()
        self._total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._progress = None

    def _posttask(self, key: Any, result: Any, dsk: Any, state: dict[str, Any],
                  worker_id: Any) -> None:
        if self._progress is None:
            if time.monotonic() - self._t0 < self.minimum:
                return
            self._progress = Progress(self._total, self.desc, unit="task",
                                      enabled=self.enabled, interval=self.interval,
                                      stream=self.stream)
        done = len(state["finished"])
        self._progress.update(done - self._progress.n)

    def _finish(self, dsk: Any, state: dict[str, Any], errored: bool) -> None:
        if self._progress is not None:
            if not errored:
                self._progress.update(self._total - self._progress.n)
            self._progress.close(failed=errored)
            self._progress = None
