"""Export commands: ``semdask export`` (stores) and ``semdask export-model`` (models)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from semdask.cli.common import handle_errors

__all__ = ["COMMANDS"]


@click.command("export")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["ngff04", "tiff"]), default="ngff04",
              help="ngff04: OME-NGFF 0.4 / Zarr v2 store (Fiji, QuPath, napari); tiff: tiled "
              "pyramidal OME-TIFF with the pixel size in um, one file per group.")
@click.option("--group", "groups", multiple=True, metavar="GROUP",
              help="image, labels/NAME or a sibling image (probs, confidence, ...); "
              "repeatable [ngff04: image + every label image; tiff: image].")
@click.option("--level", type=click.IntRange(min=0), default=None, metavar="N",
              help="tiff: pyramid level to start from (0 = full resolution) [0].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@handle_errors
def export_cmd(store: Path, out: Path, fmt: str, groups: tuple[str, ...], level: int | None,
               overwrite: bool) -> None:
    """Export STORE (a semdask OME-Zarr) to OUT for other tools.

    \b
    semdask export m.ome.zarr m.ngff04.zarr                        # Fiji, QuPath, napari
    semdask export m.ome.zarr phases.ome.tif --format tiff --group labels/phases
    semdask export m.ome.zarr m.ome.tif --format tiff --level 2   # a quarter-size TIFF
    """
    from semdask.storage.export import export

    for p in export(store, out, fmt=fmt, groups=list(groups) or None, level=level,
                    overwrite=overwrite):
        click.echo(f"{p}: written ({fmt})")


@click.command("export-model")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "bioimageio"]), default="onnx",
              help="onnx: OUT.onnx checked against PyTorch with onnxruntime; bioimageio: a "
              "bioimage.io model package (OUT.zip, or a folder), validated offline.")
@click.option("--sample", type=click.Path(path_type=Path), default=None, metavar="STORE",
              help="bioimageio: take the test image from the centre of this mosaic "
              "(at the model's pixel size) [a synthetic SOC mosaic].")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo",
              help="torch's ONNX exporter (torchscript: the legacy one, needs only onnx).")
@click.option("--opset", type=click.IntRange(min=13), default=18, help="onnx: ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@handle_errors
def export_model_cmd(model: Path, out: Path, fmt: str, sample: Path | None, exporter: str,
                     opset: int, overwrite: bool) -> None:
    """Export MODEL (.safetensors; 'bundled' for the bundled one) to ONNX or bioimage.io.

    \b
    semdask export-model model.safetensors model.onnx
    semdask export-model bundled soc-unet.zip --format bioimageio
    """
    from semdask.nets.bioimageio import export_bioimageio
    from semdask.nets.export import export_onnx

    src = None if str(model) == "bundled" else model
    if fmt == "onnx":
        res = export_onnx(src, out, opset=opset, exporter=exporter, overwrite=overwrite)
        click.echo(str(res))
        return
    pkg = export_bioimageio(src, out, sample=_sample(sample), exporter=exporter,
                            overwrite=overwrite)
    click.echo(f"{pkg.path}: bioimage.io package, {pkg.status}; {pkg.onnx}")
    for w in pkg.warnings:
        click.echo(f"  bioimageio.spec note: {w}")


def _sample(store: Path | None) -> np.ndarray:
    """A 256 x 256 tile from the centre of ``store``, else of a synthetic mosaic."""
    if store is None:
        from semdask.synthetic.sem import synthetic_mosaic

        return np.asarray(synthetic_mosaic((256, 256), seed=0, chunk=256).image)
    from semdask.storage.io import open_mosaic

    img = open_mosaic(store).image
    h, w = img.shape
    y0, x0 = max(0, h // 2 - 128), max(0, w // 2 - 128)
    return np.asarray(img[y0: y0 + 256, x0: x0 + 256])


COMMANDS = [export_cmd, export_model_cmd]
