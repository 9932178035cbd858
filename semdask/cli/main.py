"""Command-line interface: thin wrappers that parse, call one public function, report.

Every failure exits non-zero with the error's message (what was expected, what
arrived, how to fix it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import dask

from semdask import __version__
from semdask.cli.common import handle_errors as _handle_errors
from semdask.cli.common import positive as _positive
from semdask.training.config import (
    Arch,
    Augment,
    ClassWeights,
    Loss,
    Norm,
    Optimizer,
    Sampling,
    Schedule,
    Split,
)
from semdask.training.config import choices as _tchoices

__all__ = ["main", "run"]

log = logging.getLogger("semdask")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="semdask")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True,
              help="Warnings and errors only, no progress reports (wins over -v).")
def main(verbose: int, quiet: bool) -> None:
    """Segment the phases of SEM mosaics (OME-Zarr) with a U-Net on Dask."""
    from semdask import progress

    verbose = 0 if quiet else verbose
    progress.configure(quiet=quiet)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("semdask").setLevel(logging.WARNING if quiet
                                          else min(level, logging.INFO))
    # Dask's own chatter (start-up, shutdown): its warnings with -v, its info with -vv
    chatter = ("error", "warning", "info")[min(verbose, 2)]
    dask.config.set({"logging.distributed": chatter})
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(chatter.upper())


def run() -> None:
    """Console entry point (``semdask``, ``python -m semdask``): :func:`main`, then exit.

    After a command that succeeded and asked for it
    (:func:`semdask.cli.common.skip_teardown`: an in-process ``segment``, whose outputs are
    complete and whose lock is released by then) the process ends with ``os._exit(0)``
    once the logs and standard streams are flushed: the interpreter's teardown would add
    ~0.3 s (torch de-registers its operators) to a command of a few seconds. Failures and
    every other command exit the usual way.
    """
    import os
    import sys

    from semdask.cli.common import teardown_skipped

    try:
        main()
    except SystemExit as e:
        if e.code in (0, None) and teardown_skipped():
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


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
    from semdask.progress import DaskProgress
    from semdask.storage import io
    from semdask.synthetic.sem import PHASES, SynthParams, synthetic_mosaic

    params = SynthParams() if nio_fraction is None else SynthParams(nio_fraction=nio_fraction)
    m = synthetic_mosaic((shape[0], shape[1]), seed=seed, chunk=chunk, params=params)
    px = m.pixel_size_um
    log.info("synth: rendering image, truth labels and EDS maps %d x %d (chunk %d)", *shape,
             chunk)
    with DaskProgress("synth"):
        io.write_synthetic(out, m, overwrite=overwrite)
    log.info("synth: wrote %s (image, labels/truth, eds)", out)
    click.echo(f"{out}: {shape[0]} x {shape[1]} uint8 synthetic mosaic, seed {seed}, "
               f"pixel size {px:g} µm, nio_fraction {params.nio_fraction:g}; "
               f"labels/truth ({', '.join(PHASES)}); eds (Ni, O, Zr) at 1/4 resolution")


# --- end synth ---------------------------------------------------------------

# --- convert (io.py / ome.py) -------------------------------------------------


def _databar(value: str | None) -> bool | int | None:
    if value is None:
        return None  # crop what the file's metadata declares
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
              callback=_positive, help="Pixel size in µm, > 0 (wins over vendor tags).")
@click.option("--crop-databar", "crop_databar", is_flag=False, flag_value="auto", default=None,
              metavar="[auto|ROWS]",
              help="Data bar: by default the rows the metadata declares (else a bar detected "
              "in an instrument export) are cropped; auto: also in any image; ROWS: drop "
              "that many rows (0: none).")
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
    from semdask.progress import DaskProgress

    with DaskProgress("convert"):
        if each:
            mosaics = convert_each(inputs, out, **kw)
        else:
            mosaics = [convert(inputs, out, tile_offsets=tile_offsets, **kw)]
    for m in mosaics:
        px = ("unknown (pass --pixel-size UM)" if m.pixel_size_um is None
              else f"{m.pixel_size_um:g} µm")
        lab = f", labels/{labels_name}" if labels is not None else ""
        click.echo(f"{m.path}: {m.image.shape[0]} x {m.image.shape[1]} {m.image.dtype}, "
                   f"pixel size {px}, {m.levels} levels{lab}")


# --- end convert --------------------------------------------------------------

# --- train (train.py) ---------------------------------------------------------
@main.command("train")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              metavar="MODEL.safetensors", help="Best model (+ .yaml, .train.yaml, .last.*, "
              ".metrics.csv).")
@click.option("--budget", default=None, metavar="TIME|Nsteps",
              help="Training budget: wall time (30m, 1h, 1800) or steps (2000steps); the "
              "schedule is fitted to it after timing a few steps [default: 20 x 100 steps].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="RUN.yaml", help="Training parameters from a YAML file "
              "(e.g. an earlier MODEL.train.yaml); flags given here win.")
@click.option("--no-plan", "no_plan", is_flag=True, default=False,
              help="Do not plan from the data: fixed defaults (window 256, batch 8, 20 x 100).")
@click.option("--labels", default=None, help="Label group to learn [truth].")
@click.option("--epochs", type=int, default=None, help="[planned]")
@click.option("--steps-per-epoch", "steps_per_epoch", type=int, default=None, help="[planned]")
@click.option("--batch-size", "batch_size", type=int, default=None, help="[planned]")
@click.option("--window", type=int, default=None,
              help="Training window edge, a multiple of 16 [planned].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [0.001].")
@click.option("--schedule", type=click.Choice(_tchoices(Schedule)), default=None,
              help="Decay after the warm-up, halve on a validation plateau, or constant "
              "[cosine].")
@click.option("--warmup", type=float, default=None, help="Warm-up share of the steps [planned].")
@click.option("--arch", type=click.Choice(_tchoices(Arch)), default=None,
              help="The paper's U-Net or the residual-encoder U-Net [unet].")
@click.option("--norm", type=click.Choice(_tchoices(Norm)), default=None,
              help="U-Net: batch norm after each convolution (folded into the saved model), "
              "or none as in the paper [batch].")
@click.option("--dropout", type=float, default=None, metavar="P",
              help="U-Net dropout rate in every block [0 with --norm batch; the paper's "
              "0.1-0.3 by level with --norm none].")
@click.option("--loss", type=click.Choice(_tchoices(Loss)), default=None,
              help="ce+dice is 0.6 CE + 0.4 soft Dice over the batch (--dice-weight) [ce+dice].")
@click.option("--dice-weight", "dice_weight", type=float, default=None, help="[0.4]")
@click.option("--class-weights", "class_weights", type=click.Choice(_tchoices(ClassWeights)),
              default=None, help="auto: inverse-sqrt pixel frequencies of the training labels, "
              "clipped to a 10x ratio [planned: auto; none with --no-plan].")
@click.option("--optimizer", type=click.Choice(_tchoices(Optimizer)), default=None,
              help="[adam]")
@click.option("--weight-decay", "weight_decay", type=float, default=None,
              help="[0 for adam, 0.01 for adamw]")
@click.option("--sampling", type=click.Choice(_tchoices(Sampling)), default=None,
              help="balanced: a share --balance of windows centred on a random class "
              "[balanced].")
@click.option("--balance", type=float, default=None,
              help="Class-balanced share of windows [planned from the rarest class].")
@click.option("--split", type=click.Choice(_tchoices(Split)), default=None,
              help="Held out for validation: a row band, whole stores, or grid blocks "
              "(all with a one-window guard gap) [bands].")
@click.option("--val-store", "val_store", multiple=True, type=click.Path(path_type=Path),
              help="A store held out for validation (repeatable; implies --split stores).")
@click.option("--val-fraction", "val_fraction", type=float, default=None,
              help="Share held out: band height, or 1/k of the stores or blocks [0.2].")
@click.option("--fold", type=int, default=None, help="Which band/store group/block fold is "
              "validation [0].")
@click.option("--block", type=int, default=None, help="Block edge in px for --split blocks "
              "[4 windows].")
@click.option("--weights", default=None, metavar="GROUP",
              help="Per-pixel loss weights, e.g. eds-rf-confidence from semdask label.")
@click.option("--augment", type=click.Choice(_tchoices(Augment)), default=None,
              help="Augmentation preset (batched, on the device) [planned].")
@click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA [on].")
@click.option("--patience", type=int, default=None,
              help="Stop after N epochs without a better validation mIoU.")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write TensorBoard scalars to DIR.")
@click.option("--freeze-encoder-epochs", "freeze_encoder_epochs", type=int, default=None,
              help="Keep the encoder frozen for the first N epochs.")
@click.option("--encoder-weights", "encoder_weights", type=click.Path(path_type=Path),
              default=None, metavar="FILE", help="Pretrained weights (semdask pretrain, same "
              "--arch): encoder + decoder loaded, head random.")
@click.option("--ensemble", type=int, default=None, metavar="M",
              help="Train M members (seed+i, fold+i) to STEM-m<i>.safetensors [1].")
@click.option("--pixel-size", "pixel_size_um", type=float, default=None, metavar="UM",
              help="Train at this pixel size (um): stores are resampled to it first; "
              "segment then resamples mosaics to it by itself.")
@click.option("--scale", type=float, default=None, metavar="F",
              help="Train at F x each store's sampling (0.5: half the pixels, twice the "
              "context per window) [planned].")
@click.option("--workers", type=int, default=None,
              help="DataLoader worker processes [0 on CPU; on CUDA cores - 1, at most 8].")
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--device", default=None,
              help="Torch device (auto, cpu, cuda, cuda:1, ...); auto: CUDA if present [auto].")
@click.option("--resume", type=click.Path(path_type=Path), default=None, metavar="CKPT",
              help="Continue from MODEL.last.safetensors of an earlier run.")
@_handle_errors
def train_cmd(stores: tuple[Path, ...], out: Path, val_store: tuple[Path, ...],
              split: str | None, workers: int | None, config_file: Path | None,
              no_plan: bool, **kw: Any) -> None:
    """Train a network on the mosaics STORE... (OME-Zarr with labels) and write --out.

    The recipe is planned from the data (window, scale, batch, sampling, class weights,
    augmentation;
    with --budget the schedule) and printed; every planned value can be given as a flag.
    """
    from semdask.training.config import TrainConfig
    from semdask.training.train import train

    base = TrainConfig.from_yaml(config_file) if config_file is not None else None
    paths = [*stores]
    held = []
    for v in val_store:
        same = [i for i, p in enumerate(paths) if p.resolve() == v.resolve()]
        held.append(same[0] if same else len(paths))
        paths += [] if same else [v]
    given = {k: v for k, v in kw.items() if v is not None}
    if val_store:
        given.update(split="stores", val_stores=held)
    elif split is not None:
        given["split"] = split
    if workers is not None:
        given["num_workers"] = workers
    if no_plan:
        given["plan"] = False
    r = train(paths, out, base, on_plan=click.echo, **given)
    for m in r.members or [r]:
        click.echo(f"{m.model_path}: best val mIoU {m.best_miou:.4f} (epoch {m.best_epoch}"
                   f"{', stopped early' if m.stopped_early else ''}); metrics {m.metrics_csv}")
    click.echo(f"{r.seconds:.0f} s; plan: {out.with_name(out.stem + '.train.yaml')}")


# --- end train ----------------------------------------------------------------



def _register() -> None:
    from semdask.cli import analysis as cli_analysis
    from semdask.cli import export as cli_export
    from semdask.cli import ops as cli_ops
    from semdask.cli import segment as cli_segment
    from semdask.cli import training as cli_training

    for cmd in (*cli_segment.COMMANDS, *cli_ops.COMMANDS, *cli_analysis.COMMANDS,
                *cli_training.COMMANDS, *cli_export.COMMANDS):
        main.add_command(cmd)


_register()


if __name__ == "__main__":  # pragma: no cover
    main()
