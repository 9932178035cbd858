"""Train at one pixel size: resample training stores to a target scale before training.

A U-Net sees a fixed number of pixels; what it can recognise depends on how many
micrometres they cover. Thin features that need context (coating cracks, oxide
scale) are learnt better at a coarser pixel size, and stores acquired at different
magnifications must be brought to one scale before they are mixed. ``semdask train
--pixel-size UM`` or ``--scale F`` writes resampled copies of the stores (image:
antialiased linear, :func:`semdask.inference.rescale.resample`; labels: nearest, so 255 stays
"unlabelled"; per-pixel weights: linear) into a working folder, trains on them, and
the model records the new pixel size, so ``semdask segment`` resamples any mosaic to
it and the labels back to the mosaic's grid by itself.

Examples
--------
>>> factors_for([0.05, 0.1, None], pixel_size_um=0.1)
[0.5, 1.0, None]
>>> factors_for([0.05, 0.1], scale=0.5)
[0.5, 0.5]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from semdask.errors import InputError
from semdask.inference.rescale import TOLERANCE, resample, target_shape

__all__ = ["ScaledStores", "factors_for", "rescale_store", "training_scale"]

log = logging.getLogger(__name__)


@dataclass
class ScaledStores:
    """The stores to train on and what was done to each original."""

    paths: list[Path]
    originals: list[Path]
    factors: list[float]
    pixel_sizes_um: list[float | None]

    @property
    def rescaled(self) -> bool:
        """Whether any store was resampled."""
        return any(f != 1.0 for f in self.factors)


def factors_for(pixel_sizes_um: Sequence[float | None], *, pixel_size_um: float | None = None,
                scale: float | None = None) -> list[float | None]:
    """Output pixels per input pixel for each store (``None``: pixel size unknown).

    ``pixel_size_um`` is a target for every store (factor = store's / target);
    ``scale`` multiplies every store's sampling (0.5 = half the pixels, twice the
    pixel size). Factors within :data:`semdask.inference.rescale.TOLERANCE` of 1 become 1.
    """
    if (pixel_size_um is None) == (scale is None):
        raise InputError("training scale", expected="exactly one of --pixel-size or --scale",
                         got=f"pixel_size_um={pixel_size_um}, scale={scale}")
    target = pixel_size_um if pixel_size_um is not None else scale
    if target is None or not np.isfinite(target) or target <= 0:
        raise InputError("--pixel-size" if pixel_size_um is not None else "--scale",
                         expected="a finite number > 0", got=repr(target))
    out: list[float | None] = []
    for p in pixel_sizes_um:
        if scale is not None:
            f: float | None = float(scale)
        elif p:
            f = float(p) / float(pixel_size_um)  # type: ignore[arg-type]
        else:
            f = None
        out.append(1.0 if f is not None and abs(f - 1.0) <= TOLERANCE else f)
    return out


def rescale_store(src: str | os.PathLike[str], dst: str | os.PathLike[str], factor: float, *,
                  labels: str = "truth", weights: str | None = None,
                  chunk: int = 1024) -> Path:
    """Write ``src`` resampled by ``factor`` (image, ``labels/<labels>``, ``weights``) to ``dst``.

    The image keeps its dtype (integers rounded and clipped); the pixel size becomes
    ``pixel_size / factor``. ``dst`` must not exist.
    """
    from semdask.storage import io as sio

    src, dst = Path(src), Path(dst)
    m = sio.open_mosaic(src)
    shape = target_shape(m.image.shape, factor)
    if min(shape) < 16:
        raise InputError(f"{src} at scale {factor:g}", expected="at least 16 px per side",
                         got=f"{shape}", fix="use a scale closer to 1")
    img = resample(m.image, factor, chunk=chunk)
    if np.issubdtype(m.image.dtype, np.integer):
        info = np.iinfo(m.image.dtype)
        img = da.clip(da.round(img), info.min, info.max)
    img = img.astype(m.image.dtype)
    px = m.pixel_size_um / factor if m.pixel_size_um else None
    sio.write_image(dst, img, pixel_size_um=px, chunk=chunk,
                    attrs={"rescaled_from": {"store": str(src), "factor": factor,
                                             "pixel_size_um": m.pixel_size_um}})
    lab = sio.open_labels(src, labels)
    sio.write_labels(dst, resample(lab.data, factor, shape=shape, chunk=chunk, order=0),
                     name=labels, classes=lab.classes, colours=lab.colours, chunk=chunk)
    if weights is not None:
        w = sio.open_extra_image(src, weights)
        sio.write_extra_image(dst, weights, resample(w.astype(np.float32), factor, shape=shape,
                                                     chunk=chunk),
                              pixel_size_um=px, chunk=chunk)
    return dst


@contextmanager
def training_scale(stores: Sequence[str | os.PathLike[str]], *,
                   pixel_size_um: float | None = None, scale: float | None = None,
                   labels: str = "truth", weights: str | None = None,
                   work_dir: str | os.PathLike[str] | None = None) -> Iterator[ScaledStores]:
    """Yield the stores at the training scale; resampled copies live until the block ends.

    With neither ``pixel_size_um`` nor ``scale`` the stores are yielded unchanged.
    Copies go to a fresh folder inside ``work_dir`` (default: the system's temporary
    folder), removed afterwards.
    """
    from semdask.storage import io as sio

    originals = [Path(s) for s in stores]
    sizes = [sio.open_mosaic(p).pixel_size_um for p in originals]
    if pixel_size_um is None and scale is None:
        yield ScaledStores(originals, originals, [1.0] * len(originals), sizes)
        return
    factors = factors_for(sizes, pixel_size_um=pixel_size_um, scale=scale)
    unknown = [str(p) for p, f in zip(originals, factors, strict=True) if f is None]
    if unknown:
        raise InputError("pixel size of " + ", ".join(unknown), expected="a pixel size in the "
                         "store's metadata", got="none",
                         fix="semdask convert --pixel-size UM, or train with --scale F")
    if scale is not None and any(sizes) and not all(sizes):
        raise InputError("pixel sizes of the training stores", expected="all known or all "
                         "unknown with --scale", got=", ".join(str(s) for s in sizes),
                         fix="semdask convert --pixel-size UM for every store")
    tmp = Path(tempfile.mkdtemp(prefix="semdask-train-scale-", dir=work_dir))
    try:
        paths: list[Path] = []
        for i, (p, f) in enumerate(zip(originals, factors, strict=True)):
            assert f is not None
            if f == 1.0:
                paths.append(p)
                continue
            dst = tmp / f"{i:03d}-{p.name}"
            log.info("resampling training store %s by %.4g (%s um -> %.4g um)", p, f,
                     f"{sizes[i]:.4g}" if sizes[i] else "?",
                     (sizes[i] or 0) / f)
            paths.append(rescale_store(p, dst, f, labels=labels, weights=weights))
        new = [(s / f if s else None) for s, f in zip(sizes, factors, strict=True)]  # type: ignore[operator]
        yield ScaledStores(paths, originals, [float(f) for f in factors], new)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
