"""Counts, confusion matrices, segmentation scores and phase fractions from pooled counts.

Every figure here is computed from integer counts summed over blocks, so it
does not depend on the chunking (a fraction of means would). Boundary F1 counts are in
:mod:`semdask.analysis.boundary`.

Examples
--------
>>> import numpy as np, dask.array as da
>>> lab = da.from_array(np.array([[0, 0, 1, 3]] * 4, np.uint8), chunks=2)
>>> class_counts(lab, 4).compute().tolist()
[8, 4, 0, 4]
>>> t = phase_fractions(lab, classes=["pore", "Ni", "NiO", "YSZ"], pixel_size_um=0.5)
>>> [round(r.fraction, 3) for r in t.rows], t.rows[0].area_um2
([0.5, 0.25, 0.0, 0.25], 2.0)
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from semdask.analysis.boundary import boundary_scores
from semdask.errors import InputError

__all__ = [
    "FractionRow",
    "Fractions",
    "Scores",
    "class_counts",
    "class_scores",
    "confusion_matrix",
    "mosaic_fractions",
    "phase_fractions",
    "scores_from_confusion",
]

IGNORE = 255


def _bincount_blocks(x: da.Array, n: int) -> da.Array:
    def _count(b: np.ndarray) -> np.ndarray:
        b = b.ravel()
        return np.bincount(b[b < n].astype(np.intp), minlength=n)[:n].reshape(
            (1,) * x.ndim + (n,)).astype(np.int64)

    parts = da.map_blocks(_count, x, dtype=np.int64, new_axis=x.ndim,
                          chunks=(*((1,) * k for k in x.numblocks), (n,)),
                          meta=np.empty((0,) * (x.ndim + 1), np.int64))
    return parts.sum(axis=tuple(range(x.ndim)))


def class_counts(labels: Any, n_classes: int) -> da.Array:
    """Pixels per class (values >= ``n_classes``, e.g. 255 = ignore, are not counted)."""
    return _bincount_blocks(da.asarray(labels), int(n_classes))


def confusion_matrix(pred: Any, truth: Any, n_classes: int, *, ignore: int = IGNORE) -> da.Array:
    """Pooled confusion matrix ``cm[truth, pred]`` (rows: truth), int64.

    Pixels whose truth is ``ignore`` (or outside the classes) are skipped; a
    prediction outside the classes is an error.
    """
    p, t = da.asarray(pred), da.asarray(truth)
    if p.shape != t.shape:
        raise InputError("prediction", expected=f"the truth's shape {t.shape}",
                         got=f"shape {p.shape}", fix="compare label maps of the same mosaic/level")
    p = p.rechunk(t.chunks)
    n = int(n_classes)

    def _cm(pb: np.ndarray, tb: np.ndarray) -> np.ndarray:
        keep = (tb < n) & (tb != ignore)
        pk = pb[keep].astype(np.intp)
        if pk.size and int(pk.max()) >= n:
            raise InputError("prediction", expected=f"class ids < {n} where the truth is labelled",
                             got=f"ids up to {int(pk.max())}",
                             fix="compare label maps with the same classes")
        out = np.bincount(tb[keep].astype(np.intp) * n + pk, minlength=n * n)
        return out.reshape((1,) * pb.ndim + (n, n)).astype(np.int64)

    parts = da.map_blocks(_cm, p, t, dtype=np.int64, new_axis=[p.ndim, p.ndim + 1],
                          chunks=(*((1,) * k for k in p.numblocks), (n,), (n,)),
                          meta=np.empty((0,) * (p.ndim + 2), np.int64))
    return parts.sum(axis=tuple(range(p.ndim)))


def scores_from_confusion(cm: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, per-class IoU and mean IoU (classes absent from truth and prediction skipped).

    >>> s = scores_from_confusion(np.array([[3, 1], [0, 4]]))
    >>> s["accuracy"], round(s["miou"], 4), [round(v, 3) for v in s["iou"].values()]
    (0.875, 0.775, [0.75, 0.8])
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    names = list(classes) if classes is not None else [str(i) for i in range(n)]
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = {names[i]: float(tp[i] / union[i]) for i in range(n) if union[i] > 0}
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "iou": iou,
        "miou": float(np.mean(list(iou.values()))) if iou else float("nan"),
        "pixels": int(total),
    }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class IoU, Dice (F1), precision and recall of a pooled ``cm[truth, pred]``.

    A score whose denominator is zero (a class absent from truth and prediction) is NaN.

    >>> s = class_scores(np.array([[3, 1], [0, 4]]))
    >>> [s[k].round(3).tolist() for k in ("iou", "dice", "precision", "recall")]
    [[0.75, 0.8], [0.857, 0.889], [1.0, 0.8], [0.75, 1.0]]
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    return {"iou": _ratio(tp, tp + fp + fn), "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}


def _num(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


@dataclass(frozen=True)
class Scores:
    """Metrics of pooled counts: ``confusion[truth, pred]`` and boundary counts.

    ``boundary`` is :func:`boundary_counts` (4, n + 1): predicted, matched
    predicted, truth, matched truth boundary pixels per class and for all classes together.
    """

    confusion: np.ndarray
    boundary: np.ndarray
    classes: list[str]

    @property
    def pixels(self) -> int:
        """Evaluated (labelled truth) pixels."""
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.pixels) if self.pixels else float("nan")

    def per_class(self) -> dict[str, np.ndarray]:
        """Per-class arrays: iou, dice, precision, recall, boundary_{precision,recall,f1},
        truth/pred pixels and frequencies."""
        cm = self.confusion
        b = boundary_scores(self.boundary)
        n = len(self.classes)
        tot = max(self.pixels, 1)
        return {**class_scores(cm),
                **{f"boundary_{k}": v[:n] for k, v in b.items()},
                "truth_pixels": cm.sum(1), "pred_pixels": cm.sum(0),
                "truth_frequency": cm.sum(1) / tot, "pred_frequency": cm.sum(0) / tot}

    def _mean(self, key: str) -> float:
        v = self.per_class()[key]
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    @property
    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction."""
        return self._mean("iou")

    @property
    def mean_dice(self) -> float:
        return self._mean("dice")

    @property
    def boundary_f1(self) -> float:
        """Mean per-class boundary F1 (classes with boundary pixels in truth or prediction)."""
        return self._mean("boundary_f1")

    @property
    def boundary_f1_all(self) -> float:
        """Class-agnostic boundary F1 (any class change matches any class change)."""
        return float(boundary_scores(self.boundary)["f1"][-1])

    def to_dataframe(self) -> Any:
        """Per-class scores as a pandas DataFrame (index: class name)."""
        from semdask.analysis.tables import scores_frame

        return scores_frame(self)

    def confusion_dataarray(self, *, normalised: bool = False) -> Any:
        """The confusion matrix as an xarray DataArray, dims ``("truth", "pred")``."""
        from semdask.analysis.tables import confusion_dataarray

        return confusion_dataarray(self, normalised=normalised)

    def normalised_confusion(self) -> np.ndarray:
        """Rows (truth) sum to 1; NaN rows for classes absent from the truth."""
        rows = self.confusion.sum(1, keepdims=True).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(rows > 0, self.confusion / np.where(rows > 0, rows, 1), np.nan)

    def to_dict(self) -> dict[str, Any]:
        pc = self.per_class()
        ball = boundary_scores(self.boundary)
        return {
            "pixels": self.pixels, "accuracy": _num(self.accuracy), "miou": _num(self.miou),
            "mean_dice": _num(self.mean_dice), "boundary_f1": _num(self.boundary_f1),
            "boundary_f1_all": _num(self.boundary_f1_all),
            "boundary_precision_all": _num(ball["precision"][-1]),
            "boundary_recall_all": _num(ball["recall"][-1]),
            "classes": [{"label": i, "name": name,
                         **{k: (int(v[i]) if k.endswith("pixels") else _num(v[i]))
                            for k, v in pc.items()},
                         "boundary_pred_px": int(self.boundary[0, i]),
                         "boundary_truth_px": int(self.boundary[2, i])}
                        for i, name in enumerate(self.classes)],
            "confusion": self.confusion.astype(int).tolist(),
            "confusion_normalised": [[_num(v) for v in r] for r in self.normalised_confusion()],
        }


