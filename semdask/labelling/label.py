"""EDS-guided random-forest labelling of SEM mosaics (the paper's Ilastik step, on Dask).

``label`` turns a mosaic, its EDS element maps (lower resolution, possibly shifted) and a
few scribbles into ``labels/<name>`` plus a float16 ``<name>-confidence`` image:

1. EDS maps are registered to the SEM image per tile (:func:`register_eds`: sub-pixel
   phase cross-correlation against an SEM-from-EDS least-squares proxy; outlier tiles
   rejected, a smooth shift field) and upsampled onto SEM pixels (:func:`upsample_eds`,
   bilinear, lazily with ``map_overlap``).
2. Multiscale features of SEM and EDS channels (:func:`feature_stack`: ``map_overlap`` with
   the halo ``ceil(4 * max sigma)`` of the :class:`~semdask.labelling.features.FeatureSpec`).
3. A random forest (or any injected ``classifier`` with fit/predict(_proba)) is fitted on
   the annotated pixels, gathered only from the chunks that hold annotations
   (:func:`training_pixels`), then predicts every chunk (:func:`predict_probs`; the fitted
   classifier is one graph key, or one scattered future, never pickled into every task).

Annotations: 0 = unlabelled, ``k + 1`` = class ``k`` (Ilastik's convention; pass
``unlabelled=255`` for maps holding class ids with 255 = unlabelled). CSV/GeoJSON files:
see :func:`parse_annotations`. The confidence (max class probability) is meant as a
per-pixel training weight for the U-Net: low where EDS and texture disagree or at
boundaries blurred by the EDS interaction volume.

EDS loading, registration and upsampling live in :mod:`semdask.labelling.registration`, annotation
parsing and rasterising in :mod:`semdask.labelling.annotations`; their public names are re-exported
here.

Examples
--------
>>> x = da.zeros((96, 80), chunks=48)
>>> feature_stack(x, FeatureSpec(sigmas=(1.0, 3.5))).chunks
((17,), (48, 48), (48, 32))
>>> chunk_grid(1100, 512, 100)
(512, 588)
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from semdask.errors import InputError
from semdask.labelling.annotations import parse_annotations, read_annotations, synthetic_scribbles
from semdask.labelling.features import FeatureSpec, chunk_grid, features_block, predict_block
from semdask.labelling.registration import EdsMaps, ShiftField, load_eds, register_eds, upsample_eds
from semdask.storage import arrays as sarr
from semdask.storage import io

__all__ = [
    "EDS_FEATURES",
    "EdsMaps",
    "FeatureStack",
    "LabelResult",
    "ShiftField",
    "build_features",
    "eds_source",
    "feature_stack",
    "fit_classifier",
    "label",
    "load_eds",
    "parse_annotations",
    "predict_probs",
    "read_annotations",
    "register_eds",
    "synthetic_scribbles",
    "training_pixels",
    "upsample_eds",
]

log = logging.getLogger(__name__)
#: default EDS features: the maps are smooth (interaction volume), so fewer kinds
EDS_FEATURES = FeatureSpec(kinds=("gaussian", "gradient", "log"))
_F32 = np.empty((0, 0, 0), np.float32)


# ----------------------------------------------------------------------------- features
def _features_core(block: np.ndarray, spec: FeatureSpec, d: int) -> np.ndarray:
    out = features_block(block, spec)
    return out[:, d:out.shape[1] - d, d:out.shape[2] - d]


def feature_stack(image: da.Array, spec: FeatureSpec | None = None) -> da.Array:
    """Features (F, y, x) float32 of a (y, x) or (c, y, x) dask array, chunked like it.

    ``map_overlap`` with ``depth = spec.depth`` and boundary reflect: equal to
    :func:`semdask.labelling.features.multiscale_features` for any chunking.
    """
    spec = spec or FeatureSpec()
    x = image[None] if image.ndim == 2 else image
    if x.ndim != 3:
        raise InputError("image", expected="a (y, x) or (c, y, x) array", got=f"{x.shape}")
    x = x.rechunk({0: -1})
    d = spec.depth
    if min(min(c) for c in x.chunks[1:]) < d:
        raise InputError("chunks", expected=f"at least the halo {d} px (4 x max sigma)",
                         got=f"{x.chunks[1:]}", fix="use larger chunks or smaller sigmas")
    n = x.shape[0] * spec.n_per_channel
    return da.map_overlap(_features_core, x, depth={0: 0, 1: d, 2: d}, boundary="reflect",
                          trim=False, chunks=((n,), *x.chunks[1:]), dtype=np.float32,
                          meta=_F32, spec=spec, d=d, token="semdask-features")



def _count(b: np.ndarray) -> np.ndarray:
    return np.array([[np.count_nonzero(b)]], np.int64)


def _gather(feats: np.ndarray, ann: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = ann > 0
    return feats[:, m].T.copy(), ann[m].astype(np.int64) - 1


def training_pixels(features: da.Array, annotations: da.Array, n_classes: int, *,
                    max_per_class: int | None = 100_000, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, F) and class ids (n,) of the annotated pixels.

    Only chunks with annotations are computed; each class is subsampled (seeded) to at
    most ``max_per_class`` pixels.
    """
    ann = annotations.rechunk(features.chunks[1:])
    counts = da.map_blocks(_count, ann, dtype=np.int64, chunks=((1,) * ann.numblocks[0],
                                                                 (1,) * ann.numblocks[1]))
    n = np.asarray(counts.compute())
    if not n.any():
        raise InputError("annotations", expected="at least one labelled pixel", got="none",
                         fix="draw scribbles (0 = unlabelled, class k = k + 1), or check "
                         "--unlabelled")
    tasks = [dask.delayed(_gather)(features.blocks[0, i, j], ann.blocks[i, j])
             for i, j in zip(*np.nonzero(n), strict=True)]
    parts = dask.compute(*tasks)
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if y.max() >= n_classes:
        raise InputError("annotations", expected=f"values 1..{n_classes} (class id + 1)",
                         got=f"values up to {int(y.max()) + 1}",
                         fix="check --classes, or pass --unlabelled 255 for class-id maps")
    if max_per_class:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == k))[:max_per_class]
                               for k in range(n_classes)])
        X, y = X[np.sort(keep)], y[np.sort(keep)]
    log.info("training pixels per class: %s (%d chunks)",
             np.bincount(y, minlength=n_classes).tolist(), len(tasks))
    return X, y


