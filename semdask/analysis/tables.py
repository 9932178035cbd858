"""Results as pandas / xarray objects: the tables behind fractions, analyses and scores.

The result classes (:class:`~semdask.analysis.metrics.Fractions`,
:class:`~semdask.analysis.metrics.Scores`, :class:`~semdask.analysis.quantify.Analysis`,
:class:`~semdask.analysis.evaluate.Evaluation`) call these from their ``to_dataframe``
methods. pandas is imported on first use (it comes with xarray).

Examples
--------
>>> import numpy as np
>>> from semdask.analysis.metrics import phase_fractions
>>> f = phase_fractions(np.array([[0, 1], [1, 1]], "u1"), classes=["a", "b"],
...                     pixel_size_um=0.5)
>>> fractions_frame(f)["fraction"].to_dict()
{'a': 0.25, 'b': 0.75}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

    from semdask.analysis.evaluate import Evaluation
    from semdask.analysis.metrics import Fractions, Scores
    from semdask.analysis.quantify import Analysis

__all__ = ["analysis_frames", "confusion_dataarray", "evaluation_frame", "fractions_frame",
           "scores_frame"]

_TABLES = ("fractions", "interfaces", "connectivity", "sizes", "histogram")


def fractions_frame(f: Fractions) -> pd.DataFrame:
    """One row per phase (index: phase name): label, pixels, fraction, area_um2."""
    import pandas as pd

    df = pd.DataFrame([{"phase": r.name, "label": r.label, "pixels": r.pixels,
                        "fraction": r.fraction, "area_um2": r.area_um2} for r in f.rows],
                      columns=["phase", "label", "pixels", "fraction", "area_um2"])
    df = df.set_index("phase")
    df.attrs.update({"total_pixels": f.total_pixels, "pixel_size_um": f.pixel_size_um,
                     **f.meta})
    return df


def scores_frame(s: Scores) -> pd.DataFrame:
    """Per-class scores (index: class name): IoU, Dice, precision, recall, boundary F1, ..."""
    import pandas as pd

    pc = s.per_class()
    n = len(s.classes)
    df = pd.DataFrame({k: np.asarray(v)[:n] for k, v in pc.items()},
                      index=pd.Index(list(s.classes), name="class"))
    df.insert(0, "label", np.arange(n))
    df.attrs.update({"pixels": s.pixels, "accuracy": s.accuracy, "miou": s.miou,
                     "mean_dice": s.mean_dice, "boundary_f1": s.boundary_f1})
    return df


def confusion_dataarray(s: Scores, *, normalised: bool = False) -> xr.DataArray:
    """The pooled confusion matrix with dims ``("truth", "pred")`` labelled by class."""
    import xarray as xr

    data = s.normalised_confusion() if normalised else np.asarray(s.confusion)
    return xr.DataArray(data, dims=("truth", "pred"),
                        coords={"truth": list(s.classes), "pred": list(s.classes)},
                        name="confusion", attrs={"normalised": "rows (truth) sum to 1"
                                                 if normalised else "pixel counts"})


def evaluation_frame(e: Evaluation, by: str = "class") -> pd.DataFrame:
    """Pooled per-class scores (``by="class"``) or one summary row per image (``"image"``)."""
    import pandas as pd

    if by == "class":
        df = scores_frame(e.pooled)
        df.attrs["tolerance_px"] = e.tolerance
        return df
    if by == "image":
        rows = [{"image": r.name, "height": r.shape[0], "width": r.shape[1],
                 "pixels": r.scores.pixels, "accuracy": r.scores.accuracy,
                 "miou": r.scores.miou, "mean_dice": r.scores.mean_dice,
                 "boundary_f1": r.scores.boundary_f1} for r in e.images]
        cols = ["image", "height", "width", "pixels", "accuracy", "miou", "mean_dice",
                "boundary_f1"]
        return pd.DataFrame(rows, columns=cols).set_index("image")
    from semdask.errors import InputError

    raise InputError("by", expected="'class' or 'image'", got=repr(by),
                     fix="evaluation.to_dataframe(by='image')")


def analysis_frames(a: Analysis) -> dict[str, pd.DataFrame]:
    """The analysis tables (fractions, interfaces, connectivity, sizes, histogram, tpb).

    Lengths and areas are in ``a.unit`` (µm, or px when the pixel size is unknown);
    tables that were not computed (``components=False``) are left out.
    """
    import pandas as pd

    out = {k: pd.DataFrame(getattr(a, k)) for k in _TABLES if getattr(a, k)}
    if a.tpb:
        out["tpb"] = pd.DataFrame([a.tpb])
    for df in out.values():
        df.attrs.update({"region": a.region, "unit": a.unit, "pixel_size_um": a.pixel_size_um})
    return out
