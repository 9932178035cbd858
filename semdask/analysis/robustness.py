"""Robustness study: accuracy and mIoU under acquisition changes (the paper's section 5).

Held-out tiles of a labelled store (an image plus a truth label group) are perturbed
in memory — Gaussian blur (sigma px), brightness factor (clipped to the dtype's
range), Gaussian-Poisson noise (eq. 2: ``Poisson(I C) / C + N(0, sigma)`` with ``I``
in [0, 1] and ``C = 255``) and magnification (the image resampled by the ratio,
antialiased when downsampling, the truth by nearest neighbour) — segmented with the
in-memory graph engine of :mod:`semdask.inference.graph` (one chunk per tile, synchronous) and
scored against the truth with pooled confusion matrices (:mod:`semdask.analysis.metrics`),
with the spread (std) over tiles. Normalisation statistics are recomputed from the
perturbed tiles, as ``semdask segment`` does per mosaic (``renormalise=False`` keeps
the unperturbed ones). Magnification runs twice: as is, and with pixel-size awareness
(:mod:`semdask.inference.rescale`, the model told the true pixel size), which shows the gain.

Examples
--------
>>> import numpy as np
>>> img = np.full((4, 4), 200, np.uint8)
>>> perturb(img, "brightness", 1.5).max(), perturb(img, "blur", 0).dtype
(np.uint8(255), dtype('uint8'))
>>> perturb(img, "magnification", 0.5).shape
(2, 2)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semdask.errors import InputError

__all__ = [
    "IDENTITY",
    "PERTURBATIONS",
    "RobustnessResult",
    "RobustnessRow",
    "perturb",
    "robustness",
    "write_robustness",
]

log = logging.getLogger(__name__)

PERTURBATIONS = ("blur", "brightness", "noise", "magnification")
#: The level of each perturbation that leaves the image as acquired (noise has none).
IDENTITY: dict[str, float | None] = {"blur": 0.0, "brightness": 1.0, "noise": None,
                                     "magnification": 1.0}


@dataclass(frozen=True)
class RobustnessRow:
    """Scores at one perturbation level: pooled accuracy/mIoU and their std over tiles."""

    perturbation: str
    level: float
    rescale: bool
    accuracy: float
    accuracy_std: float
    miou: float
    miou_std: float
    tiles: int
    pixels: int


@dataclass(frozen=True)
class RobustnessResult:
    """All rows of a study, its unperturbed baseline and what it ran on."""

    rows: list[RobustnessRow]
    baseline: RobustnessRow
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def select(self, perturbation: str, rescale: bool = False) -> list[RobustnessRow]:
        """Rows of one perturbation (magnification: as is, or ``rescale=True``)."""
        return [r for r in self.rows if r.perturbation == perturbation and r.rescale == rescale]

    def gain(self, level: float, metric: str = "accuracy") -> float | None:
        """Pixel-size awareness gain at a magnification ratio (rescaled - as is)."""
        a = {r.level: getattr(r, metric) for r in self.select("magnification")}
        b = {r.level: getattr(r, metric) for r in self.select("magnification", True)}
        return b[level] - a[level] if level in a and level in b else None

    def table(self) -> str:
        """A plain-text table (percentages)."""
        lines = [f"{'perturbation':<22}{'level':>7}{'accuracy %':>14}{'mIoU %':>14}"]
        for r in [self.baseline, *self.rows]:
            name = r.perturbation + (" (rescaled)" if r.rescale else "")
            lines.append(f"{name:<22}{r.level:>7.3g}{100 * r.accuracy:>8.2f} "
                         f"±{100 * r.accuracy_std:4.1f}{100 * r.miou:>8.2f} "
                         f"±{100 * r.miou_std:4.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": asdict(self.baseline), "rows": [asdict(r) for r in self.rows],
                "classes": self.classes, **self.meta}


def _full_scale(dtype: np.dtype[Any]) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _quantise(x: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    hi = _full_scale(dtype)
    if np.issubdtype(dtype, np.integer):
        return np.clip(np.rint(x), 0, hi).astype(dtype)
    return np.clip(x, 0, hi).astype(dtype)


def perturb(image: np.ndarray, kind: str, level: float, *, rng: np.random.Generator | None = None,
            photons: float = 255.0) -> np.ndarray:
    """Apply one perturbation to an image tile (same dtype; integers rounded and clipped).

    ``blur``: Gaussian sigma in px; ``brightness``: factor; ``noise``: sigma of eq. 2
    (intensities scaled to [0, 1], ``photons`` = C); ``magnification``: resampling ratio
    (2 = twice the magnification, twice the pixels per edge).
    """
    from scipy import ndimage as ndi

    from semdask.inference.rescale import resample_numpy

    x = np.asarray(image)
    if kind == "blur":
        return x.copy() if level == 0 else _quantise(
            ndi.gaussian_filter(x.astype(np.float32), float(level)), x.dtype)
    if kind == "brightness":
        return _quantise(x.astype(np.float32) * np.float32(level), x.dtype)
    if kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        scale = _full_scale(x.dtype)
        i = np.clip(x.astype(np.float64) / scale, 0, None)
        noisy = rng.poisson(i * photons) / photons if photons > 0 else i
        noisy = noisy + rng.normal(0.0, float(level), size=x.shape)
        return _quantise(noisy * scale, x.dtype)
    if kind == "magnification":
        return _quantise(resample_numpy(x, float(level)), x.dtype)
    raise InputError("perturbation", expected=f"one of {', '.join(PERTURBATIONS)}", got=kind)


def _tile_origins(shape: tuple[int, int], tile: int, n: int, seed: int) -> list[tuple[int, int]]:
    ny, nx = max(1, shape[0] // tile), max(1, shape[1] // tile)
    cells = np.random.default_rng(seed).permutation(ny * nx)[: max(1, n)]
    return [(int(c // nx) * tile, int(c % nx) * tile) for c in sorted(cells)]


class _Segmenter:
    """Label maps of in-memory tiles from the graph engine (one chunk per tile, sync)."""

    def __init__(self, model: Any, cfg: Any, settings: Any) -> None:
        self.model, self.cfg = model, cfg
        self.kw: dict[str, Any] = settings.plan_kwargs(int(cfg.receptive_field))
        self.infer = settings.infer_kwargs()

    def labels(self, img: np.ndarray, stats: Any, factor: float) -> np.ndarray:
        import dask.array as da

        from semdask.inference.graph import blended_probs, plan_inference
        from semdask.inference.rescale import rescaled_probs, target_shape

        h, w = img.shape
        # >= 2 windows at the model's scale: the inference's global mirror padding (halo +
        # grid remainder) must not exceed the image (dask's symmetric pad truncates it)
        need = int(np.ceil(2 * self.kw["window"] / factor))
        pad = ((0, max(0, need - h)), (0, max(0, need - w)))
        x = np.pad(img, pad, mode="symmetric") if any(p[1] for p in pad) else img
        inner = target_shape(x.shape, factor)
        kw = {**self.kw, "chunk": int(max(inner)) + 16}  # one chunk: no halo exchange
        xd = da.from_array(x, chunks=x.shape)
        n = len(self.cfg.classes)
        if factor == 1.0:
            p = blended_probs(xd, self.model, n_classes=n, stats=stats,
                              plan=plan_inference(x.shape, **kw), **self.infer)
        else:
            p = rescaled_probs(xd, self.model, factor=factor, n_classes=n, stats=stats,
                               plan_kwargs=kw, **self.infer)[0]
        out = np.asarray(p.compute(scheduler="sync")).argmax(axis=0).astype(np.uint8)
        return out[:h, :w]


def _stats(tiles: Sequence[np.ndarray], cfg: Any) -> Any:
    import dask.array as da

    from semdask.inference.normalise import compute_stats

    flat = np.concatenate([t.ravel() for t in tiles])
    norm = cfg.normalisation
    return compute_stats(da.from_array(flat), norm.low_percentile, norm.high_percentile)


def _score(kind: str, level: float, rescale: bool, preds: Sequence[np.ndarray],
           truths: Sequence[np.ndarray], classes: list[str]) -> RobustnessRow:
    from semdask.analysis.metrics import confusion_matrix, scores_from_confusion

    cms = [np.asarray(confusion_matrix(p, t, len(classes)).compute())
           for p, t in zip(preds, truths, strict=True)]
    per = [scores_from_confusion(c, classes) for c in cms]
    pooled = scores_from_confusion(np.sum(cms, axis=0), classes)
    acc = [s["accuracy"] for s in per]
    miou = [s["miou"] for s in per]
    return RobustnessRow(kind, float(level), rescale, pooled["accuracy"], float(np.std(acc)),
                         pooled["miou"], float(np.std(miou)), len(cms), pooled["pixels"])


def robustness(
    mosaic: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    truth: str = "truth",
    blur: Sequence[float] = (0, 0.5, 1, 1.5, 2, 3),
    brightness: Sequence[float] = (0.5, 0.75, 1, 1.25, 1.5),
    noise: Sequence[float] = (0, 0.01, 0.02, 0.05, 0.1),
    magnification: Sequence[float] = (0.5, 0.67, 1, 1.5, 2),
    tiles: int = 4,
    tile: int = 512,
    seed: int = 0,
    rescale_gain: bool = True,
    renormalise: bool = True,
    photons: float = 255.0,
    mode: str | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    batch_size: int | str | None = None,
    device: str | None = None,
    precision: str | None = None,
    window: int | None = None,
) -> RobustnessResult:
    """Sweep blur, brightness, noise and magnification on held-out labelled tiles.

    Parameters
    ----------
    mosaic : path
        An OME-Zarr store with an image and a truth label group (e.g. ``semdask synth``).
    model : path, optional
        Model ``.safetensors`` [default: the bundled one].
    truth : str
        Label group holding the reference.
    blur, brightness, noise, magnification : sequence of float
        Levels (Gaussian sigma px; factor; eq. 2 sigma; resampling ratio). Empty: skipped.
    tiles, tile, seed
        ``tiles`` random non-overlapping ``tile`` x ``tile`` px tiles (``seed``).
    rescale_gain : bool
        Also run magnification with pixel-size awareness (the true pixel size given).
    renormalise : bool
        Normalisation statistics from the perturbed tiles (as ``segment`` does).
    photons : float
        C of eq. 2.
    mode, overlap, blend, batch_size, device, precision, window
        Inference settings, resolved as ``segment`` resolves them
        (:func:`semdask.inference.settings.resolve_settings`: argument > ``dask.config`` you
        set > model file > packaged default); one chunk per tile.

    Returns
    -------
    RobustnessResult
    """
    from semdask.inference.rescale import relative_scale, resample_nearest, scale_factor
    from semdask.inference.settings import resolve_settings
    from semdask.nets.model import bundled_model_path, load_model
    from semdask.paths import validate_input_path
    from semdask.storage import io as sio

    t0 = time.perf_counter()
    explicit: dict[str, Any] = {"mode": mode, "overlap": overlap, "blend": blend,
                                "batch_size": batch_size, "device": device,
                                "precision": precision, "window": window}
    resolve_settings(**explicit)  # fail on a bad setting before reading anything
    m = sio.open_mosaic(Path(mosaic))
    ref = sio.open_labels(m.path, truth)
    model_path = validate_input_path(Path(model) if model else bundled_model_path(),
                                         kind="file")
    net, cfg = load_model(model_path, device="cpu")
    classes = list(cfg.classes)
    edge = min(int(tile), *m.image.shape)
    origins = _tile_origins(tuple(m.image.shape), edge, tiles, seed)
    imgs = [np.asarray(m.image[y:y + edge, x:x + edge].compute()) for y, x in origins]
    truths = [np.asarray(ref.data[y:y + edge, x:x + edge].compute()) for y, x in origins]
    settings = resolve_settings(model_config=cfg, **explicit)
    seg = _Segmenter(net, cfg, settings)
    ref_stats = _stats(imgs, cfg)
    base = relative_scale(m.pixel_size_um, cfg) or scale_factor(  # auto, as segment does
        m.pixel_size_um, cfg.pixel_size_um)
    log.info("robustness on %d tiles of %d px from %s (model %s, scale factor %.3g)",
             len(imgs), edge, m.path, model_path.name, base)

    def run(kind: str, level: float, rescale: bool = False) -> RobustnessRow:
        rng = np.random.default_rng([seed, PERTURBATIONS.index(kind) if kind in
                                     PERTURBATIONS else 9, int(level * 1000)])
        xs = imgs if kind == "none" else [perturb(i, kind, level, rng=rng, photons=photons)
                                          for i in imgs]
        ts = truths
        factor = base
        if kind == "magnification":
            ts = [resample_nearest(t, level) for t in truths]
            px = None if m.pixel_size_um is None else m.pixel_size_um / level
            factor = scale_factor(px, cfg.pixel_size_um, rescale=None if rescale else False)
        stats = _stats(xs, cfg) if renormalise else ref_stats
        preds = [seg.labels(x, stats, factor) for x in xs]
        row = _score(kind, level, rescale, preds, ts, classes)
        log.info("%s %g%s: accuracy %.4f ± %.4f, mIoU %.4f", kind, level,
                 " (rescaled)" if rescale else "", row.accuracy, row.accuracy_std, row.miou)
        return row

    baseline = run("none", 0.0)
    rows: list[RobustnessRow] = []
    for kind, levels in zip(PERTURBATIONS, (blur, brightness, noise, magnification),
                            strict=True):
        for lv in levels:
            rows.append(run(kind, float(lv)))
    if rescale_gain:
        rows += [run("magnification", float(lv), True) for lv in magnification]
    meta = {"mosaic": str(m.path), "model": str(model_path), "truth": truth, "tile": edge,
            "tile_origins": [list(o) for o in origins], "seed": seed,
            "pixel_size_um": m.pixel_size_um, "model_pixel_size_um": cfg.pixel_size_um,
            "renormalise": renormalise, "photons": photons, "mode": seg.kw["mode"],
            "settings": {k: str(getattr(v, "value", v)) for k, v in
                         vars(settings).items() if k != "sources"},
            "seconds": round(time.perf_counter() - t0, 2)}
    return RobustnessResult(rows, baseline, classes, meta)


def write_robustness(result: RobustnessResult, out: str | os.PathLike[str]) -> list[Path]:
    """Write ``robustness.csv``, ``robustness.json`` and ``robustness.png`` into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in RobustnessRow.__dataclass_fields__.values()]
    with open(d / "robustness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for r in [result.baseline, *result.rows]:
            w.writerow(asdict(r))
    (d / "robustness.json").write_text(json.dumps(result.to_dict(), indent=1))
    return [d / "robustness.csv", d / "robustness.json", _plot(result, d / "robustness.png")]


def _plot(result: RobustnessResult, path: Path) -> Path:
    """Accuracy (top) and mIoU (bottom) against each perturbation, like figs. 9-10."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    kinds = [k for k in PERTURBATIONS if result.select(k)]
    fig = Figure(figsize=(4.0 * max(1, len(kinds)), 6.5), layout="constrained")
    axes = fig.subplots(2, max(1, len(kinds)), squeeze=False)
    units = {"blur": "blur sigma (px)", "brightness": "brightness factor",
             "noise": "noise sigma (eq. 2, C = 255)", "magnification": "magnification ratio"}
    for j, kind in enumerate(kinds):
        for i, metric in enumerate(("accuracy", "miou")):
            ax = axes[i, j]
            series = [(False, "tab:blue", "altered")]
            if result.select(kind, True):
                series.append((True, "tab:green", "rescaled to the model's pixel size"))
            for resc, colour, label in series:
                rows = result.select(kind, resc)
                ax.errorbar([r.level for r in rows], [100 * getattr(r, metric) for r in rows],
                            yerr=[100 * getattr(r, f"{metric}_std") for r in rows], marker="o",
                            capsize=3, color=colour, label=label)
            ax.axhline(100 * getattr(result.baseline, metric), color="tab:orange",
                       label="as acquired")
            if IDENTITY[kind] is not None:
                ax.axvline(float(IDENTITY[kind] or 0.0), color="red", linestyle="--")
            if kind == "magnification":
                ax.set_xscale("log", base=2)
                lv = sorted({r.level for r in result.select(kind)})
                ax.set_xticks(lv, [f"{v:g}x" for v in lv])
                ax.minorticks_off()
            lo, hi = ax.get_ylim()
            if hi - lo < 5:  # a flat response should look flat: show at least 5 pp
                mid = (hi + lo) / 2
                ax.set_ylim(mid - 2.5, mid + 2.5)
            ax.set(xlabel=units[kind], ylabel=f"{'accuracy' if i == 0 else 'mIoU'} (%)")
            if j == 0 or kind == "magnification":
                ax.legend(fontsize="x-small")
    fig.suptitle("Robustness to acquisition conditions (pooled over tiles; bars: std over tiles)")
    fig.savefig(path, dpi=100)
    return path