# ----------------------------------------------------------------------------- classifier
def fit_classifier(X: np.ndarray, y: np.ndarray, *, classifier: Any = None,
                   n_estimators: int = 100, max_depth: int | None = None, n_jobs: int = -1,
                   seed: int = 0) -> Any:
    """Fit ``classifier`` (any object with fit and predict_proba or predict) in place, or
    a ``RandomForestClassifier(n_estimators, max_depth, class_weight="balanced")``."""
    if classifier is None:
        from sklearn.ensemble import RandomForestClassifier

        classifier = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                            n_jobs=n_jobs, class_weight="balanced",
                                            random_state=seed)
    if not hasattr(classifier, "fit") or not (hasattr(classifier, "predict_proba")
                                              or hasattr(classifier, "predict")):
        raise InputError("classifier", expected="an object with fit() and predict_proba() or "
                         "predict() (scikit-learn style)", got=type(classifier).__name__)
    classifier.fit(X, y)
    return classifier


def predict_probs(features: da.Array, classifier: Any, n_classes: int, *,
                  client: Any = None) -> da.Array:
    """Class probabilities (K, y, x) float32 of every chunk of ``features``.

    The fitted classifier enters the graph once: scattered to every worker with
    ``client``, else as one delayed key (one pickle per worker, not per task). A default
    random forest is switched to ``n_jobs=1`` (dask parallelises over chunks).
    """
    if "n_jobs" in getattr(classifier, "get_params", dict)():
        classifier.set_params(n_jobs=1)
    ref = (client.scatter(classifier, broadcast=True) if client is not None else
           dask.delayed(classifier, name=f"classifier-{uuid.uuid4().hex}", traverse=False))
    return da.map_blocks(predict_block, features, ref, n_classes,
                         chunks=((n_classes,), *features.chunks[1:]), dtype=np.float32,
                         meta=_F32, token="semdask-rf-predict")


# ----------------------------------------------------------------------------- entry point
@dataclass
class LabelResult:
    """What :func:`label` wrote and measured."""

    output: Path
    labels: str
    confidence: str
    classes: list[str]
    shape: tuple[int, int]
    n_features: int
    n_train: list[int]
    shift: ShiftField | None
    true_shift_px: tuple[float, float] | None
    seconds: dict[str, float] = field(default_factory=dict)
    classifier: Any = None

    @property
    def s_per_gpix(self) -> float:
        """Seconds per 1e9 px of the stages that scale with the area (registration and
        features + prediction + writing), extrapolated linearly; the fit (features of the
        annotated chunks + training, bounded by ``max_per_class``) is a one-off on top."""
        return (self.seconds["register"] + self.seconds["predict"]) * 1e9 / (
            self.shape[0] * self.shape[1])

    def summary(self) -> str:
        """Shift (and the true one when known), training pixels, outputs, timing."""
        lines = []
        if self.shift is not None:
            (dy, dx), f = self.shift.mean, self.shift.factor
            true = "" if self.true_shift_px is None else (
                f" (true: {self.true_shift_px[0] * f:+.2f}, {self.true_shift_px[1] * f:+.2f})")
            lines.append(f"EDS shift (dy, dx): {dy:+.2f}, {dx:+.2f} SEM px{true}, "
                         f"{int(self.shift.inliers.sum())}/{self.shift.inliers.size} tiles kept")
        pairs = zip(self.classes, self.n_train, strict=True)
        lines.append(f"training pixels: {', '.join(f'{c} {n}' for c, n in pairs)}")
        lines.append(f"wrote {self.output}/labels/{self.labels} and {self.confidence} "
                     f"({self.shape[0]} x {self.shape[1]} px, {self.n_features} features) in "
                     f"{self.seconds['total']:.1f} s (fit {self.seconds['fit']:.1f} s); "
                     f"{self.s_per_gpix / 3600:.2f} h per gigapixel + the fit")
        return "\n".join(lines)


