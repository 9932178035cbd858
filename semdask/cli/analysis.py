"""Analysis commands: label (EDS-guided random forest) and analyze (quantification)."""

from __future__ import annotations

from typing import Any

import click

from semdask.cli.common import (
    announce,
    client_for,
    cluster_options,
    handle_errors,
    positive,
    writable_dir,
    writable_file,
)
from semdask.inference.settings import Mode, Precision, choices

__all__ = ["COMMANDS"]


# --- label (label.py) ---------------------------------------------------------
@click.command("label")
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--annotations", "-a", required=True, metavar="SOURCE",
              help="Scribbles: labels/NAME in the store, a TIFF/PNG label image, or a CSV "
              "(y,x,class[,radius]) / GeoJSON (Point, LineString, Polygon; [x, y]) file.")
@click.option("--eds", multiple=True, metavar="SOURCE",
              help="EDS maps: store (the mosaic's eds group) [default], none (SEM only), or "
              "ELEMENT=FILE repeated per element (--eds Ni=ni.tif --eds O=o.tif).")
@click.option("--unlabelled", type=click.Choice(["0", "255"]), default="0",
              help="Label images: 0 = unlabelled, class k stored as k + 1; or 255 = "
              "unlabelled, class ids as they are.")
@click.option("--classes", default=None, metavar="A,B,...",
              help="Class names [default: pore,Ni,NiO,YSZ with their colours].")
@click.option("--output", "-o", default=None, type=click.Path(),
              help="Write to this OME-Zarr instead of into MOSAIC.")
@click.option("--name", default="eds-rf", help="Label group name (+ NAME-confidence).")
@click.option("--no-register", is_flag=True, help="Trust the EDS alignment as it is.")
@click.option("--tile", type=int, default=2048, help="Registration tile edge (SEM px).")
@click.option("--chunks", "chunk", type=int, default=512, help="Feature/predict chunk edge.")
@click.option("--radius", type=float, default=2.0, help="Radius of CSV/GeoJSON points (px).")
@click.option("--trees", type=int, default=100, help="Random-forest trees.")
@click.option("--max-depth", type=int, default=None, help="Random-forest depth limit.")
@click.option("--seed", type=int, default=0)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs of this name.")
@cluster_options
@handle_errors
def label_cmd(mosaic: str, annotations: str, eds: tuple[str, ...], unlabelled: str,
              classes: str | None, output: str | None, name: str, no_register: bool,
              tile: int, chunk: int, radius: float, trees: int, max_depth: int | None,
              seed: int, overwrite: bool, no_cluster: bool, **cluster: Any) -> None:
    """EDS-guided random-forest labels of MOSAIC from sparse scribbles (-> labels/NAME)."""
    from semdask.labelling.label import eds_source, label

    names = [c.strip() for c in classes.split(",")] if classes else None
    with client_for(no_cluster, **cluster) as client:
        announce(client)
        r = label(mosaic, annotations, eds=eds_source(eds), classes=names, name=name,
                  output=output, register=not no_register, tile=tile, chunk=chunk,
                  unlabelled=int(unlabelled), radius=radius, n_estimators=trees,
                  max_depth=max_depth, seed=seed, overwrite=overwrite, client=client)
    click.echo(r.summary())
# --- end label -----------------------------------------------------------------

# --- analyze (analysis.py) -----------------------------------------------------
@click.command("analyze")
@click.argument("mosaics", nargs=-1, required=True, metavar="MOSAIC...",
                type=click.Path(exists=False))
@click.option("--series", is_flag=True,
              help="Time series: MOSAIC... are PATH:TIME items (e.g. a.ome.zarr:5).")
@click.option("--labels", "name", default="phases", help="Label group to analyse.")
@click.option("--truth", default=None, help="Reference label group (e.g. truth): errors in pp.")
@click.option("--roi", "rois", multiple=True, metavar="Y0:Y1,X0:X1",
              help="Also analyse this region (pixels); repeat for several.")
@click.option("--tile", type=int, default=2048, help="Tile edge (px) for spread and 95 % CI.")
@click.option("--connectivity", type=click.Choice(["4", "8"]), default="4",
              help="Pixel neighbourhood of connected components.")
@click.option("--min-size-px", "min_size", type=int, default=9,
              help="Smaller components are left out of the size statistics.")
@click.option("--pixel-size", type=float, default=None, callback=positive,
              help="Pixel size in um, > 0 [default: from the store].")
@click.option("--time-unit", default="min", help="Unit of the series times.")
@click.option("--out", "out", type=click.Path(file_okay=False), default="analysis",
              callback=writable_dir,
              help="Output folder (CSV, JSON, PNG).")
