"""Entry point of the ``segment`` arrow: OME-Zarr mosaic + model -> labels (+ probs, confidence).

Outputs are created first (marked incomplete), written shard-aligned in one
graph (labels, probs and confidence share the inference), then given their
pyramids and marked complete. A run that fails or is interrupted leaves
``complete: false`` behind, which every reader refuses.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np

from . import __version__, config
from . import io as sio
from .infer import (
    InferencePlan,
    blended_probs,
    confidence_from_probs,
    labels_from_probs,
    plan_inference,
)
from .normalise import NormStats, compute_stats

__all__ = ["SegmentResult", "mosaic_stats", "segment"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentResult:
    """What a segmentation run wrote and how long it took."""

    output: Path
    labels: str
    shape: tuple[int, int]
    plan: InferencePlan
    stats: NormStats
    model_sha256: str
    seconds: float
    extras: list[str] = field(default_factory=list)

    @property
    def mpix_per_s(self) -> float:
        return self.shape[0] * self.shape[1] / 1e6 / max(self.seconds, 1e-9)


def mosaic_stats(mosaic: sio.Mosaic, low: float, high: float) -> NormStats:
    """Normalisation stats of a mosaic: reuse the stored ones, else compute once (pooled)."""
    stored = (mosaic.attrs.get("semdask") or {}).get("normalisation")
    if stored and stored.get("low_percentile") == low and stored.get("high_percentile") == high:
        return NormStats.from_dict(stored)
    st = compute_stats(mosaic.image, low, high)
    log.info("normalisation over the whole mosaic: low=%.4g high=%.4g", st.low, st.high)
    return st


def segment(
    mosaic: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    window: int | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    chunk: int | None = None,
    precision: str | None = None,
    batch_size: int | str | None = None,
    device: str = "auto",
    probs: bool = False,
    confidence: bool = False,
    name: str = "phases",
    overwrite: bool = False,
    client: Any = None,
    progress: bool = True,
    gpu_resources: bool = False,
) -> SegmentResult:
    """Segment a whole OME-Zarr mosaic into phases with blended U-Net inference.

    Parameters
    ----------
    mosaic : path
        An OME-Zarr mosaic (``semdask convert`` or ``semdask synth`` output).
    model : path, optional
        A safetensors model; default: the bundled SOC model.
    output : path, optional
        Where to write; default: into the mosaic (``<mosaic>/labels/<name>``).
        Another path gets a copy of the image plus the outputs (self-contained).
    mode : {"window", "whole-chunk"}
        Blended sliding windows on a global grid, or the fully convolutional net on
        chunk + receptive-field halo.
    window, overlap, blend, chunk, precision, batch_size
        Inference geometry and arithmetic (defaults from ``dask.config["semdask"]``).
    probs, confidence : bool
        Also write float16 probabilities ``(c, y, x)`` / maximum probability.
    overwrite : bool
        Replace existing outputs of the same name.
    client : distributed.Client, optional
        Run on this cluster (else the current Dask scheduler).
    gpu_resources : bool
        Annotate the inference layer with ``resources={"GPU": 1}`` (GPU workers).

    Returns
    -------
    SegmentResult
    """
    from .model import bundled_model_path, load_model, model_hash

    t0 = time.perf_counter()
    m = sio.open_mosaic(Path(mosaic))
    model_path = Path(model) if model is not None else bundled_model_path()
    model_path = sio.validate_input_path(model_path, kind="file")
    _, mcfg = load_model(model_path, device="cpu")
    sha = model_hash(model_path)
    mode = config.resolve(mode, "segment.mode")
    window = int(config.resolve(window, "segment.window") if window is not None
                 else (mcfg.window or config.get("segment.window")))
    plan = plan_inference(
        (int(m.image.shape[0]), int(m.image.shape[1])), mode=str(mode), window=window,
        overlap=float(config.resolve(overlap, "segment.overlap")),
        chunk=int(config.resolve(chunk, "segment.chunks")),
        receptive_field=int(mcfg.receptive_field),
        blend=str(config.resolve(blend, "segment.blend")))
    norm = mcfg.normalisation
    stats = mosaic_stats(m, norm.low_percentile, norm.high_percentile)
    _check_pixel_size(m.pixel_size_um, mcfg.pixel_size_um)

    out = Path(output) if output is not None else m.path
    if out.resolve() == m.path.resolve():
        # computed once per mosaic: later runs (and training) reuse the stored statistics
        sio.update_attrs(m.path, "", {"normalisation": stats.to_dict()})
    else:
        sio.validate_output_path(out, overwrite=overwrite)
        sio.write_image(out, m.image, pixel_size_um=m.pixel_size_um,
                        attrs={"source": str(m.path), "normalisation": stats.to_dict()},
                        overwrite=overwrite)
    provenance = {
        "version": __version__,
        "model": {"path": str(model_path), "sha256": sha, "classes": list(mcfg.classes)},
        "plan": plan.to_dict(),
        "precision": config.resolve(precision, "segment.precision"),
        "normalisation": stats.to_dict(),
        "source": str(m.path),
    }
    classes = list(mcfg.classes)
    colours = [(int(c[0]), int(c[1]), int(c[2]), int(c[3])) for c in mcfg.colours] or None
    shard = plan.chunk
    targets, sources, written = [], [], []

    with dask.annotate(resources={"GPU": 1}) if gpu_resources else _null():
        p = blended_probs(m.image, str(model_path), n_classes=len(classes), stats=stats,
                          plan=plan, model_sha=sha, precision=precision,
                          batch_size=batch_size, device=device)
    lab_arr = sio.begin_labels(out, name, shape=plan.shape, chunk=shard, classes=classes,
                               colours=colours, attrs={"provenance": provenance},
                               overwrite=overwrite)
    targets.append(lab_arr)
    sources.append(labels_from_probs(p))
    written.append(f"labels/{name}")
    if probs:
        targets.append(sio.begin_extra_image(
            out, "probs", shape=(len(classes), *plan.shape), dtype=np.float16, chunk=shard,
            channel_names=classes, pixel_size_um=m.pixel_size_um,
            attrs={"provenance": provenance}, overwrite=overwrite))
        sources.append(p.astype(np.float16))
        written.append("probs")
    if confidence:
        targets.append(sio.begin_extra_image(
            out, "confidence", shape=plan.shape, dtype=np.float16, chunk=shard,
            channel_names=None, pixel_size_um=m.pixel_size_um,
            attrs={"provenance": provenance}, overwrite=overwrite))
        sources.append(confidence_from_probs(p))
        written.append("confidence")

    log.info("segmenting %s (%d x %d px, %s mode, window %d, stride %d, halo %d, chunk %d, "
             "%d chunks)", m.path, *plan.shape, plan.mode, plan.window, plan.stride, plan.halo,
             plan.chunk, len(plan.chunks[0]) * len(plan.chunks[1]))
    _run(sio.store_blocks(sources, targets, compute=False), client=client, progress=progress)
    for g in written:
        sio.finish_group(out, g)
    secs = time.perf_counter() - t0
    log.info("wrote %s to %s in %.1f s (%.2f MPix/s)", ", ".join(written), out, secs,
             plan.shape[0] * plan.shape[1] / 1e6 / secs)
    return SegmentResult(out, f"labels/{name}", plan.shape, plan, stats, sha, secs, written[1:])


def _check_pixel_size(mosaic_um: float | None, model_um: float | None) -> None:
    if mosaic_um is None:
        log.warning("the mosaic's pixel size is unknown; assuming it matches the model's "
                    "training pixel size (%s um). Set it with semdask convert --pixel-size.",
                    model_um)
    elif model_um is not None and not np.isclose(mosaic_um, model_um, rtol=0.05):
        log.warning("pixel size %.4g um differs from the model's %.4g um (ratio %.2f); "
                    "accuracy drops away from the training scale", mosaic_um, model_um,
                    mosaic_um / model_um)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _run(delayed: Any, *, client: Any, progress: bool) -> None:
    """Compute ``delayed`` on ``client`` (or the current scheduler) with a progress bar."""
    if client is not None:
        fut = client.compute(delayed, optimize_graph=True)
        if progress:
            from distributed import progress as dprogress

            dprogress(fut, notebook=False)
        fut.result()
        return
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=2.0):
            dask.compute(delayed)
    else:
        dask.compute(delayed)


