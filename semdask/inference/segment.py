"""Entry point of the ``segment`` arrow: OME-Zarr mosaic + model -> labels (+ probs, confidence).

Outputs are created first (marked incomplete). Each block is then one task that
writes its shard of every output (labels, probs and confidence share the
inference) and records itself in the per-block ledger (:mod:`semdask.ledger`);
when every block is recorded the groups get their pyramids and are marked
complete. A run that fails or is interrupted leaves ``complete: false`` behind,
which every reader refuses; ``resume=True`` recomputes only the blocks that are
missing or stale (another run key, checksum mismatch).

Blocks are submitted a few at a time by :func:`semdask.inference.batch.run_blocks`, so a
SIGTERM caught by :func:`semdask.inference.batch.drain_on_sigterm` drains the run: no new
blocks start, the running ones finish writing and recording, and
:class:`semdask.inference.batch.InterruptedRun` (exit status 75) says how to resume.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np

from semdask import __version__, config
from semdask.cluster import monitor
from semdask.cluster.plugins import preload_model
from semdask.errors import SemdaskError, StoreError
from semdask.inference.batch import run_blocks
from semdask.inference.graph import (
    InferencePlan,
    blended_labels,
    blended_probs,
    confidence_from_probs,
    labels_from_probs,
    plan_inference,
)
from semdask.inference.normalise import NormStats, compute_stats
from semdask.inference.rescale import rescaled_probs, scale_factor, target_shape
from semdask.storage import io as sio
from semdask.storage import ledger, ome
from semdask.training.scale import relative_scale

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
    blocks_total: int = 0
    blocks_computed: int = 0
    up_to_date: bool = False
    rescale: float = 1.0  #: zoom to the model's scale used for inference (1.0: none)
    members: tuple[str, ...] = ()  #: model files (more than one: an ensemble)

    @property
    def mpix_per_s(self) -> float:
        return self.shape[0] * self.shape[1] / 1e6 / max(self.seconds, 1e-9)


def mosaic_stats(mosaic: sio.Mosaic, low: float, high: float,
                 fallback: dict[str, Any] | None = None) -> NormStats:
    """Normalisation stats of a mosaic: reuse the stored ones, else compute once (pooled).

    ``fallback``: attributes of an output store that copied this mosaic (its stats).
    """
    for attrs in (mosaic.attrs, fallback or {}):
        st = (attrs.get("semdask") or {}).get("normalisation")
        if st and st.get("low_percentile") == low and st.get("high_percentile") == high:
            return NormStats.from_dict(st)
    st = compute_stats(mosaic.image, low, high)
    log.info("normalisation over the whole mosaic: low=%.4g high=%.4g", st.low, st.high)
    return st


def segment(
    mosaic: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
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
    resume: bool = False,
    rescale: bool | None = None,
    ensemble: str | os.PathLike[str] | None = None,
    tta: bool = False,
    uncertainty: bool = False,
) -> SegmentResult:
    """Segment a whole OME-Zarr mosaic into phases with blended U-Net inference.

    Parameters
    ----------
    mosaic : path
        An OME-Zarr mosaic (``semdask convert`` or ``semdask synth`` output).
    model : path or sequence of paths, optional
        A safetensors model; default: the bundled SOC model. Several files (or globs)
        make an ensemble (see ``ensemble``); they must share classes, normalisation,
        window and pixel size. The provenance names the first as ``model`` (with the
        run's model key as ``sha256``) and every member under ``ensemble``.
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
    resume : bool
        Keep the blocks of an earlier run with the same run key (input, model, plan,
        statistics, outputs, version) that are recorded and intact; recompute the rest.
        A different run key replaces the outputs (full recompute); an output that is
        complete and intact is left alone (``up_to_date``).
    rescale : bool, optional
        Pixel-size awareness. ``None`` (auto): when the mosaic's pixel size differs from
        the model's training pixel size by more than 5 %, resample the mosaic to the
        model's scale, infer there and resample the probabilities back (linear) before
        the argmax, so outputs keep the mosaic's grid (:mod:`semdask.rescale`); a
        warning when either pixel size is unknown. ``False``: never; ``True``: whenever
        they differ (an unknown pixel size is an error). The factor is recorded in the
        provenance and in ``SegmentResult.rescale``. A model trained with ``--scale F``
        on stores of unknown pixel size resamples mosaics of unknown pixel size by F.
    ensemble : path, optional
        Add the members ``ENSEMBLE-m0.safetensors``, ``-m1``, ... to ``model`` (a list of
        files and globs): every member runs on the same windows, probabilities are
        averaged, labels are the argmax of the mean (:mod:`semdask.ensemble`).
    tta : bool
        Test-time augmentation: average over the 8 flips/rotations (D4) too.
    uncertainty : bool
        Write ``uncertainty`` (std across members x views of the predicted class's
        probability; needs several members or ``tta``) and ``entropy`` (of the mean
        probabilities / log C), float16 ``(y, x)``.

    Raises
    ------
    semdask.batch.InterruptedRun
        After SIGTERM inside :func:`drain_on_sigterm` (finished blocks are recorded).

    Returns
    -------
    SegmentResult
    """
    from semdask.inference.ensemble import entropy_from_probs, members_for

    t0 = time.perf_counter()
    m = sio.open_mosaic(Path(mosaic))
    ens = members_for(model, prefix=ensemble, tta=tta)  # one model or all members, checked
    model_path, mcfg, sha, spread = ens.paths[0], ens.config, ens.key, uncertainty and ens.multi
    if uncertainty and not spread:
        log.info("one model without TTA: writing entropy only (uncertainty needs members/TTA)")
    mode = config.resolve(mode, "segment.mode")
    window = int(config.resolve(window, "segment.window") if window is not None
                 else (mcfg.window or config.get("segment.window")))
    plan_kw: dict[str, Any] = {
        "mode": str(mode), "window": window,
        "overlap": float(config.resolve(overlap, "segment.overlap")),
        "chunk": int(config.resolve(chunk, "segment.chunks")),
        "receptive_field": int(mcfg.receptive_field),
        "blend": str(config.resolve(blend, "segment.blend"))}
    plan = plan_inference((int(m.image.shape[0]), int(m.image.shape[1])), **plan_kw)
    norm = mcfg.normalisation
    out = Path(output) if output is not None else m.path
    inside = out.resolve() == m.path.resolve()
    reuse_copy = not inside and resume and _image_ready(out, m)
    stats = mosaic_stats(m, norm.low_percentile, norm.high_percentile,
                         fallback=sio.read_attrs(out) if reuse_copy else None)
    if rescale is False:
        _check_pixel_size(m.pixel_size_um, mcfg.pixel_size_um)
    factor = relative_scale(m.pixel_size_um, mcfg, rescale=rescale) or scale_factor(
        m.pixel_size_um, mcfg.pixel_size_um, rescale=rescale)
    # the plan at the model's scale (rescaled_probs makes the same one)
    inner = plan if factor == 1.0 else plan_inference(target_shape(plan.shape, factor), **plan_kw)
    plan_key = plan.to_dict() if factor == 1.0 else {**plan.to_dict(), "rescale": factor,
                                                      "model_scale_plan": inner.to_dict()}

    if inside:
        # computed once per mosaic: later runs (and training) reuse the stored statistics
        if (m.attrs.get("semdask") or {}).get("normalisation") != stats.to_dict():
            sio.update_attrs(m.path, "", {"normalisation": stats.to_dict()})
    elif not reuse_copy:
        rewrite = overwrite or (resume and out.exists())  # resume: our unfinished copy
        sio.validate_output_path(out, overwrite=rewrite)
        sio.write_image(out, m.image, pixel_size_um=m.pixel_size_um,
                        attrs={"source": str(m.path), "normalisation": stats.to_dict()},
                        overwrite=rewrite)
    prec = str(config.resolve(precision, "segment.precision"))
    provenance = {
        "version": __version__,
        "model": {"path": str(model_path), "sha256": sha, "classes": list(mcfg.classes)},
        "ensemble": ens.provenance(spread),
        "plan": plan.to_dict(),
        "rescale": {"factor": factor, "mosaic_pixel_size_um": m.pixel_size_um,
                    "model_pixel_size_um": mcfg.pixel_size_um,
                    "model_scale_shape": list(inner.shape),
                    "model_scale_plan": inner.to_dict() if factor != 1.0 else None},
        "precision": prec,
        "normalisation": stats.to_dict(),
        "source": str(m.path),
    }
    classes = list(mcfg.classes)
    colours = [(int(c[0]), int(c[1]), int(c[2]), int(c[3])) for c in mcfg.colours] or None
    group = f"labels/{name}"
    written = [group, *(["probs"] if probs else []), *(["confidence"] if confidence else []),
               *(["uncertainty"] if spread else []), *(["entropy"] if uncertainty else [])]

    with dask.annotate(resources={"GPU": 1}) if gpu_resources else _null():
        infer_kw: dict[str, Any] = {"model_sha": sha, "precision": precision,
                                    "batch_size": batch_size, "device": device,
                                    "tta": tta, "spread": spread}
        # labels only, at the mosaic's scale: the argmax inside the inference task
        fused = factor == 1.0 and not (probs or confidence or spread or uncertainty)
        if fused:
            lab = blended_labels(m.image, ens.task_model, n_classes=len(classes), stats=stats,
                                 plan=plan, **infer_kw)
        elif factor == 1.0:
            p = blended_probs(m.image, ens.task_model, n_classes=len(classes), stats=stats,
                              plan=plan, **infer_kw)
        else:
            p = rescaled_probs(m.image, ens.task_model, factor=factor, n_classes=len(classes),
                               stats=stats, plan_kwargs=plan_kw, chunk=plan.chunk,
                               **infer_kw)[0]
    if fused:
        sources = [lab]
    else:
        unc, p = (p[len(classes)], p[: len(classes)]) if spread else (None, p)
        sources = [labels_from_probs(p)]
        sources += [p.astype(np.float16)] if probs else []
        sources += [confidence_from_probs(p)] if confidence else []
        sources += [unc.astype(np.float16)] if unc is not None else []
        sources += [entropy_from_probs(p)] if uncertainty else []
    blocks = ledger.block_slices(sources[0].chunks)
    key = ledger.run_key(ledger.input_identity(m), model_sha=sha, plan=plan_key,
                         precision=prec, stats=stats.to_dict(), outputs=written)
    led = ledger.Ledger(out, group)
    head = led.header() if resume else None
    todo = sorted(blocks)
    targets = _open_targets(out, written, plan.shape) if head and head.get("key") == key else None
    if targets is not None and head is not None:
        status = ledger.audit(out, group, head, led.records())
        todo = sorted(b for b, why in status.items() if why != "ok")
        if not todo and all(_complete(out, g) for g in written):
            log.info("%s/%s is up to date (%d blocks verified)", out, group, len(blocks))
            return SegmentResult(out, group, plan.shape, plan, stats, sha,
                                 time.perf_counter() - t0, written[1:], len(blocks), 0, True,
                                 factor, tuple(map(str, ens.paths)))
        log.info("resuming %s/%s: %d of %d blocks missing or stale", out, group, len(todo),
                 len(blocks))
        for g in written:
            sio.set_complete(out, g, False)
        ledger.clear_shards(out, written, targets, [blocks[b] for b in todo])
    else:
        if head is not None:
            log.warning("the ledger of %s/%s is stale (input, model, plan or outputs changed): "
                        "recomputing all %d blocks", out, group, len(blocks))
        targets = _begin_targets(out, written, plan, classes, colours, provenance,
                                 m.pixel_size_um, overwrite or resume)
        led.begin({"key": key, "chunks": [list(c) for c in sources[0].chunks],
                   "outputs": written, "model": sha, "plan": plan_key, "precision": prec,
                   "normalisation": stats.to_dict(), "source": str(m.path),
                   "version": __version__}, keep_records=False)

    log.info("segmenting %s (%d x %d px, %s mode, window %d, stride %d, halo %d, chunk %d, "
             "%d of %d blocks)", m.path, *plan.shape, plan.mode, plan.window, plan.stride,
             plan.halo, plan.chunk, len(todo), len(blocks))
    tasks = _block_tasks(sources, targets, written, blocks, todo, store=out, group=group,
                         key=key)
    for path, digest in zip(ens.paths, ens.shas, strict=True):  # resident before block one
        preload_model(client, path, sha=digest, device=device)
    with monitor.watch_blocks(client, output=out, group=group, blocks=blocks, todo=todo,
                              tasks=tasks, mosaic=m):  # live block map + gauges (monitor.py)
        run_blocks(tasks, client=client, progress=progress, mosaic=m.path, output=out,
                   inside=inside, name=name)
    for g in written:
        sio.finish_group(out, g)
    secs = time.perf_counter() - t0
    log.info("wrote %s to %s in %.1f s (%.2f MPix/s)", ", ".join(written), out, secs,
             plan.shape[0] * plan.shape[1] / 1e6 / secs)
    return SegmentResult(out, group, plan.shape, plan, stats, sha, secs, written[1:],
                         len(blocks), len(todo), False, factor, tuple(map(str, ens.paths)))


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


def _image_ready(out: Path, m: sio.Mosaic) -> bool:
    """True when ``out`` holds a complete copy of the mosaic's image (resume)."""
    try:
        return tuple(sio.open_mosaic(out).image.shape) == tuple(m.image.shape)
    except (SemdaskError, OSError):
        return False


def _complete(out: Path, group: str) -> bool:
    return (sio.read_attrs(out, group).get("semdask") or {}).get("complete") is True


def _open_targets(out: Path, groups: Sequence[str], shape: tuple[int, int]) -> list[Any] | None:
    """The level-0 arrays of existing outputs (None when one is missing or misshapen)."""
    try:
        arrs = [sio.open_array(out, g, mode="r+") for g in groups]
    except StoreError:
        return None
    return arrs if all(tuple(a.shape[-2:]) == shape for a in arrs) else None


def _begin_targets(out: Path, groups: Sequence[str], plan: InferencePlan, classes: list[str],
                   colours: Any, provenance: dict[str, Any], pixel_size_um: float | None,
                   overwrite: bool) -> list[Any]:
    """Create every output (marked incomplete) with its pyramid arrays; return level 0s."""
    attrs = {"provenance": provenance}
    arrays = [sio.begin_labels(out, groups[0].split("/", 1)[1], shape=plan.shape,
                               chunk=plan.chunk, classes=classes, colours=colours, attrs=attrs,
                               overwrite=overwrite)]
    for g in groups[1:]:
        shape = (len(classes), *plan.shape) if g == "probs" else plan.shape
        arrays.append(sio.begin_extra_image(
            out, g, shape=shape, dtype=np.float16, chunk=plan.chunk,
            channel_names=classes if g == "probs" else None, pixel_size_um=pixel_size_um,
            attrs=attrs, overwrite=overwrite))
    return arrays


def _block_tasks(sources: Sequence[Any], targets: Sequence[Any], names: Sequence[str],
                 blocks: dict[ledger.Index, ledger.Slices], todo: Sequence[ledger.Index], *,
                 store: Path, group: str, key: str) -> list[Any]:
    """One delayed ``ledger.write_block`` per block to do (sources share the inference)."""
    for src, tgt in zip(sources, targets, strict=True):
        bad = ome.misaligned(src.chunks, tuple(tgt.shards or tgt.chunks))
        if bad is not None:
            raise StoreError(f"dask chunks of {tgt.path}", expected="shard-aligned blocks",
                             got=f"a boundary at {bad[1]} on axis {bad[0]}")
    parts = [s.to_delayed(optimize_graph=False) for s in sources]
    delay = float(config.get("testing.block-delay", 0) or 0)
    run = uuid.uuid4().hex[:8]
    write = dask.delayed(ledger.write_block, pure=False)
    return [write(idx, blocks[idx], [d[(0, *idx)] if d.ndim == 3 else d[idx] for d in parts],
                  list(targets), list(names), store=str(store), group=group, key=key,
                  delay=delay, dask_key_name=f"semdask-write-{run}-{idx[0]}-{idx[1]}")
            for idx in todo]