@cluster_options
@handle_errors
def analyze_cmd(mosaics: tuple[str, ...], series: bool, name: str, truth: str | None,
                rois: tuple[str, ...], tile: int, connectivity: str, min_size: int,
                pixel_size: float | None, time_unit: str, out: str, no_cluster: bool,
                **cluster: Any) -> None:
    """Fractions (95 % CI), connectivity, sizes, TPB and interfaces of MOSAIC's labels.

    With --series: NiO (and other) fractions of several mosaics against time, e.g.
    ``semdask analyze --series a.ome.zarr:0 b.ome.zarr:2 c.ome.zarr:5 --truth truth``.
    """
    from semdask.analysis.quantify import analyze, analyze_series, write_analysis, write_series
    from semdask.errors import InputError

    if not series and len(mosaics) != 1:
        raise InputError("analyze", expected="one MOSAIC (or --series PATH:TIME ...)",
                         got=f"{len(mosaics)} mosaics", fix="add --series for a time series")
    with client_for(no_cluster, **cluster) as client:  # the cluster_options, as given
        announce(client)
        if series:
            s = analyze_series(mosaics, labels=name, truth=truth, time_unit=time_unit,
                               tile=tile, pixel_size_um=pixel_size)
            files = write_series(s, out)
            click.echo(s.table("NiO"))
        else:
            res = analyze(mosaics[0], labels=name, rois=rois, tile=tile,
                          connectivity=1 if connectivity == "4" else 2, min_area_px=min_size,
                          pixel_size_um=pixel_size, truth=truth)
            files = write_analysis(res, out)
    if not series:
        for a in res:
            u = a.unit
            if a.pixel_size_um is None:
                click.echo("note: no pixel size in the store; lengths and areas are in px "
                           "(pass --pixel-size UM)")
            click.echo(f"[{a.region}] {a.shape[0]} x {a.shape[1]} px")
            for r, c in zip(a.fractions, a.connectivity, strict=True):
                ci = ("" if r["ci_low"] is None else
                      f" (95% CI {100 * r['ci_low']:.2f}-{100 * r['ci_high']:.2f})")
                click.echo(f"  {r['phase']:<6}{100 * r['fraction']:7.2f} %{ci}, "
                           f"percolating {100 * (c['percolating'] or 0):.0f} %")
            if a.tpb["points"] is not None:
                click.echo(f"  TPB {a.tpb['points']} points, {a.tpb[f'P_A_per_{u}2']:.4g} "
                           f"/{u}^2")
    click.echo(f"wrote {len(files)} files to {out}")


# --- end analyze ---------------------------------------------------------------

# --- robustness (robustness.py) ------------------------------------------------
def _levels(text: str | None, flag: str = "--blur") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}. Fix: e.g. "
                                 f"{flag} 0,1,2", param_hint=flag) from None


_QUICK = {"blur": (0, 1, 3), "brightness": (0.5, 1, 1.5), "noise": (0, 0.05, 0.1),
          "magnification": (0.5, 1, 2)}


@click.command("robustness")
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--model", "-m", default=None, type=click.Path(dir_okay=False),
              help="Model .safetensors [default: the bundled SOC model].")
@click.option("--truth", default="truth", help="Reference label group.")
@click.option("--out", "out", type=click.Path(file_okay=False), default="robustness",
              callback=writable_dir,
              help="Output folder (robustness.csv, .json, .png).")
@click.option("--tiles", type=int, default=4, help="Held-out tiles (random, non-overlapping).")
@click.option("--tile", type=int, default=512, help="Tile edge (px).")
@click.option("--seed", type=int, default=0, help="Seed of the tile choice and of the noise.")
@click.option("--quick", is_flag=True, help="Three levels per perturbation, two tiles.")
@click.option("--blur", default=None, metavar="S,S,...", help="Gaussian sigmas (px).")
@click.option("--brightness", default=None, metavar="F,F,...", help="Brightness factors.")
@click.option("--noise", default=None, metavar="S,S,...", help="Eq. 2 noise sigmas (C = 255).")
@click.option("--magnification", default=None, metavar="R,R,...", help="Resampling ratios.")
@click.option("--no-rescale-gain", is_flag=True,
              help="Skip the magnification sweep with pixel-size awareness.")
@click.option("--fixed-stats", is_flag=True,
              help="Normalise with the unperturbed tiles' statistics (a fixed intensity "
              "mapping) instead of the perturbed ones' (what segment does per mosaic).")
@click.option("--mode", type=click.Choice(choices(Mode)), default=None,
              help="Inference mode [default: semdask.segment.mode].")
@click.option("--precision", type=click.Choice(choices(Precision)), default=None,
              help="Autocast precision [default: semdask.segment.precision].")
@click.option("--device", default=None,
              help="auto, cpu, cuda, ... [default: semdask.segment.device].")
