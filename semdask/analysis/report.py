"""Writers of analysis results: CSV (+ Parquet) tables, JSON summaries and PNG plots.

:func:`write_analysis` writes the tables of :class:`semdask.analysis.quantify.Analysis` results,
:func:`write_series` those of a :class:`semdask.analysis.quantify.Series`; both re-exported by
:mod:`semdask.analysis`. Plots use matplotlib's object API (no pyplot, no GUI backend).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semdask.analysis import morphology as mo

if TYPE_CHECKING:
    from semdask.analysis.quantify import Analysis, Series

__all__ = ["write_analysis", "write_series"]

PathLike = str | Path


def _write_table(rows: Sequence[dict[str, Any]], path: Path) -> list[Path]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    written = [path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    pq.write_table(pa.Table.from_pylist(list(rows)), path.with_suffix(".parquet"))
    return [*written, path.with_suffix(".parquet")]


def write_analysis(analyses: Sequence[Analysis], out: PathLike) -> list[Path]:
    """Write CSV (+ Parquet with pyarrow), ``summary.json`` and PNG plots into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for name in ("fractions", "connectivity", "sizes", "histogram", "interfaces"):
        rows = [r for a in analyses for r in getattr(a, name)]
        if rows:
            files += _write_table(rows, d / f"{name}.csv")
    files += _write_table([a.tpb for a in analyses], d / "tpb.csv")
    (d / "summary.json").write_text(json.dumps([a.to_dict() for a in analyses], indent=1))
    return [*files, d / "summary.json", *_plot_analysis(analyses, d)]


def _figure(ncols: int, width: float = 5.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plot_analysis(analyses: Sequence[Analysis], d: Path) -> list[Path]:
    a0, u = analyses[0], analyses[0].unit
    fig, (ax,) = _figure(1, 6.0)
    w = 0.8 / len(analyses)
    for k, a in enumerate(analyses):
        f = np.array([r["fraction"] for r in a.fractions]) * 100
        lo = np.array([np.nan if r["ci_low"] is None else r["ci_low"] for r in a.fractions])
        hi = np.array([np.nan if r["ci_high"] is None else r["ci_high"] for r in a.fractions])
        err = np.nan_to_num(np.abs(np.stack([f - 100 * lo, 100 * hi - f])))
        ax.bar(np.arange(len(f)) + k * w, f, w, yerr=err, capsize=3, label=a.region)
    ax.set_xticks(np.arange(len(a0.classes)) + w * (len(analyses) - 1) / 2, a0.classes)
    ax.set_ylabel("area fraction (%), 95 % CI")
    ax.legend(fontsize="small")
    fig.savefig(d / "fractions.png", dpi=100)
    files = [d / "fractions.png"]
    if any(r["count"] for r in a0.histogram):
        from matplotlib.ticker import NullFormatter

        fig, (ax,) = _figure(1, 6.0)
        for name in a0.classes:
            rows = [r for r in a0.histogram if r["phase"] == name]
            if sum(r["count"] for r in rows):
                ax.stairs([r["count"] for r in rows],
                          [rows[0][f"bin_lo_{u}"]] + [r[f"bin_hi_{u}"] for r in rows],
                          label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=f"equivalent circular diameter ({u.replace('um', 'µm')})",
               ylabel="components",
               title=f"{a0.region}: border components excluded")
        ax.legend(fontsize="small")
        fig.savefig(d / "sizes.png", dpi=100)
        files.append(d / "sizes.png")
    fig, (ax1, ax2) = _figure(2)
    for k, a in enumerate(analyses):
        la = [r[f"L_A_per_{u}"] for r in a.interfaces]
        ax1.bar(np.arange(len(la)) + k * w, la, w, label=a.region)
        ax2.bar(k, a.tpb[f"P_A_per_{u}2"] or 0.0, label=a.region)
    ax1.set_xticks(np.arange(len(a0.interfaces)) + w * (len(analyses) - 1) / 2,
                   [f"{r['phase_a']}/{r['phase_b']}" for r in a0.interfaces], rotation=45)
    ax1.set_ylabel(f"interface length per area (1/{u})")
    ax1.legend(fontsize="small")
    ax2.set_xticks(range(len(analyses)), [a.region for a in analyses])
    ax2.set_ylabel(f"TPB density ({'/'.join(mo.TPB_PHASES)}) (1/{u}²)")
    fig.savefig(d / "boundaries.png", dpi=100)
    return [*files, d / "boundaries.png"]


def write_series(series: Series, out: PathLike, phase: str = "NiO") -> list[Path]:
    """Write ``series.csv`` (+ Parquet), ``series.json`` and ``series.png`` into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    files = _write_table(series.rows, d / "series.csv")
    (d / "series.json").write_text(json.dumps({"time_unit": series.time_unit,
                                               "errors": series.errors, "rows": series.rows},
                                              indent=1))
    has_truth = bool(series.errors)
    fig, axes = _figure(3 if has_truth else 2, 4.5)
    sel = [r for r in series.rows if r["phase"] == phase]
    t = np.array([r["time"] for r in sel])
    f = np.array([100 * r["fraction"] for r in sel])
    lo = np.array([100 * (r["ci_low"] if r["ci_low"] is not None else r["fraction"]) for r in sel])
    hi = np.array([100 * (r["ci_high"] if r["ci_high"] is not None else r["fraction"])
                   for r in sel])
    axes[0].errorbar(t, f, yerr=np.stack([f - lo, hi - f]), marker="o", capsize=3,
                     label="predicted (95 % CI)")
    if has_truth:
        axes[0].plot(t, [100 * r["truth_fraction"] for r in sel], "--s", label="truth")
    axes[0].set(xlabel=f"time ({series.time_unit})", ylabel=f"{phase} fraction ϕ (%)")
    axes[0].legend(fontsize="small")
    for ph in dict.fromkeys(r["phase"] for r in series.rows):
        s = [r for r in series.rows if r["phase"] == ph]
        axes[1].plot([r["time"] for r in s], [100 * r["fraction"] for r in s], "-o", label=ph)
        if has_truth:
            axes[2].plot([100 * r["truth_fraction"] for r in s],
                         [100 * r["fraction"] for r in s], "o", label=ph)
    axes[1].set(xlabel=f"time ({series.time_unit})", ylabel="area fraction (%)")
    axes[1].legend(fontsize="small")
    if has_truth:
        lim = [0, max(100 * r["fraction"] for r in series.rows) * 1.05]
        axes[2].plot(lim, lim, "k:", lw=1)
        e = series.errors.get(phase, {})
        axes[2].set(xlabel="truth (%)", ylabel="predicted (%)",
                    title=f"{phase}: MAE {e.get('mae_pp', float('nan')):.2f} pp")
        axes[2].legend(fontsize="small")
    fig.savefig(d / "series.png", dpi=100)
    return [*files, d / "series.json", d / "series.png"]
