"""Evaluate predicted label maps against truth: pooled, chunking-independent metrics.

Accuracy, per-class IoU, Dice (F1), precision and recall, boundary F1 within a pixel
tolerance, the normalised confusion matrix and class frequencies, all computed from integer
counts summed over Dask chunks (:mod:`semdask.analysis.metrics`), so the numbers do not depend
on the chunking. Truth pixels equal to 255 (ignore) are skipped everywhere. Several image pairs
(two folders matched by file stem) give pooled metrics plus one row per image.

Examples
--------
>>> import numpy as np
>>> t = np.kron(np.array([[0, 1], [2, 0]], np.uint8), np.ones((8, 8), np.uint8))
>>> p = t.copy(); p[0, :8] = 2
>>> ev = evaluate(p, t, classes=["a", "b", "c"], tolerance=1, overlay=False)
>>> ev.pooled.accuracy, ev.pooled.confusion.tolist()
(0.96875, [[120, 0, 8], [0, 64, 0], [0, 0, 64]])
>>> round(ev.pooled.to_dict()["classes"][0]["iou"], 4)
0.9375
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from semdask.analysis import boundary, metrics
from semdask.analysis.metrics import Scores
from semdask.errors import InputError, StoreError
from semdask.paths import is_store, validate_input_path

__all__ = ["Evaluation", "ImageResult", "LabelPair", "Overlay", "Scores", "evaluate",
           "evaluate_pairs"]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
IGNORE = metrics.IGNORE
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class LabelPair:
    """One prediction/truth pair of label maps (y, x) and, optionally, its image pyramid."""

    name: str
    pred: da.Array
    truth: da.Array
    image: tuple[da.Array, ...] = ()
    source: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageResult:
    """Scores of one image pair."""

    name: str
    shape: tuple[int, int]
    scores: Scores
    source: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Overlay:
    """Error map (share of wrong labelled pixels, 0..1) and grey background at one level."""

    name: str
    level: int
    background: np.ndarray
    error: np.ndarray
    background_is_image: bool


@dataclass(frozen=True)
class Evaluation:
    """Pooled scores over all pairs, per-image scores and (optionally) error overlays."""

    classes: list[str]
    colours: list[tuple[int, int, int, int]]
    tolerance: float
    pooled: Scores
    images: list[ImageResult]
    overlays: list[Overlay] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "tolerance_px": self.tolerance, "ignore": IGNORE,
                "confusion_rows": "truth", "pooled": self.pooled.to_dict(),
                "images": [{"name": r.name, "shape": list(r.shape), **r.source,
                            **r.scores.to_dict()} for r in self.images]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_dataframe(self, by: str = "class") -> Any:
        """Pooled per-class scores (``by="class"``) or one row per image (``by="image"``)
        as a pandas DataFrame; the confusion matrix: ``pooled.confusion_dataarray()``."""
        from semdask.analysis.tables import evaluation_frame

        return evaluation_frame(self, by)

    def table(self) -> str:
        """Plain-text summary: pooled totals, per-class rows, then one line per image."""
        s = self.pooled
        pc = s.per_class()
        lines = [f"{len(self.images)} image(s), {s.pixels} labelled px: accuracy "
                 f"{100 * s.accuracy:.2f} %, mIoU {s.miou:.4f}, mean Dice {s.mean_dice:.4f}, "
                 f"boundary F1 (tol {self.tolerance:g} px) {s.boundary_f1:.4f} "
                 f"(all classes {s.boundary_f1_all:.4f})",
                 f"{'class':<16}{'truth %':>8}{'pred %':>8}{'IoU':>8}{'Dice':>8}{'prec':>8}"
                 f"{'recall':>8}{'BF1':>8}"]
        for i, name in enumerate(self.classes):
            lines.append(f"{name[:15]:<16}{100 * pc['truth_frequency'][i]:>8.2f}"
                         f"{100 * pc['pred_frequency'][i]:>8.2f}" + "".join(
                             f"{pc[k][i]:>8.4f}" for k in ("iou", "dice", "precision",
                                                           "recall", "boundary_f1")))
        if len(self.images) > 1:
            lines.append(f"{'image':<24}{'accuracy':>10}{'mIoU':>8}{'BF1':>8}")
            lines += [f"{r.name[:23]:<24}{100 * r.scores.accuracy:>9.2f}%"
                      f"{r.scores.miou:>8.4f}{r.scores.boundary_f1:>8.4f}" for r in self.images]
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs


def _read_file(path: Path, *, labels: bool = True) -> da.Array:
    from semdask.ingest.readers import open_image

    if labels and path.suffix.lower() in (".png", ".bmp"):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":  # palette image: the indices are the class ids
                return da.from_array(np.asarray(im))
    info = open_image(path)
    if labels and not np.issubdtype(info.dtype, np.integer):
        raise InputError(f"labels {path}", expected="integer class ids",
                         got=f"dtype {info.dtype}", fix="save labels as 8-bit PNG or TIFF")
    return da.from_array(info, chunks=-1 if info.fmt != "tiff" else "auto",
                         meta=np.empty((0, 0), info.dtype))


def _open_side(path: Path, labels: str) -> tuple[da.Array, list[str] | None, Any]:
    if is_store(path):
        from semdask.storage import io

        lab = io.open_labels(path, labels)
        return lab.data, lab.classes, lab.colours
    return _read_file(path), None, None


def _image_levels(path: Path | None) -> tuple[da.Array, ...]:
    if path is None:
        return ()
    if is_store(path):
        from semdask.storage import io

        with contextlib.suppress(StoreError):
            m = io.open_mosaic(path)
            return tuple(m.level(i) for i in range(m.levels))
        return ()
    return (_read_file(path, labels=False),) if path.is_file() else ()


def _folder(path: Path) -> dict[str, Path]:
    files = {f.stem: f for f in sorted(path.iterdir()) if f.suffix.lower() in LABEL_SUFFIXES}
    if not files:
        raise InputError(f"folder {path}", expected=f"label images ({', '.join(LABEL_SUFFIXES)})",
                         got="none", fix="pass a folder of PNG/TIFF label images")
    return files


def _resolve(pred: Any, truth: Any, *, pred_labels: str, truth_labels: str,
             image: PathLike | Any) -> tuple[list[LabelPair], list[str] | None, Any]:
    if not isinstance(pred, str | os.PathLike):
        pair = LabelPair("array", da.asarray(pred), da.asarray(truth),
                         (da.asarray(image),) if image is not None else ())
        return [pair], None, None
    pp, tp = validate_input_path(Path(pred)), validate_input_path(Path(truth))
    ip = validate_input_path(Path(image)) if image is not None else None
    folders = [p.is_dir() and not is_store(p) for p in (pp, tp)]
    if any(folders):
        if not all(folders):
            raise InputError("PRED and TRUTH", expected="two folders or two label maps",
                             got=f"{pp} and {tp}", fix="pass matching kinds of input")
        pf, tf = _folder(pp), _folder(tp)
        stems = sorted(set(pf) & set(tf))
        if not stems:
            raise InputError(f"folders {pp} and {tp}", expected="label images with the same "
                             "file stems", got=f"{sorted(pf)[:3]}... and {sorted(tf)[:3]}...",
                             fix="name each prediction like its truth image")
        left = sorted(set(pf) ^ set(tf))
        if left:
            log.warning("evaluate: %d image(s) without a partner skipped: %s", len(left),
                        ", ".join(left[:10]))
        imgs = _folder(ip) if ip is not None and ip.is_dir() and not is_store(ip) else {}
        pairs = [LabelPair(s, _read_file(pf[s]), _read_file(tf[s]),
                           _image_levels(imgs.get(s)), {"pred": str(pf[s]), "truth": str(tf[s])})
                 for s in stems]
        return pairs, None, None
    p, pc, pcol = _open_side(pp, pred_labels)
    t, tc, tcol = _open_side(tp, truth_labels)
    if pc is not None and tc is not None and len(pc) != len(tc):
        raise InputError("classes", expected=f"the truth's {len(tc)} classes {tc}",
                         got=f"{len(pc)} predicted classes {pc}",
                         fix="compare label maps of the same class set")
    if pc is not None and tc is not None and pc != tc:
        log.warning("evaluate: class names differ (pred %s, truth %s); using the truth's", pc, tc)
    img = ip if ip is not None else next((s for s in (pp, tp) if is_store(s)), None)
    src = {"pred": str(pp) + (f"/labels/{pred_labels}" if pc is not None else ""),
           "truth": str(tp) + (f"/labels/{truth_labels}" if tc is not None else "")}
    pair = LabelPair(pp.name, p, t, _image_levels(img), src)
    return [pair], tc or pc, tcol or pcol


# ------------------------------------------------------------------ computation


def _reduce(x: da.Array, f: int) -> da.Array:
    """Mean over ``f`` x ``f`` blocks (the incomplete edge is dropped)."""
    x = x.astype(np.float32)
    if f == 1:
        return x
    h, w = (s // f * f for s in x.shape)
    x = x[:max(h, f), :max(w, f)]
    c = max(f, x.chunksize[0] // f * f)
    return da.coarsen(np.mean, x.rechunk(c), {0: f, 1: f}, trim_excess=True)


def _overlay_graph(pair: LabelPair, n: int, level: int | None,
                   max_side: int) -> tuple[int, da.Array, da.Array, bool]:
    t, p = pair.truth, pair.pred.rechunk(pair.truth.chunks)
    if level is None:
        level = 0
        while max(t.shape) / 2 ** level > max_side:
            level += 1
    f = 2 ** level
    err = _reduce(((p != t) & (t != IGNORE) & (t < n)), f)
    if pair.image:
        k = min(level, len(pair.image) - 1)
        bg = _reduce(pair.image[k], 2 ** (level - k))
    else:
        bg = _reduce(da.where(t < n, t, 0).astype(np.float32) * (255.0 / max(n - 1, 1)), f)
    h, w = (min(a, b) for a, b in zip(err.shape, bg.shape, strict=True))
    return level, bg[:h, :w], err[:h, :w], bool(pair.image)


def _compute(jobs: Sequence[Any], progress: bool) -> tuple[Any, ...]:
    if not progress:
        return tuple(dask.compute(*jobs))
    client = None
    with contextlib.suppress(ImportError, ValueError):
        from distributed import default_client

        client = default_client()
    if client is None:
        from semdask.progress import DaskProgress

        with DaskProgress("evaluate"):
            return tuple(dask.compute(*jobs))
    from distributed import as_completed

    from semdask.progress import Progress

    futures = client.compute(list(jobs))
    with Progress(len(futures), "evaluate", unit="part") as bar:
        for _ in as_completed(futures):
            bar.update()
    return tuple(client.gather(futures))


def evaluate_pairs(pairs: Sequence[LabelPair], *, classes: Sequence[str] | None = None,
                   colours: Sequence[tuple[int, int, int, int]] | None = None,
                   tolerance: float = 2.0, chunk: int | None = None, overlay: bool = True,
                   level: int | None = None, max_side: int = 1024,
                   progress: bool = False) -> Evaluation:
    """Score label pairs in one Dask computation; see :func:`evaluate`."""
    from semdask.storage.ome import default_colours

    if not pairs:
        raise InputError("pairs", expected="at least one prediction/truth pair", got="none")
    ps = []
    for pr in pairs:
        if pr.pred.ndim != 2 or pr.pred.shape != pr.truth.shape:
            raise InputError(f"prediction {pr.source.get('pred', pr.name)}",
                             expected=f"the truth's shape {pr.truth.shape}",
                             got=f"shape {pr.pred.shape}",
                             fix="compare label maps of the same image and pyramid level")
        if overlay and pr.image and pr.image[0].shape != pr.truth.shape:
            raise InputError(f"image of {pr.name}", expected=f"the labels' shape {pr.truth.shape}",
                             got=f"shape {pr.image[0].shape}",
                             fix="pass the image the labels belong to (--image)")
        t = pr.truth.rechunk(chunk) if chunk else pr.truth
        ps.append(LabelPair(pr.name, pr.pred.rechunk(t.chunks), t, pr.image, pr.source))
    if classes is None:
        hi = _compute([da.maximum(da.where(q.truth == IGNORE, 0, q.truth).max(),
                                  da.where(q.pred == IGNORE, 0, q.pred).max()) for q in ps],
                      progress)
        classes = [str(i) for i in range(int(max(hi)) + 1)]
        log.info("evaluate: no class names given; classes 0..%d from the label ids",
                 len(classes) - 1)
    n = len(classes)
    jobs: list[Any] = []
    for q in ps:
        jobs += [metrics.confusion_matrix(q.pred, q.truth, n),
                 boundary.boundary_counts(q.pred, q.truth, n, tolerance=tolerance),
                 da.where(q.truth == IGNORE, 0, q.truth).max()]
    ovs = [_overlay_graph(q, n, level, max_side) for q in ps[:4]] if overlay else []
    out = _compute([*jobs, *[(o[1], o[2]) for o in ovs]], progress)
    results = []
    for i, q in enumerate(ps):
        cm, bc, tmax = out[3 * i: 3 * i + 3]
        if int(tmax) >= n:
            raise InputError(f"truth {q.source.get('truth', q.name)}",
                             expected=f"class ids < {n} (or 255 = ignore) for {list(classes)}",
                             got=f"ids up to {int(tmax)}",
                             fix="pass the matching --classes or fix the truth labels")
        results.append(ImageResult(q.name, (int(q.truth.shape[0]), int(q.truth.shape[1])),
                                   Scores(np.asarray(cm), np.asarray(bc), list(classes)),
                                   q.source))
    pooled = Scores(sum(r.scores.confusion for r in results),  # type: ignore[arg-type]
                    sum(r.scores.boundary for r in results),  # type: ignore[arg-type]
                    list(classes))
    overlays = [Overlay(q.name, o[0], np.asarray(bg), np.asarray(er), o[3])
                for q, o, (bg, er) in zip(ps, ovs, out[len(jobs):], strict=False)]
    cols = [(int(c[0]), int(c[1]), int(c[2]), int(c[3])) for c in (colours or default_colours(n))]
    return Evaluation(list(classes), cols,
                      float(tolerance), pooled, results, overlays)


def evaluate(pred: Any, truth: Any, *, pred_labels: str = "phases", truth_labels: str = "truth",
             classes: Sequence[str] | None = None, tolerance: float = 2.0,
             image: PathLike | Any = None, chunk: int | None = None, overlay: bool = True,
             level: int | None = None, max_side: int = 1024,
             progress: bool = False) -> Evaluation:
    """Compare predicted labels with the truth: pooled, chunking-independent metrics.

    Parameters
    ----------
    pred, truth : path or array
        OME-Zarr stores (``labels/<pred_labels>``, ``labels/<truth_labels>``), folders of
        PNG/TIFF label images matched by file stem, single label images, or 2-D arrays.
    pred_labels, truth_labels : str
        Label group names in the stores.
    classes : sequence of str, optional
        Class names [default: the stores' label metadata, else ``0..max id``].
    tolerance : float
        Boundary match distance in px (Euclidean; 0 = the same pixel).
    image : path or array, optional
        Image for the error overlay (a store, an image file, or a folder matched by stem;
        an array when PRED and TRUTH are arrays) [default: the image of the PRED (or TRUTH)
        store].
    chunk : int, optional
        Rechunk to this edge (the numbers do not change; memory and parallelism do).
    overlay, level, max_side
        Compute the error overlay (of up to 4 pairs) at pyramid ``level`` [default: the finest
        whose longer side is <= ``max_side``].
    progress : bool
        Show a progress bar on stderr.

    Raises
    ------
    UnsafePathError
        A path does not exist.
    InputError
        Shapes or class counts do not match, ids outside the classes, unmatched folders.
    """
    pairs, names, cols = _resolve(pred, truth, pred_labels=pred_labels,
                                  truth_labels=truth_labels, image=image)
    if classes is not None and names is not None and len(classes) != len(names):
        raise InputError("classes", expected=f"{len(names)} names like the store's {names}",
                         got=f"{len(classes)} names {list(classes)}",
                         fix="omit --classes to use the store's names")
    return evaluate_pairs(pairs, classes=classes or names, colours=cols, tolerance=tolerance,
                          chunk=chunk, overlay=overlay, level=level, max_side=max_side,
                          progress=progress)
