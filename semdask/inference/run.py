"""One typed description of a segmentation run, resolved and validated before anything is written.

:func:`resolve` combines the :class:`~semdask.inference.settings.Settings` (one
precedence: argument > run config > ``dask.config`` you set > model file > packaged
default, :mod:`semdask.inference.settings`) with the mosaic, the model members, the
output and the inference plan(s) into one frozen :class:`SegmentRun`. Every check
that can fail does so here — settings, label name, mosaic, model, device and
precision on the workers, pixel sizes, plan, output location and ownership — before
:func:`semdask.inference.segment.execute` creates anything on disk. The plan at the
model's scale (rescaling) is built here once and reused by the graph.

Device-dependent ``"auto"`` choices (the device itself, the window batch size) are
made on each worker (:func:`semdask.inference.graph._chunk_task`), never from the
driver's hardware; the driver only checks that an explicit CUDA device, or fp16,
exists on the workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semdask.errors import InputError, UnsafePathError
from semdask.inference.settings import (
    FLAGS,
    Mode,
    Precision,
    Settings,
    check_name,
    resolve_settings,
)

__all__ = ["SegmentRun", "resolve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentRun:
    """Everything one ``segment`` call does, resolved once (frozen; nothing written yet)."""

    settings: Settings
    mosaic: Any  #: semdask.storage.io.Mosaic
    members: Any  #: semdask.inference.ensemble.Members
    output: Path
    inside: bool
    name: str
    plan: Any  #: InferencePlan at the mosaic's scale
    inner: Any  #: InferencePlan at the model's scale (``plan`` when factor is 1)
    factor: float
    tta: bool = False
    uncertainty: bool = False
    overwrite: bool = False
    resume: bool = False
    gpu_resources: bool = False

    @property
    def spread(self) -> bool:
        """Write the ``uncertainty`` channel (several members or TTA)."""
        return self.uncertainty and bool(self.members.multi)

    @property
    def group(self) -> str:
        return f"labels/{self.name}"

    @property
    def written(self) -> list[str]:
        """Output groups, labels first."""
        s = self.settings
        return [self.group, *(["probs"] if s.probs else []),
                *(["confidence"] if s.confidence else []),
                *(["uncertainty"] if self.spread else []),
                *(["entropy"] if self.uncertainty else [])]

    @property
    def plan_key(self) -> dict[str, Any]:
        """The geometry part of the run key (with the model-scale plan when rescaling)."""
        if self.factor == 1.0:
            return dict(self.plan.to_dict())
        return {**self.plan.to_dict(), "rescale": self.factor,
                "model_scale_plan": self.inner.to_dict()}


def resolve(mosaic: str | os.PathLike[str], *, model: Any = None,
            ensemble: str | os.PathLike[str] | None = None,
            output: str | os.PathLike[str] | None = None, name: str = "phases",
            run_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
            rescale: bool | None = None, tta: bool = False, uncertainty: bool = False,
            overwrite: bool = False, resume: bool = False, gpu_resources: bool = False,
            client: Any = None, check_device: bool = True, **params: Any) -> SegmentRun:
    """Resolve and validate one segmentation run; reads the mosaic and model, writes nothing.

    ``params``: the settings of :func:`resolve_settings`. Checks, in this order: the
    settings, the label name, the mosaic, the model members, the device and precision
    on the workers (``client``; this process without one; ``check_device=False`` skips
    it, e.g. before a cluster exists), the pixel sizes, the plan, and the output
    (writable, not an existing output unless ``overwrite``/``resume``).
    """
    from semdask.inference.ensemble import members_for
    from semdask.inference.graph import plan_inference
    from semdask.inference.rescale import relative_scale, scale_factor, target_shape
    from semdask.storage import io as sio

    check_name(name)
    settings = resolve_settings(run_config=run_config, **params)  # cheap checks first
    m = sio.open_mosaic(Path(mosaic))
    ens = members_for(model, prefix=ensemble, tta=tta)
    settings = resolve_settings(model_config=ens.config, run_config=run_config, **params)
    if check_device:
        _check_device(settings, client)
    mcfg = ens.config
    if rescale is False:
        _warn_pixel_size(m.pixel_size_um, mcfg.pixel_size_um)
    factor = relative_scale(m.pixel_size_um, mcfg, rescale=rescale) or scale_factor(
        m.pixel_size_um, mcfg.pixel_size_um, rescale=rescale)
    kw = settings.plan_kwargs(mcfg.receptive_field, mcfg.multiple)
    plan = plan_inference((int(m.image.shape[0]), int(m.image.shape[1])), **kw)
    inner = plan if factor == 1.0 else plan_inference(target_shape(plan.shape, factor), **kw)
    if settings.mode is Mode.WHOLE_CHUNK:
        ignored = [k for k in ("overlap", "blend") if settings.sources[k] in
                   ("argument", "run config")]
        if ignored:
            log.warning("%s %s no effect in whole-chunk mode (the halo covers the receptive "
                        "field; no windows are blended); use --mode window to blend windows",
                        " and ".join(FLAGS[k] for k in ignored),
                        "has" if len(ignored) == 1 else "have")
    out = Path(output) if output is not None else m.path
    inside = out.expanduser().resolve() == m.path.resolve()
    run = SegmentRun(settings, m, ens, out, inside, name, plan, inner, factor, tta,
                     uncertainty, overwrite, resume, gpu_resources)
    _check_output(run)
    log.info("segment settings: %s", settings.describe())
    return run


def _warn_pixel_size(mosaic_um: float | None, model_um: float | None) -> None:
    if mosaic_um is None:
        log.warning("the mosaic's pixel size is unknown; assuming it matches the model's "
                    "training pixel size (%s um). Set it with semdask convert --pixel-size.",
                    model_um)
    elif model_um is not None and abs(mosaic_um / model_um - 1.0) > 0.05:
        log.warning("pixel size %.4g um differs from the model's %.4g um (ratio %.2f); "
                    "accuracy drops away from the training scale", mosaic_um, model_um,
                    mosaic_um / model_um)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_on_workers(client: Any) -> list[bool]:
    """Whether each worker (this process without a client) has CUDA; [] when unknown."""
    if client is None:
        return [_has_cuda()]
    try:
        return [bool(v) for v in client.run(_has_cuda).values()]
    except Exception as e:  # a probe only: each worker checks its device again
        log.debug("could not ask the workers for CUDA (%s): checked on the workers later", e)
        return []


def _check_device(s: Settings, client: Any) -> None:
    """An explicit CUDA device, or fp16, must exist where the blocks will run."""
    cuda = s.device.startswith("cuda")
    fp16 = s.precision is Precision.FP16
    if s.device == "cpu" and fp16:
        raise InputError("precision", expected="fp32 or bf16 on CPU", got="fp16",
                         fix="use --precision bf16 (fp16 is for CUDA devices)")
    if not (cuda or fp16) or s.device in ("mps",):
        return
    have = _cuda_on_workers(client)
    missing = sum(not h for h in have)
    if not missing:
        return
    where = "this machine" if client is None else f"{missing} of {len(have)} workers"
    if cuda:
        raise InputError("device", expected="a CUDA device on every worker",
                         got=f"{s.device!r}, but {where} without CUDA",
                         fix="use --device auto (or cpu), or a GPU profile: --profile local-cuda")
    raise InputError("precision", expected="fp16 only where every worker has CUDA",
                     got=f"fp16, but {where} without CUDA",
                     fix="use --precision bf16 (or fp32) on CPU workers")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_output(run: SegmentRun) -> None:
    """The output can be written and would not replace anything unasked (no side effects)."""
    from semdask.paths import is_store
    from semdask.storage.ownership import check_output

    # whose output it is first (semdask.storage.ownership): foreign data is refused whatever
    # the flags; execute() checks again while holding the output's writer lock
    check_output(run.mosaic, run.output, groups=run.written, overwrite=run.overwrite,
                 resume=run.resume)
    out = run.output.expanduser()
    keep = run.overwrite or run.resume
    fix_over = "pass --overwrite to replace it, or --resume to continue an earlier run"
    if out.is_symlink() and not run.inside:
        raise UnsafePathError(f"output {out}", expected="a new path", got="a symlink",
                              fix="remove the symlink or choose another --output")
    if out.exists() and not out.is_dir():
        raise UnsafePathError(f"output {out}", expected="a new directory path",
                              got="an existing file", fix="choose another --output")
    if not run.inside and out.is_dir() and any(out.iterdir()):
        if not is_store(out):
            raise UnsafePathError(f"output {out}", expected="a new path or a Zarr store",
                                  got="a non-empty directory that is not a Zarr store",
                                  fix="choose another --output (semdask never deletes it)")
        if not keep:
            raise UnsafePathError(f"output {out}", expected="a new path",
                                  got="an existing Zarr store", fix=fix_over)
    if run.inside or out.exists():
        present = [g for g in run.written if (out / g).exists()]
        if present and not keep:
            raise UnsafePathError(f"{out}/{present[0]}", expected="a new output",
                                  got="an existing one", fix=fix_over)
    target = _nearest_existing(out.resolve())
    if not target.is_dir():
        raise UnsafePathError(f"output {out}", expected="a path inside a directory",
                              got=f"{target} is a file", fix="choose another --output")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UnsafePathError(f"output {out}", expected="a writable location",
                              got=f"{target} is read-only for this user",
                              fix="choose a writable --output (e.g. under your home or "
                              "scratch directory), or fix the permissions")