@dataclass(frozen=True)
class FractionRow:
    """One phase: pixel count, area fraction and area."""

    label: int
    name: str
    pixels: int
    fraction: float
    area_um2: float | None


@dataclass(frozen=True)
class Fractions:
    """Phase fractions of one label map (pooled counts)."""

    rows: list[FractionRow]
    total_pixels: int
    pixel_size_um: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total_pixels": self.total_pixels, "pixel_size_um": self.pixel_size_um,
                "phases": [asdict(r) for r in self.rows], **self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per phase (:mod:`semdask.analysis.tables`)."""
        from semdask.analysis.tables import fractions_frame

        return fractions_frame(self)

    def to_csv(self) -> str:
        buf = _io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "name", "pixels", "fraction", "area_um2"])
        for r in self.rows:
            w.writerow([r.label, r.name, r.pixels, f"{r.fraction:.6f}",
                        "" if r.area_um2 is None else f"{r.area_um2:.4f}"])
        return buf.getvalue()

    def table(self, truth: Fractions | None = None) -> str:
        """A plain-text table, optionally beside a reference (truth) fraction."""
        head = f"{'phase':<8}{'fraction %':>12}" + (f"{'truth %':>10}{'diff pp':>9}" if truth
                                                     else "") + f"{'area um^2':>14}"
        lines = [head]
        ref = {r.label: r.fraction for r in truth.rows} if truth else {}
        for r in self.rows:
            s = f"{r.name:<8}{100 * r.fraction:>12.2f}"
            if truth:
                t = ref.get(r.label, 0.0)
                s += f"{100 * t:>10.2f}{100 * (r.fraction - t):>+9.2f}"
            s += f"{r.area_um2:>14.1f}" if r.area_um2 is not None else f"{'-':>14}"
            lines.append(s)
        return "\n".join(lines)


def phase_fractions(
    labels: Any,
    *,
    classes: Sequence[str],
    pixel_size_um: float | None = None,
) -> Fractions:
    """Per-class area fractions (and areas in um^2 when the pixel size is known).

    Pixels with ids outside ``classes`` (e.g. 255, unlabelled) are left out of the total.
    """
    counts = np.asarray(class_counts(labels, len(classes)).compute())
    total = int(counts.sum())
    if total == 0:
        raise InputError("labels", expected="at least one labelled pixel", got="none")
    px_area = None if pixel_size_um is None else float(pixel_size_um) ** 2
    rows = [FractionRow(i, str(name), int(c), float(c / total),
                        None if px_area is None else float(c * px_area))
            for i, (name, c) in enumerate(zip(classes, counts, strict=True))]
    return Fractions(rows, total, pixel_size_um)


def mosaic_fractions(
    mosaic: Any,
    *,
    labels: str = "phases",
    pixel_size_um: float | None = None,
) -> Fractions:
    """Phase fractions of ``<mosaic>/labels/<labels>`` (pixel size from the store by default)."""
    from semdask.storage import io as sio

    lab = sio.open_labels(mosaic, labels)
    px = pixel_size_um if pixel_size_um is not None else sio.open_mosaic(mosaic).pixel_size_um
    f = phase_fractions(lab.data, classes=lab.classes, pixel_size_um=px)
    return Fractions(f.rows, f.total_pixels, f.pixel_size_um,
                     {"mosaic": str(mosaic), "labels": labels})