@handle_errors
def robustness_cmd(mosaic: str, model: str | None, truth: str, out: str, tiles: int, tile: int,
                   seed: int, quick: bool, blur: str | None, brightness: str | None,
                   noise: str | None, magnification: str | None, no_rescale_gain: bool,
                   fixed_stats: bool, mode: str | None, precision: str | None,
                   device: str | None) -> None:
    """Accuracy and mIoU of MOSAIC's held-out tiles under blur, brightness, noise and
    magnification (the paper's figs. 9-10), with the gain of pixel-size awareness."""
    from semdask.analysis.robustness import robustness, write_robustness

    given = {"blur": _levels(blur, "--blur"), "brightness": _levels(brightness, "--brightness"),
             "noise": _levels(noise, "--noise"),
             "magnification": _levels(magnification, "--magnification")}
    levels: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if quick:
        levels = {**_QUICK, **levels}
        tiles = min(tiles, 2)
    res = robustness(mosaic, model=model, truth=truth, tiles=tiles, tile=tile, seed=seed,
                     rescale_gain=not no_rescale_gain, renormalise=not fixed_stats, mode=mode,
                     precision=precision, device=device, **levels)
    files = write_robustness(res, out)
    click.echo(res.table())
    for lv in (0.5, 2.0):
        g = res.gain(lv)
        if g is not None:
            click.echo(f"pixel-size awareness at {lv:g}x: accuracy {100 * g:+.2f} pp")
    click.echo(f"wrote {len(files)} files to {out}")


# --- end robustness ------------------------------------------------------------

# --- evaluate (evaluate.py, plot_eval.py) ----------------------------------------
@click.command("evaluate")
@click.argument("pred", type=click.Path(exists=False))
@click.argument("truth", type=click.Path(exists=False))
@click.option("--pred-labels", default="phases", show_default=True,
              help="Label group of PRED when it is an OME-Zarr store.")
@click.option("--truth-labels", default="truth", show_default=True,
              help="Label group of TRUTH when it is an OME-Zarr store.")
@click.option("--classes", default=None, metavar="A,B,...",
              help="Class names [default: the stores' label metadata, else 0..max id].")
@click.option("--tolerance", type=float, default=2.0, show_default=True,
              help="Boundary F1 match distance in px (0 = the same pixel).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              callback=writable_file,
              help="Write all metrics (pooled and per image) to this JSON file.")
@click.option("--plots", type=click.Path(file_okay=False), default=None, callback=writable_dir,
              help="Write confusion, IoU/Dice, error overlay and frequency-IoU PNGs here.")
@click.option("--image", default=None, type=click.Path(exists=False),
              help="Image under the error overlay (store, image file or folder matched by "
              "stem) [default: the PRED store's image].")
@click.option("--level", type=int, default=None,
              help="Overlay pyramid level [default: finest with side <= --max-side].")
@click.option("--max-side", type=int, default=1024, show_default=True)
@click.option("--chunks", "chunk", type=int, default=None,
              help="Rechunk to this edge (memory/parallelism only; the numbers do not change).")
@cluster_options
@handle_errors
def evaluate_cmd(pred: str, truth: str, pred_labels: str, truth_labels: str,
                 classes: str | None, tolerance: float, json_out: str | None,
                 plots: str | None, image: str | None, level: int | None, max_side: int,
                 chunk: int | None, no_cluster: bool, **cluster: Any) -> None:
    """Accuracy, IoU, Dice, precision/recall, boundary F1 and confusion of PRED vs TRUTH.

    PRED and TRUTH: OME-Zarr stores, folders of label images (matched by file stem) or
    single PNG/TIFF label images. Truth 255 = ignore. Counts are pooled over the whole
    mosaics (and over all images of folders), so the numbers do not depend on chunking.
    """
    from pathlib import Path

    from semdask.analysis.evaluate import evaluate
    from semdask.analysis.plots import plot_evaluation

    names = [c.strip() for c in classes.split(",")] if classes else None
    with client_for(no_cluster, **cluster) as client:
        announce(client)
        ev = evaluate(pred, truth, pred_labels=pred_labels, truth_labels=truth_labels,
                      classes=names, tolerance=tolerance, image=image, chunk=chunk,
                      overlay=plots is not None, level=level, max_side=max_side, progress=True)
    click.echo(ev.table())
    if json_out:
        Path(json_out).write_text(ev.to_json())
        click.echo(f"wrote {json_out}")
    if plots:
        files = plot_evaluation(ev, plots)
        click.echo(f"wrote {len(files)} plots to {plots}")


# --- end evaluate ----------------------------------------------------------------


COMMANDS = [label_cmd, analyze_cmd, robustness_cmd, evaluate_cmd]
