"""Command-line interface: thin wrappers that parse, call one public function, report.

Every failure exits non-zero with the error's message (what was expected, what
arrived, how to fix it).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import dask

from semdask import __version__
from semdask.cli.common import announce as _announce
from semdask.cli.common import client_for as _client
from semdask.cli.common import cluster_options as _cluster_options
from semdask.cli.common import handle_errors as _handle_errors

__all__ = ["main"]

log = logging.getLogger("semdask")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="semdask")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Segment the phases of SEM mosaics (OME-Zarr) with a U-Net on Dask."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("semdask").setLevel(min(level, logging.INFO))
    # Dask's own chatter (start-up, shutdown): its warnings with -v, its info with -vv
    quiet = ("error", "warning", "info")[min(verbose, 2)]
    dask.config.set({"logging.distributed": quiet})
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(quiet.upper())


# --- synth (synthetic.py) ----------------------------------------------------
@main.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shape", nargs=2, type=int, required=True, metavar="H W",
              help="Mosaic size in pixels.")
@click.option("--seed", type=int, default=0, help="Seed (same seed, same pixels).")
@click.option("--nio-fraction", "nio_fraction", type=float, default=None, metavar="F",
              help="Share of the Ni oxidised to NiO, 0..1 (default: SynthParams).")
@click.option("--chunk", type=int, default=2048, metavar="N",
              help="Chunk/shard edge in px (multiple of 4).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output store.")
@_handle_errors
def synth_cmd(out: Path, shape: tuple[int, int], seed: int, nio_fraction: float | None,
              chunk: int, overwrite: bool) -> None:
    """Write a synthetic Ni/YSZ electrode mosaic OUT.ome.zarr (image, truth labels, EDS)."""
    from dask.diagnostics import ProgressBar

    from semdask.storage import io
    from semdask.synthetic.sem import PHASES, SynthParams, synthetic_mosaic

    params = SynthParams() if nio_fraction is None else SynthParams(nio_fraction=nio_fraction)
    m = synthetic_mosaic((shape[0], shape[1]), seed=seed, chunk=chunk, params=params)
    px = m.pixel_size_um
    log.info("synth: rendering image, truth labels and EDS maps %d x %d (chunk %d)", *shape,
             chunk)
    with ProgressBar(minimum=1.0, out=sys.stderr):
        io.write_synthetic(out, m, overwrite=overwrite)
    log.info("synth: wrote %s (image, labels/truth, eds)", out)
    click.echo(f"{out}: {shape[0]} x {shape[1]} uint8 synthetic mosaic, seed {seed}, "
               f"pixel size {px:g} µm, nio_fraction {params.nio_fraction:g}; "
               f"labels/truth ({', '.join(PHASES)}); eds (Ni, O, Zr) at 1/4 resolution")


# --- end synth ---------------------------------------------------------------

# --- convert (io.py / ome.py) -------------------------------------------------


def _databar(value: str | None) -> bool | int:
    if value is None:
        return False
    if value.strip().lower() == "auto":
        return True
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise click.BadParameter(f"expected 'auto' or a number of rows >= 0, got {value!r}")
    return rows


@main.command("convert")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--pixel-size", "pixel_size", type=float, default=None, metavar="UM",
              help="Pixel size in µm (wins over vendor tags).")
@click.option("--crop-databar", "crop_databar", is_flag=False, flag_value="auto", default=None,
              metavar="[auto|ROWS]",
              help="Crop the instrument data bar: detect it (auto) or drop ROWS bottom rows.")
@click.option("--tile-offsets", type=click.Path(path_type=Path), default=None, metavar="CSV",
              help="CSV file,y,x (pixels): fuse the inputs as a tile grid (linear blending).")
@click.option("--chunk", type=int, default=None, metavar="N", help="Chunk/shard edge in px.")
@click.option("--ngff", type=click.Choice(["0.5", "0.4"]), default="0.5",
              help="0.4 also writes OUT.ngff04.ome.zarr for Fiji/QuPath.")
@click.option("--page", type=int, default=None, help="Page of a multi-page TIFF.")
@click.option("--labels", "labels", type=click.Path(path_type=Path), default=None,
              metavar="PATH", help="Label image (class indices, 255 = ignore) for one input, "
              "or a folder of label images matched by file stem.")
@click.option("--labels-name", "labels_name", default="truth", show_default=True,
              help="Label group to write (labels/NAME; semdask train --labels NAME).")
@click.option("--classes", default=None, metavar="A,B,C",
              help="Class names by label value, comma-separated.")
@click.option("--classes-from", "classes_from", type=click.Path(path_type=Path), default=None,
              metavar="FILE", help='Class names from JSON (a list or {"classes": [...]}, e.g. '
              "a dataset's meta.json) or a text file, one per line.")
@click.option("--overwrite", is_flag=True, help="Replace existing output stores.")
@_handle_errors
def convert_cmd(inputs: tuple[Path, ...], out: Path, pixel_size: float | None,
                crop_databar: str | None, tile_offsets: Path | None, chunk: int | None,
                ngff: str, page: int | None, labels: Path | None, labels_name: str,
                classes: str | None, classes_from: Path | None, overwrite: bool) -> None:
    """Convert SEM image(s) INPUT... into OME-Zarr OUT.

    One image -> OUT.ome.zarr; several images or a folder -> OUT/<stem>.ome.zarr each;
    with --tile-offsets the images are fused into one mosaic OUT. With --labels the
    label images are stored as labels/NAME (checked first: nothing is written when a
    shape or value does not fit).
    """
    from dask.diagnostics import ProgressBar

    from semdask.ingest.convert import convert, convert_each, read_classes

    if classes is not None and classes_from is not None:
        raise click.BadParameter("give --classes or --classes-from, not both")
    if (classes or classes_from) and labels is None:
        raise click.BadParameter("--classes/--classes-from name the values of --labels; "
                                 "pass --labels PATH too")
    names = (read_classes(classes_from) if classes_from is not None
             else [c.strip() for c in classes.split(",")] if classes else None)
    kw: dict[str, Any] = dict(pixel_size_um=pixel_size, crop_databar=_databar(crop_databar),
                              chunk=chunk, ngff=ngff, overwrite=overwrite, page=page)
    if labels is not None:
        kw.update(labels=labels, labels_name=labels_name, classes=names)
    each = tile_offsets is None and (len(inputs) > 1 or any(p.is_dir() for p in inputs))
    with ProgressBar(minimum=1.0, out=sys.stderr):
        if each:
            mosaics = convert_each(inputs, out, **kw)
        else:
            mosaics = [convert(inputs, out, tile_offsets=tile_offsets, **kw)]
    for m in mosaics:
        px = "none" if m.pixel_size_um is None else f"{m.pixel_size_um:g} µm"
        lab = f", labels/{labels_name}" if labels is not None else ""
        click.echo(f"{m.path}: {m.image.shape[0]} x {m.image.shape[1]} {m.image.dtype}, "
                   f"pixel size {px}, {m.levels} levels{lab}")


# --- end convert --------------------------------------------------------------

# --- train (train.py) ---------------------------------------------------------
@main.command("train")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              metavar="MODEL.safetensors", help="Best model (+ .yaml, .last.*, .metrics.csv).")
@click.option("--labels", default="truth", help="Label group to learn (truth or phases).")
@click.option("--epochs", type=int, default=20)
@click.option("--steps-per-epoch", "steps_per_epoch", type=int, default=100)
@click.option("--batch-size", "batch_size", type=int, default=8)
@click.option("--window", type=int, default=256, help="Training window edge (multiple of 16).")
@click.option("--lr", type=float, default=1e-3, help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(["cosine", "plateau", "constant"]),
              default="cosine", help="Cosine decay, halve on a validation plateau, or constant.")
@click.option("--arch", type=click.Choice(["unet", "resunet"]), default="unet",
              help="The paper's U-Net or the residual-encoder U-Net.")
@click.option("--loss", type=click.Choice(["ce", "ce+dice", "focal"]), default="ce+dice",
              help="ce+dice is 0.6 CE + 0.4 soft Dice (see --dice-weight).")
@click.option("--dice-weight", "dice_weight", type=float, default=0.4)
@click.option("--class-weights", "class_weights", type=click.Choice(["none", "auto"]),
              default="none", help="auto: inverse-sqrt pixel frequencies of the training labels.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default="adam")
@click.option("--weight-decay", "weight_decay", type=float, default=None,
              help="[default: 0 for adam, 0.01 for adamw]")
@click.option("--sampling", type=click.Choice(["balanced", "uniform"]), default="balanced",
              help="balanced: a share --balance of windows centred on a random class.")
@click.option("--balance", type=float, default=0.5, help="Class-balanced share of windows.")
@click.option("--split", type=click.Choice(["bands", "stores", "blocks"]), default="bands",
              help="Held out for validation: a row band, whole stores, or grid blocks "
              "(all with a one-window guard gap).")
@click.option("--val-store", "val_store", multiple=True, type=click.Path(path_type=Path),
              help="A store held out for validation (repeatable; implies --split stores).")
@click.option("--val-fraction", "val_fraction", type=float, default=0.2,
              help="Share held out: band height, or 1/k of the stores or blocks.")
@click.option("--fold", type=int, default=0, help="Which band/store group/block fold is "
              "validation.")
@click.option("--block", type=int, default=None, help="Block edge in px for --split blocks "
              "[default: 4 windows].")
@click.option("--weights", default=None, metavar="GROUP",
              help="Per-pixel loss weights, e.g. eds-rf-confidence from semdask label.")
@click.option("--augment", type=click.Choice(["none", "flips", "light", "default", "strong"]),
              default="default", help="Augmentation preset (batched, on the device).")
@click.option("--amp/--no-amp", default=True, help="bf16 autocast on CUDA.")
@click.option("--patience", type=int, default=None,
              help="Stop after N epochs without a better validation mIoU.")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write TensorBoard scalars to DIR.")
@click.option("--freeze-encoder-epochs", "freeze_encoder_epochs", type=int, default=0,
              help="resunet: keep the encoder frozen for the first N epochs.")
@click.option("--encoder-weights", "encoder_weights", type=click.Path(path_type=Path),
              default=None, metavar="FILE", help="resunet: encoder weights (safetensors).")
@click.option("--ensemble", type=int, default=1, metavar="M",
              help="Train M members (seed+i, fold+i) to STEM-m<i>.safetensors.")
@click.option("--pixel-size", "pixel_size_um", type=float, default=None, metavar="UM",
              help="Train at this pixel size (um): stores are resampled to it first; "
              "segment then resamples mosaics to it by itself.")
@click.option("--scale", type=float, default=None, metavar="F",
              help="Train at F x each store's sampling (0.5: half the pixels, twice the "
              "context per window).")
@click.option("--workers", type=int, default=None,
              help="DataLoader worker processes [0 on CPU; on CUDA cores - 1, at most 8].")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="cpu", help="Torch device (cpu, cuda, cuda:1, ...).")
@click.option("--resume", type=click.Path(path_type=Path), default=None, metavar="CKPT",
              help="Continue from MODEL.last.safetensors of an earlier run.")
@_handle_errors
def train_cmd(stores: tuple[Path, ...], out: Path, val_store: tuple[Path, ...],
              split: str, workers: int, **kw: Any) -> None:
    """Train a network on the mosaics STORE... (OME-Zarr with labels) and write --out."""
    from semdask.training.train import train

    paths = [*stores]
    held = []
    for v in val_store:
        same = [i for i, p in enumerate(paths) if p.resolve() == v.resolve()]
        held.append(same[0] if same else len(paths))
        paths += [] if same else [v]
    r = train(paths, out, split="stores" if val_store else split, num_workers=workers,
              val_stores=held or None, **kw)
    for m in r.members or [r]:
        click.echo(f"{m.model_path}: best val mIoU {m.best_miou:.4f} (epoch {m.best_epoch}"
                   f"{', stopped early' if m.stopped_early else ''}); metrics {m.metrics_csv}")
    click.echo(f"{r.seconds:.0f} s")


# --- end train ----------------------------------------------------------------

# --- segment / fractions / preview / demo (infer.py, metrics.py) -------------
@main.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--model", "-m", "models", multiple=True, type=click.Path(dir_okay=False),
              help="Model .safetensors [default: the bundled SOC model]; repeat it (or give a "
              "quoted glob) for an ensemble: probabilities are averaged.")
@click.option("--ensemble", default=None, metavar="PREFIX",
              help="Ensemble members PREFIX-m0.safetensors, PREFIX-m1, ... (semdask train "
              "--ensemble); PREFIX may be the train --out file.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average over the 8 flips/rotations (8x slower).")
@click.option("--uncertainty", is_flag=True,
              help="Also write 'uncertainty' (std across members/TTA views of the predicted "
              "class's probability) and 'entropy' (of the mean probabilities, 0..1).")
@click.option("--output", "-o", default=None, type=click.Path(),
              help="Write to this OME-Zarr instead of into MOSAIC.")
@click.option("--mode", type=click.Choice(["window", "whole-chunk"]), default=None,
              help="Blended sliding windows, or the whole chunk at once (fully convolutional).")
@click.option("--chunks", "chunk", default=None, type=int, help="Chunk edge in pixels.")
@click.option("--window", default=None, type=int, help="Window edge (multiple of 16).")
@click.option("--overlap", default=None, type=float, help="Window overlap fraction [0, 1).")
@click.option("--blend", type=click.Choice(["gaussian", "cosine", "uniform"]), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Autocast precision (bf16 is ~2.5x faster on recent CPUs).")
@click.option("--batch-size", default=None, type=int, help="Windows per forward pass.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
@click.option("--probs", is_flag=True, help="Also write float16 class probabilities.")
@click.option("--confidence", is_flag=True, help="Also write the maximum probability.")
@click.option("--name", default="phases", help="Label group name.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs of this name.")
@click.option("--gpu-resources", is_flag=True,
              help="Annotate inference tasks with resources={'GPU': 1} (workers started "
              "with --resources GPU=1, e.g. dask-cuda).")
@click.option("--resume", is_flag=True,
              help="Keep the recorded, intact blocks of an earlier run with the same input, "
              "model and plan; compute only missing or stale ones (see semdask verify).")
@click.option("--rescale/--no-rescale", default=None, show_default="auto",
              help="Resample to the model's training pixel size and back [default: when the "
              "mosaic's and the model's pixel sizes are known and differ by > 5 %].")
@_cluster_options
@_handle_errors
def segment(mosaic: str, models: tuple[str, ...], ensemble: str | None, tta: bool,
            uncertainty: bool, output: str | None, mode: str | None, chunk: int | None,
            window: int | None, overlap: float | None, blend: str | None,
            precision: str | None, batch_size: int | None, device: str, probs: bool,
            confidence: bool, name: str, overwrite: bool, gpu_resources: bool, resume: bool,
            rescale: bool | None, profile: str | None, scheduler_address: str | None,
            scheduler_file: str | None, n_workers: int | None, dashboard_address: str | None,
            no_cluster: bool) -> None:
    """Segment MOSAIC (OME-Zarr) into phases; labels go to <OUT or MOSAIC>/labels/NAME.

    With a Dask cluster, a performance report is saved beside the output store as
    <OUT or MOSAIC>.performance.html.
    """
    from semdask.cluster.connect import performance_report_path, profile_has_gpu_workers, report
    from semdask.inference.batch import drain_on_sigterm
    from semdask.inference.segment import segment as run

    gpu = gpu_resources or (not no_cluster and profile_has_gpu_workers(
        profile, scheduler_address=scheduler_address, scheduler_file=scheduler_file))
    with drain_on_sigterm(), _client(no_cluster, profile=profile,
                                     scheduler_address=scheduler_address,
                                     scheduler_file=scheduler_file, n_workers=n_workers,
                                     dashboard_address=dashboard_address) as client, \
            report(client, performance_report_path(output or mosaic)) as html:
        _announce(client)
        r = run(mosaic, model=list(models) or None, ensemble=ensemble, tta=tta,
                uncertainty=uncertainty, output=output, mode=mode, window=window, overlap=overlap,
                blend=blend, chunk=chunk, precision=precision, batch_size=batch_size,
                device=device, probs=probs, confidence=confidence, name=name,
                overwrite=overwrite, client=client, gpu_resources=gpu, resume=resume,
                rescale=rescale)
    if html is not None:
        click.echo(f"performance report: {html}")
    click.echo(f"wrote {r.output}/{r.labels} ({r.shape[0]} x {r.shape[1]} px, {r.plan.mode} "
               f"mode) in {r.seconds:.1f} s = {r.mpix_per_s:.2f} MPix/s")
    if len(r.members) > 1 or tta:
        click.echo(f"ensemble of {len(r.members)} model(s){' x 8 TTA views' if tta else ''}"
                   + (f"; also wrote {', '.join(r.extras)}" if r.extras else ""))
    if r.rescale != 1.0:
        click.echo(f"inferred at the model's pixel size (resampled by {r.rescale:.4g} and back)")


@main.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--labels", "name", default="phases", help="Label group to count.")
@click.option("--pixel-size", type=float, default=None,
              help="Pixel size in um [default: from the store].")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--truth", default=None, help="Also show a reference label group, e.g. truth.")
@_handle_errors
def fractions(mosaic: str, name: str, pixel_size: float | None, csv_out: str | None,
              json_out: str | None, truth: str | None) -> None:
    """Phase area fractions (pooled counts) and areas in um^2."""
    from semdask.analysis.metrics import mosaic_fractions

    f = mosaic_fractions(mosaic, labels=name, pixel_size_um=pixel_size)
    ref = mosaic_fractions(mosaic, labels=truth, pixel_size_um=pixel_size) if truth else None
    click.echo(f.table(ref))
    if csv_out:
        Path(csv_out).write_text(f.to_csv())
    if json_out:
        Path(json_out).write_text(f.to_json())


@main.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.argument("out_png", type=click.Path(dir_okay=False))
@click.option("--labels", "name", default="phases")
@click.option("--level", type=int, default=None,
              help="Pyramid level [default: finest level with side <= --max-side].")
@click.option("--max-side", type=int, default=2048)
@click.option("--alpha", type=float, default=0.45)
@_handle_errors
def preview(mosaic: str, out_png: str, name: str, level: int | None, max_side: int,
            alpha: float) -> None:
    """Write an overlay PNG of image and labels at one pyramid level."""
    from semdask.analysis.preview import preview as run

    png = run(mosaic, out_png, labels=name, level=level, alpha=alpha, max_side=max_side)
    click.echo(f"wrote {png}")


@main.command()
@click.option("--out", "workdir", default="demo-output", type=click.Path(file_okay=False),
              show_default=True)
@click.option("--shape", nargs=2, type=int, default=(8192, 8192), show_default=True)
@click.option("--seed", type=int, default=2026)
@click.option("--nio-fraction", type=float, default=0.15)
@click.option("--mode", type=click.Choice(["window", "whole-chunk"]), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None)
@click.option("--chunks", "chunk", type=int, default=None)
@_cluster_options
@_handle_errors
def demo(workdir: str, shape: tuple[int, int], seed: int, nio_fraction: float,
         mode: str | None, precision: str | None, chunk: int | None,
         profile: str | None, scheduler_address: str | None, scheduler_file: str | None,
         n_workers: int | None, dashboard_address: str | None, no_cluster: bool) -> None:
    """Synthesise an SOC mosaic, segment it with the bundled model, report phase fractions."""
    from semdask.synthetic.demo import run_demo

    with _client(no_cluster, profile=profile, scheduler_address=scheduler_address,
                 scheduler_file=scheduler_file, n_workers=n_workers,
                 dashboard_address=dashboard_address) as client:
        _announce(client)
        r = run_demo(workdir, shape=tuple(shape), seed=seed, nio_fraction=nio_fraction,
                     mode=mode, precision=precision, chunk=chunk, client=client,
                     echo=click.echo)
    click.echo(r.summary())


# --- end segment --------------------------------------------------------------


def _register() -> None:
    from semdask.cli import analysis as cli_analysis
    from semdask.cli import ops as cli_ops

    for cmd in (*cli_ops.COMMANDS, *cli_analysis.COMMANDS):
        main.add_command(cmd)


_register()


if __name__ == "__main__":  # pragma: no cover
    main()