def eds_source(values: Sequence[str]) -> Any:
    """The ``eds`` argument of :func:`label` from CLI words: ``store`` (or nothing),
    ``none``, or ``ELEMENT=FILE`` per element.

    >>> eds_source(["Ni=ni.tif", "O=o.tif"])
    {'Ni': PosixPath('ni.tif'), 'O': PosixPath('o.tif')}
    """
    if not values or list(values) == ["store"]:
        return "store"
    if list(values) == ["none"]:
        return None
    pairs = [v.partition("=") for v in values]
    if any(not k or not sep or not f for k, sep, f in pairs):
        raise InputError("--eds", expected="store, none, or ELEMENT=FILE per element",
                         got=" ".join(values), fix="e.g. --eds Ni=ni.tif --eds O=o.tif")
    return {k: Path(f) for k, _, f in pairs}


@dataclass(frozen=True)
class FeatureStack:
    """Lazy features ``data`` (F, y, x) of a mosaic, the SEM ``chunks`` they use, the EDS
    maps and the estimated shift field (None without EDS / registration)."""

    data: da.Array
    names: list[str]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    eds: EdsMaps | None
    shift: ShiftField | None


def build_features(mosaic: Any, *, eds: Any = "store", eds_channels: Sequence[str] | None = None,
                   sem_features: FeatureSpec | None = None,
                   eds_features: FeatureSpec = EDS_FEATURES, register: bool = True,
                   tile: int = 2048, upsample_factor: int = 20, chunk: int = 512
                   ) -> FeatureStack:
    """Load and register EDS (``eds=None``: SEM only), then stack SEM + EDS features.

    Registration runs now (one task per tile); the features stay lazy. Chunks are
    ``chunk`` px (rounded up to the EDS factor), none smaller than the halos.
    """
    m = mosaic if isinstance(mosaic, io.Mosaic) else io.open_mosaic(mosaic)
    shape = (int(m.image.shape[0]), int(m.image.shape[1]))
    sem_features = sem_features or FeatureSpec()
    maps = None if eds is None else load_eds(eds, shape, mosaic=m.path, channels=eds_channels)
    f = maps.factor if maps else 1
    shift = register_eds(m.image, maps, tile=tile, upsample_factor=upsample_factor) if (
        maps and register) else None
    edge = -(-chunk // f) * f
    minimum = max(sem_features.depth, eds_features.depth,
                  f * (math.ceil((shift.max_abs if shift else 0) / f) + 3))
    chunks = (chunk_grid(shape[0], edge, minimum), chunk_grid(shape[1], edge, minimum))
    feats = feature_stack(m.image.rechunk(chunks), sem_features)
    names = sem_features.names(["sem"])
    if maps:
        ef = feature_stack(upsample_eds(maps, shift, chunks), eds_features)
        feats = da.concatenate([feats, ef], axis=0).rechunk({0: -1})
        names += eds_features.names(maps.channels)
    return FeatureStack(feats, names, chunks, maps, shift)


def label(mosaic: Any, annotations: Any, *, eds: Any = "store",
          eds_channels: Sequence[str] | None = None, classes: Sequence[str] | None = None,
          colours: Sequence[tuple[int, int, int, int]] | None = None, name: str = "eds-rf",
          output: Any = None, classifier: Any = None, sem_features: FeatureSpec | None = None,
          eds_features: FeatureSpec = EDS_FEATURES, register: bool = True, tile: int = 2048,
          upsample_factor: int = 20, chunk: int = 512, unlabelled: int = 0,
          radius: float = 2.0, max_per_class: int | None = 100_000, n_estimators: int = 100,
          max_depth: int | None = None, n_jobs: int = -1, seed: int = 0,
          overwrite: bool = False, client: Any = None) -> LabelResult:
    """EDS-guided labels of ``mosaic`` from sparse ``annotations`` (see the module doc).

    Parameters
    ----------
    mosaic : path or Mosaic
        The OME-Zarr mosaic to label.
    annotations : path or array
        Sparse scribbles: a label image (``0`` = unlabelled, class ``k`` stored as ``k + 1``
        unless ``unlabelled`` says otherwise), a CSV of points or a GeoJSON of shapes.
    eds : {"store", None} or mapping or array
        ``"store"``: the mosaic's ``eds`` group; ``None``: SEM features only;
        ``{element: file or array}`` or a ``(c, h, w)`` array of EDS maps.
    classes, colours : sequence, optional
        Class names and RGBA colours [default: the synthetic SOC PHASES / COLOURS].
    name : str
        Writes ``labels/<name>`` and the image group ``<name>-confidence``.
    output : path, optional
        Where to write [default: into the mosaic].
    classifier : scikit-learn style classifier, optional
        Any object with ``fit``/``predict_proba`` [default: a random forest of
        ``n_estimators`` trees, ``max_depth``, ``n_jobs``, ``seed``].
    overwrite : bool
        Replace existing ``labels/<name>``.
    client : distributed.Client, optional
        Run on this cluster [default: the active scheduler].

    The other arguments go to :func:`build_features` (``eds_channels``, ``sem_features``,
    ``eds_features``, ``register``, ``tile``, ``upsample_factor``, ``chunk``),
    :func:`read_annotations` (``unlabelled``, ``radius``), :func:`training_pixels`
    (``max_per_class``) and :func:`fit_classifier`.

    Returns
    -------
    LabelResult
        The output store, group names, classes, training pixels per class and the EDS
        registration shift field.
    """
    from semdask.synthetic.sem import COLOURS, PHASES

    t0 = time.perf_counter()
    m = io.open_mosaic(mosaic)
    shape = (int(m.image.shape[0]), int(m.image.shape[1]))
    classes = list(classes or PHASES)
    colours = colours or (COLOURS if classes == list(PHASES) else None)
    fs = build_features(m, eds=eds, eds_channels=eds_channels, sem_features=sem_features,
                        eds_features=eds_features, register=register, tile=tile,
                        upsample_factor=upsample_factor, chunk=chunk)
    sec = {"register": time.perf_counter() - t0}
    ann = read_annotations(annotations, shape, fs.chunks, classes=classes, mosaic=m.path,
                           unlabelled=unlabelled, radius=radius)
    X, y = training_pixels(fs.data, ann, len(classes), max_per_class=max_per_class, seed=seed)
    clf = fit_classifier(X, y, classifier=classifier, n_estimators=n_estimators,
                         max_depth=max_depth, n_jobs=n_jobs, seed=seed)
    sec["fit"] = time.perf_counter() - t0 - sec["register"]
    probs = predict_probs(fs.data, clf, len(classes), client=client)
    out = Path(output) if output is not None else m.path
    n_train = np.bincount(y, minlength=len(classes)).tolist()
    prov = {"method": "eds-guided random forest", "classifier": repr(clf),
            "annotations": str(annotations) if isinstance(annotations, str | Path) else
            type(annotations).__name__, "features": fs.names, "n_train": n_train,
            "eds_shift": fs.shift.to_dict() if fs.shift else None}
    lab_t = io.begin_labels(out, name, shape=shape, classes=classes, colours=colours,
                            attrs={"provenance": prov}, overwrite=overwrite)
    conf_t = io.begin_extra_image(out, f"{name}-confidence", shape=shape, dtype=np.float16,
                                  attrs={"provenance": {"of": f"labels/{name}", "meaning":
                                         "max class probability; use as a training weight"}},
                                  overwrite=overwrite)
    lab, conf = probs.argmax(axis=0).astype(np.uint8), probs.max(axis=0).astype(np.float16)
    job = sarr.store_blocks([sarr.align_to(lab, lab_t), sarr.align_to(conf, conf_t)],
                          [lab_t, conf_t], compute=False)
    if client is not None:
        client.compute(job).result()
    else:
        from semdask.progress import DaskProgress

        with DaskProgress("label"):
            job.compute()  # type: ignore[union-attr]
    sarr.finish_group(out, f"labels/{name}")
    sarr.finish_group(out, f"{name}-confidence")
    sec["total"] = time.perf_counter() - t0
    sec["predict"] = sec["total"] - sec["fit"] - sec["register"]
    log.info("label: wrote %s/labels/%s in %.1f s", out, name, sec["total"])
    return LabelResult(out, name, f"{name}-confidence", classes, shape, len(fs.names), n_train,
                       fs.shift, fs.eds.true_shift_px if fs.eds else None, sec, clf)
