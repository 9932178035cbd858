"""Entry point of the ``segment`` arrow: OME-Zarr mosaic + model -> labels (+ probs, confidence).

Outputs are created first (marked incomplete). Each block is then one task that
writes its shard of every output (labels, probs and confidence share the
inference) and records itself in the per-block ledger (:mod:`semdask.storage.ledger`);
when every block is recorded the groups get their pyramids and are marked
complete. A run that fails or is interrupted leaves ``complete: false`` behind,
which every reader refuses; ``resume=True`` recomputes only the blocks that are
missing or stale (another run key, checksum mismatch).

Blocks are submitted a few at a time by :func:`semdask.inference.runner.run_blocks`, so a
SIGTERM caught by :func:`semdask.inference.runner.drain_on_sigterm` drains the run: no new
blocks start, the running ones finish writing and recording, and
:class:`semdask.inference.runner.InterruptedRun` (exit status 75) says how to resume.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np

from semdask import __version__, config
from semdask.cluster import monitor
from semdask.cluster.plugins import preload_model
from semdask.errors import StoreError
from semdask.inference.graph import (
    InferencePlan,
    blended_labels,
    blended_probs,
    confidence_from_probs,
    labels_from_probs,
)
from semdask.inference.normalise import NormStats, compute_stats
from semdask.inference.rescale import rescaled_probs
from semdask.inference.run import SegmentRun, resolve
from semdask.inference.runner import run_blocks
from semdask.paths import validate_output_path
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage import ledger, ome, ownership
from semdask.storage.lock import WriterLock, writer_lock

__all__ = ["SegmentResult", "execute", "mosaic_stats", "segment"]

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
    device: str | None = None,
    probs: bool | None = None,
    confidence: bool | None = None,
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
    run_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> SegmentResult:
    """Segment a whole OME-Zarr mosaic into phases with blended U-Net inference.

    Every parameter is resolved and validated first, into one
    :class:`semdask.inference.run.SegmentRun` (:func:`semdask.inference.run.resolve`),
    before anything is created on disk. Precedence: explicit argument > ``run_config`` >
    ``dask.config["semdask.segment"]`` values you set > the model file (window) >
    packaged defaults.

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
        chunk + receptive-field halo. In whole-chunk mode ``overlap`` and ``blend`` have
        no effect (a warning says so when they are given).
    window, overlap, blend, chunk, precision, batch_size, device
        Inference geometry and arithmetic (see :mod:`semdask.inference.settings` for the
        ranges; ``batch_size="auto"`` and ``device="auto"`` are decided on each worker).
    probs, confidence : bool, optional
        Also write float16 probabilities ``(c, y, x)`` / maximum probability.
    overwrite : bool
        Replace existing outputs of the same name, only ones segment wrote: another
        mosaic, its image or labels of other tools are never replaced, and an output
        inside the input is refused (:mod:`semdask.storage.ownership`).
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
        the argmax, so outputs keep the mosaic's grid (:mod:`semdask.inference.rescale`); a
        warning when either pixel size is unknown. ``False``: never; ``True``: whenever
        they differ (an unknown pixel size is an error). The factor is recorded in the
        provenance and in ``SegmentResult.rescale``. A model trained with ``--scale F``
        on stores of unknown pixel size resamples mosaics of unknown pixel size by F.
    ensemble : path, optional
        Add the members ``ENSEMBLE-m0.safetensors``, ``-m1``, ... to ``model`` (a list of
        files and globs): every member runs on the same windows, probabilities are
        averaged, labels are the argmax of the mean (:mod:`semdask.inference.ensemble`).
    tta : bool
        Test-time augmentation: average over the 8 flips/rotations (D4) too.
    uncertainty : bool
        Write ``uncertainty`` (std across members x views of the predicted class's
        probability; needs several members or ``tta``) and ``entropy`` (of the mean
        probabilities / log C), float16 ``(y, x)``.
    run_config : mapping or path, optional
        Run settings (keys of the ``segment`` section of ``semdask.yaml``), below
        explicit arguments and above ``dask.config``.

    Raises
    ------
    semdask.errors.InputError, semdask.errors.UnsafePathError
        For any invalid setting or output, before anything is written
        (``ForeignOutputError``: the output is not segment's to write).
    semdask.errors.OutputLockedError
        When another run writes the same output store (its writer lock, exit status 73).
    semdask.inference.runner.InterruptedRun
        After SIGTERM inside :func:`drain_on_sigterm` (finished blocks are recorded).

    Returns
    -------
    SegmentResult
    """
    t0 = time.perf_counter()
    run = resolve(mosaic, model=model, ensemble=ensemble, output=output, name=name,
                  run_config=run_config, rescale=rescale, tta=tta, uncertainty=uncertainty,
                  overwrite=overwrite, resume=resume, gpu_resources=gpu_resources,
                  client=client, mode=mode, window=window, overlap=overlap, blend=blend,
                  chunk=chunk, precision=precision, batch_size=batch_size, device=device,
                  probs=probs, confidence=confidence)
    return execute(run, client=client, progress=progress, t0=t0)


def execute(run: SegmentRun, *, client: Any = None, progress: bool = True,
            t0: float | None = None) -> SegmentResult:
    """Carry out a resolved :class:`~semdask.inference.run.SegmentRun` (see :func:`segment`).

    The run is the one writer of its output: it holds the store's writer lock
    (:mod:`semdask.storage.lock`, released on every exit path) from before its first
    write, and checks under it that the output is its own to write
    (:mod:`semdask.storage.ownership`).

    Raises
    ------
    semdask.errors.OutputLockedError
        When another run holds (or held, and left stale) the output's lock.
    semdask.errors.ForeignOutputError
        When the output holds data segment did not write, or overlaps the input.
    """
    from concurrent.futures import ThreadPoolExecutor

    # the image copy is written beside the blocks; leaving this block waits for it, so no
    # write of this run outlives its lock, even after a failure
    with writer_lock(run.output, group=run.group) as held, ThreadPoolExecutor(
            1, thread_name_prefix="semdask-copy") as bg:
        own = ownership.check_output(run.mosaic, run.output, groups=run.written,
                                     overwrite=run.overwrite, resume=run.resume)
        return _execute(run, own, held, bg, client=client, progress=progress, t0=t0)


def _execute(run: SegmentRun, own: ownership.OutputCheck, held: WriterLock, bg: Any, *,
             client: Any, progress: bool, t0: float | None) -> SegmentResult:
    from semdask.inference.ensemble import entropy_from_probs

    t0 = time.perf_counter() if t0 is None else t0
    m, ens, s, plan, factor = run.mosaic, run.members, run.settings, run.plan, run.factor
    mcfg, sha, spread, out, inside = ens.config, ens.key, run.spread, run.output, run.inside
    if run.uncertainty and not spread:
        log.info("one model without TTA: writing entropy only (uncertainty needs members/TTA)")
    norm = mcfg.normalisation
    reuse_copy = own.reuse_image  # this input's own complete copy: keep its image
    fill = None  # writes the pixels of the image copy (in the background, beside the blocks)
    stats = mosaic_stats(m, norm.low_percentile, norm.high_percentile,
                         fallback=sarr.read_attrs(out) if reuse_copy else None)
    plan_key = run.plan_key

    if inside:
        # computed once per mosaic: later runs (and training) reuse the stored statistics
        if (m.attrs.get("semdask") or {}).get("normalisation") != stats.to_dict():
            sarr.update_attrs(m.path, "", {"normalisation": stats.to_dict()})
    elif not reuse_copy:
        rewrite = run.overwrite or (run.resume and out.exists())  # resume: our unfinished copy
        validate_output_path(out, overwrite=rewrite)
        fill = sio.begin_image(out, m.image, pixel_size_um=m.pixel_size_um, overwrite=rewrite,
                               attrs={**ownership.copy_attrs(m),
                                      "normalisation": stats.to_dict()})
    prec = s.precision.value
    provenance = {
        "writer": ledger.WRITER,
        "version": __version__,
        "model": {"path": str(ens.paths[0]), "sha256": sha, "classes": list(mcfg.classes)},
        "ensemble": ens.provenance(spread),
        "plan": plan.to_dict(),
        "rescale": {"factor": factor, "mosaic_pixel_size_um": m.pixel_size_um,
                    "model_pixel_size_um": mcfg.pixel_size_um,
                    "model_scale_shape": list(run.inner.shape),
                    "model_scale_plan": run.inner.to_dict() if factor != 1.0 else None},
        "precision": prec,
        "settings_sources": dict(s.sources),
        "normalisation": stats.to_dict(),
        "source": str(m.path),
    }
    classes = list(mcfg.classes)
    colours = [(int(c[0]), int(c[1]), int(c[2]), int(c[3])) for c in mcfg.colours] or None
    group, written = run.group, run.written

    with dask.annotate(resources={"GPU": 1}) if run.gpu_resources else _null():
        infer_kw: dict[str, Any] = {"model_sha": sha, **s.infer_kwargs(), "tta": run.tta,
                                    "spread": spread}
        # labels only, at the mosaic's scale: the argmax inside the inference task
        fused = factor == 1.0 and not (s.probs or s.confidence or spread or run.uncertainty)
        if fused:
            lab = blended_labels(m.image, ens.task_model, n_classes=len(classes), stats=stats,
                                 plan=plan, **infer_kw)
        elif factor == 1.0:
            p = blended_probs(m.image, ens.task_model, n_classes=len(classes), stats=stats,
                              plan=plan, **infer_kw)
        else:
            kw = s.plan_kwargs(mcfg.receptive_field, mcfg.multiple)
            p = rescaled_probs(m.image, ens.task_model, factor=factor, n_classes=len(classes),
                               stats=stats, plan_kwargs=kw,
                               chunk=plan.chunk, plan=run.inner, **infer_kw)[0]
    if fused:
        sources = [lab]
    else:
        unc, p = (p[len(classes)], p[: len(classes)]) if spread else (None, p)
        sources = [labels_from_probs(p)]
        sources += [p.astype(np.float16)] if s.probs else []
        sources += [confidence_from_probs(p)] if s.confidence else []
        sources += [unc.astype(np.float16)] if unc is not None else []
        sources += [entropy_from_probs(p)] if run.uncertainty else []
    blocks = ledger.block_slices(sources[0].chunks)
    key = ledger.run_key(ledger.input_identity(m), model_sha=sha, plan=plan_key,
                         precision=prec, stats=stats.to_dict(), outputs=written)
    led = ledger.Ledger(out, group)
    head = led.header() if run.resume else None
    todo = sorted(blocks)
    targets = _open_targets(out, written, plan.shape) if head and head.get("key") == key else None
    if targets is not None and head is not None:
        status = ledger.audit(out, group, head, led.records())
        todo = sorted(b for b, why in status.items() if why != "ok")
        pyramid_bad = {} if todo else ledger.audit_levels(out, group, head)
        if pyramid_bad:  # the pyramid is rebuilt from level 0 by ledger.finish below
            log.warning("%s/%s: %d pyramid shards damaged (%s): rebuilding levels >= 1", out,
                        group, len(pyramid_bad), next(iter(pyramid_bad)))
        if not todo and not pyramid_bad and all(_complete(out, g) for g in written):
            if fill is not None:
                fill()
            log.info("%s/%s is up to date (%d blocks verified)", out, group, len(blocks))
            return SegmentResult(out, group, plan.shape, plan, stats, sha,
                                 time.perf_counter() - t0, written[1:], len(blocks), 0, True,
                                 factor, tuple(map(str, ens.paths)))
        log.info("resuming %s/%s: %d of %d blocks missing or stale", out, group, len(todo),
                 len(blocks))
        for g in written:
            sarr.set_complete(out, g, False)
        ledger.clear_shards(out, written, targets, [blocks[b] for b in todo])
    else:
        if head is not None:
            log.warning("the ledger of %s/%s is stale (input, model, plan or outputs changed): "
                        "recomputing all %d blocks", out, group, len(blocks))
        targets = _begin_targets(out, written, plan, classes, colours, provenance,
                                 m.pixel_size_um, run.overwrite or run.resume)
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
        preload_model(client, path, sha=digest, device=s.device)
    # metadata is written by now; the copy's pixels and pyramid (its own files) go beside
    copy = bg.submit(fill) if fill is not None else None
    with monitor.watch_blocks(client, output=out, group=group, blocks=blocks, todo=todo,
                              tasks=tasks, mosaic=m):  # live block map + gauges (monitor.py)
        run_blocks(tasks, client=client, progress=progress, mosaic=m.path, output=out,
                   inside=inside, name=run.name,
                   pixels_per_block=plan.shape[0] * plan.shape[1] / max(len(blocks), 1))
    if copy is not None:
        copy.result()  # a failed copy fails the run
    held.check()  # a run whose lock was broken meanwhile never marks its output complete
    ledger.finish(out, group, written)  # pyramids + their checksums, then marked complete
    secs = time.perf_counter() - t0
    log.info("wrote %s to %s in %.1f s (%.2f MPix/s)", ", ".join(written), out, secs,
             plan.shape[0] * plan.shape[1] / 1e6 / secs)
    return SegmentResult(out, group, plan.shape, plan, stats, sha, secs, written[1:],
                         len(blocks), len(todo), False, factor, tuple(map(str, ens.paths)))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _complete(out: Path, group: str) -> bool:
    return (sarr.read_attrs(out, group).get("semdask") or {}).get("complete") is True


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
