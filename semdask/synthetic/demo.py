"""The demo: synthesise an SOC mosaic, segment it with the bundled model, compare with the truth.

``semdask demo`` (and ``make demo``) runs this on a local Dask cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semdask.analysis.metrics import (
    Fractions,
    confusion_matrix,
    mosaic_fractions,
    scores_from_confusion,
)
from semdask.storage import io as sio

__all__ = ["DemoResult", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo produced and measured."""

    mosaic: Path
    preview: Path
    fractions: Fractions
    truth: Fractions
    scores: dict[str, Any]
    seconds: dict[str, float]
    shape: tuple[int, int]

    def summary(self) -> str:
        mp = self.shape[0] * self.shape[1] / 1e6
        iou = ", ".join(f"{k} {v:.3f}" for k, v in self.scores["iou"].items())
        return "\n".join([
            "",
            f"Phase fractions of {self.mosaic} ({self.shape[0]} x {self.shape[1]} px):",
            self.fractions.table(self.truth),
            "",
            f"accuracy {self.scores['accuracy']:.4f}, mIoU {self.scores['miou']:.4f} ({iou})",
            f"timings: synth {self.seconds['synth']:.1f} s, segment {self.seconds['segment']:.1f}"
            f" s ({mp / self.seconds['segment']:.2f} MPix/s), fractions+scores "
            f"{self.seconds['score']:.1f} s",
            f"preview: {self.preview}",
        ])


def run_demo(
    workdir: str | os.PathLike[str] = "demo-output",
    *,
    shape: tuple[int, ...] = (8192, 8192),
    seed: int = 2026,
    nio_fraction: float = 0.15,
    mode: str | None = None,
    precision: str | None = None,
    chunk: int | None = None,
    client: Any = None,
    echo: Callable[[str], Any] = log.info,
) -> DemoResult:
    """Synthesise, segment, score and preview one mosaic under ``workdir``.

    The mosaic store is rewritten on every run (it lives in the demo's own folder).
    ``mode``, ``precision`` and ``chunk`` are resolved as ``segment`` resolves them
    (:func:`semdask.inference.settings.resolve_settings`) and checked before anything is
    synthesised.
    """
    from semdask.analysis.preview import preview
    from semdask.errors import InputError
    from semdask.inference.segment import segment
    from semdask.inference.settings import resolve_settings
    from semdask.synthetic.sem import SynthParams, synthetic_mosaic

    settings = resolve_settings(mode=mode, precision=precision, chunk=chunk)
    if len(shape) != 2 or min(int(v) for v in shape) < 64:
        raise InputError("shape", expected="two sides of at least 64 px", got=repr(shape),
                         fix="use --shape 4096 4096")
    if not 0.0 <= nio_fraction <= 1.0:
        raise InputError("nio_fraction", expected="a share in [0, 1]", got=repr(nio_fraction),
                         fix="use --nio-fraction 0.15")
    log.info("demo settings: %s", settings.describe())
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "soc-mosaic.ome.zarr"
    t = {}
    echo(f"[1/4] synthesising a {shape[0]} x {shape[1]} px SOC mosaic (seed {seed}, NiO "
         f"fraction {nio_fraction}) -> {path}")
    t0 = time.perf_counter()
    mosaic = synthetic_mosaic((int(shape[0]), int(shape[1])), seed=seed,
                              params=SynthParams(nio_fraction=nio_fraction))
    sio.write_synthetic(path, mosaic, overwrite=True, client=client)
    t["synth"] = time.perf_counter() - t0
    where = "a local Dask cluster" if client else "threads"
    echo(f"[2/4] segmenting with the bundled model on {where}")
    t0 = time.perf_counter()
    r = segment(path, mode=settings.mode.value, precision=settings.precision.value,
                chunk=settings.chunk, client=client, overwrite=True)
    t["segment"] = time.perf_counter() - t0
    echo("[3/4] phase fractions (pooled counts) and scores against the known truth")
    t0 = time.perf_counter()
    frac = mosaic_fractions(path, labels="phases")
    truth = mosaic_fractions(path, labels="truth")
    pred, tru = sio.open_labels(path, "phases"), sio.open_labels(path, "truth")
    cm = np.asarray(confusion_matrix(pred.data, tru.data, len(pred.classes)).compute())
    scores = scores_from_confusion(cm, pred.classes)
    t["score"] = time.perf_counter() - t0
    echo("[4/4] preview")
    png = preview(path, work / "preview.png")
    del r
    return DemoResult(path, png, frac, truth, scores, t, (int(shape[0]), int(shape[1])))
