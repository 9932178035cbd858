"""Run control over many mosaics: idempotent ``batch`` and ``watch``.

Each mosaic is segmented with ``resume=True``: a finished output whose run key
matches and whose blocks verify is skipped ("skipped, up to date"), a partial
one is resumed (only missing or stale blocks run), a stale one (new model,
geometry or input) is recomputed. Running the same batch twice does nothing the
second time.

Manifests: ``.yaml``/``.yml`` (a list of paths or of mappings with ``mosaic``,
optional ``output`` and ``model``), ``.csv`` (a header with ``mosaic`` and
optional ``output``, ``model`` columns) or text (one ``MOSAIC [OUTPUT [MODEL]]``
per line, ``#`` comments). Relative paths are relative to the manifest.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "list.txt").write_text("# nightly\\na.ome.zarr\\nb.ome.zarr out/b.ome.zarr\\n")
>>> [(i.mosaic.name, i.output and i.output.name) for i in read_manifest(d / "list.txt")]
[('a.ome.zarr', None), ('b.ome.zarr', 'b.ome.zarr')]
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semdask.errors import InputError, SemdaskError
from semdask.inference.runner import InterruptedRun, stop_requested
from semdask.paths import validate_input_path
from semdask.storage import arrays as sarr

__all__ = ["Item", "Outcome", "read_manifest", "ready_mosaics", "run_batch", "summary", "watch"]

log = logging.getLogger(__name__)
@dataclass(frozen=True)
class Item:
    """One mosaic to segment (output and model default to the batch's)."""

    mosaic: Path
    output: Path | None = None
    model: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened to one item: ``done``, ``resumed``, ``skipped`` or ``failed``."""

    item: Item
    status: str
    detail: str = ""

    def line(self) -> str:
        """One report line."""
        return f"{self.item.mosaic}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def _item(fields: dict[str, Any], base: Path, where: str) -> Item:
    if not fields.get("mosaic"):
        raise InputError(where, expected="a mosaic path", got=repr(fields),
                         fix="give every entry a 'mosaic' path")

    def p(key: str) -> Path | None:
        v = fields.get(key)
        return None if v in (None, "") else base / Path(str(v)).expanduser()

    return Item(p("mosaic"), p("output"), p("model"))  # type: ignore[arg-type]


def read_manifest(path: str | os.PathLike[str]) -> list[Item]:
    """Parse a text, CSV or YAML manifest of mosaics (see the module docstring)."""
    mf = validate_input_path(Path(path), kind="file")
    text, base, suffix = mf.read_text(), mf.parent, mf.suffix.lower()
    items: list[Item] = []
    if suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or []
        data = data.get("mosaics", []) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise InputError(f"manifest {mf}", expected="a list of mosaics",
                             got=type(data).__name__)
        for n, e in enumerate(data):
            items.append(_item(e if isinstance(e, dict) else {"mosaic": e}, base,
                               f"{mf} entry {n + 1}"))
    elif suffix == ".csv":
        rows = csv.DictReader(_io.StringIO(text))
        if "mosaic" not in (rows.fieldnames or []):
            raise InputError(f"manifest {mf}", expected="a CSV header with a 'mosaic' column",
                             got=repr(rows.fieldnames), fix="first line: mosaic,output,model")
        items = [_item(r, base, f"{mf} line {n + 2}") for n, r in enumerate(rows)]
    else:
        for n, line in enumerate(text.splitlines()):
            f = line.split("#", 1)[0].split()
            if f:
                items.append(_item(dict(zip(("mosaic", "output", "model"), f, strict=False)),
                                   base, f"{mf} line {n + 1}"))
    return items


def _status(r: Any) -> tuple[str, str]:
    if r.up_to_date:
        return "skipped, up to date", f"{r.blocks_total} blocks verified"
    kind = "resumed" if r.blocks_computed < r.blocks_total else "done"
    return kind, f"{r.blocks_computed} of {r.blocks_total} blocks, {r.seconds:.1f} s"


def run_batch(items: Iterable[Item], *, client: Any = None,
              echo: Callable[[str], Any] = log.info, **segment_kwargs: Any) -> list[Outcome]:
    """Segment every item with ``resume=True``; report each outcome through ``echo``.

    A failing item is reported and the batch goes on (the caller exits non-zero);
    an interrupted item (SIGTERM) stops the batch by raising ``InterruptedRun``.
    """
    from semdask.inference.segment import segment
    from semdask.inference.settings import check_settings

    check_settings(**segment_kwargs)  # a bad setting fails once, before the first mosaic
    outcomes = []
    for it in items:
        if stop_requested():
            raise InterruptedRun("interrupted; resumable with --resume",
                                 fix="run the same batch again")
        kw = {**segment_kwargs, **({"model": it.model} if it.model else {})}
        try:
            r = segment(it.mosaic, output=it.output, client=client, resume=True, **kw)
            o = Outcome(it, *_status(r))
        except InterruptedRun:
            raise
        except SemdaskError as e:
            o = Outcome(it, "failed", str(e))
        echo(o.line())
        outcomes.append(o)
    return outcomes


def ready_mosaics(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``*.ome.zarr`` stores in ``directory`` whose writer marked them complete."""
    d = validate_input_path(Path(directory), kind="dir")
    ready = []
    for p in sorted(d.glob("*.ome.zarr")):
        try:
            done = (sarr.read_attrs(p).get("semdask") or {}).get("complete") is True
        except SemdaskError:
            done = False
        if done:
            ready.append(p)
        else:
            log.info("waiting for %s (not marked complete yet)", p)
    return ready


def watch(directory: str | os.PathLike[str], *, interval: float = 60.0, once: bool = False,
          output_dir: str | os.PathLike[str] | None = None, client: Any = None,
          echo: Callable[[str], Any] = log.info, **segment_kwargs: Any) -> list[Outcome]:
    """Poll ``directory`` for complete mosaics and segment each (idempotent).

    Outputs go into each mosaic, or to ``output_dir/<name>`` when given. Stops after
    one pass with ``once``, or when SIGTERM arrives between mosaics or polls.
    """
    seen: dict[Path, float] = {}
    outcomes: list[Outcome] = []
    while True:
        todo = []
        for p in ready_mosaics(directory):
            stamp = (p / "zarr.json").stat().st_mtime
            if seen.get(p) != stamp:  # a pass verifies each new or changed mosaic once
                todo.append(Item(p, Path(output_dir) / p.name if output_dir else None))
                seen[p] = stamp
        outcomes += run_batch(todo, client=client, echo=echo, **segment_kwargs)
        deadline = time.monotonic() + interval
        while not once and not stop_requested() and time.monotonic() < deadline:
            time.sleep(min(0.5, interval))
        if once or stop_requested():
            return outcomes


def summary(outcomes: Sequence[Outcome]) -> str:
    """One line counting the outcomes by status."""
    if not outcomes:
        return "nothing to do"
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("done", "resumed", "skipped, up to date", "failed")}
    return f"{len(outcomes)} mosaics: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
