"""From a microscope TIFF to phase fractions: convert (vendor pixel size), segment, export.

    python examples/convert_and_segment.py --out /tmp/semdask-convert

Writes a Zeiss-style TIFF (pixel size in the CZ_SEM tag, as SmartSEM does) with a data bar,
converts it to OME-Zarr (the pixel size is read from the tag, the data bar cropped), segments
it with the bundled model, prints the phase areas in um^2 and exports an NGFF 0.4 copy for
Fiji/QuPath.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import tifffile

from semdask.analysis.metrics import mosaic_fractions
from semdask.inference.segment import segment
from semdask.ingest.convert import convert
from semdask.storage.export import export_ngff04
from semdask.synthetic.sem import render_region


def write_zeiss_tiff(path: Path, shape: tuple[int, int]) -> None:
    image, _ = render_region(0, 0, *shape, seed=21)
    bar = np.zeros((64, shape[1]), np.uint8)
    bar[20:44, 40:400] = 255  # text-like block in the data bar
    # the CZ_SEM tag as SmartSEM writes it (tifffile parses it into tif.sem_metadata)
    text = "\r\n".join(["0", "0", "AP_WD", "WD = 8.5 mm", "AP_IMAGE_PIXEL_SIZE",
                        "Image Pixel Size = 44.58 nm", ""])
    tifffile.imwrite(path, np.vstack([image, bar]), extratags=[(34118, "s", 0, text, True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(1024, 1536))
    ap.add_argument("--out", type=Path, default=Path("convert-output"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    tif = args.out / "zeiss.tif"
    write_zeiss_tiff(tif, tuple(args.shape))
    mosaic = convert([tif], args.out / "zeiss.ome.zarr", crop_databar=True, overwrite=True)
    print(f"converted: {mosaic.image.shape} px, pixel size {mosaic.pixel_size_um} um")
    segment(mosaic.path, overwrite=True, progress=False)
    print(mosaic_fractions(mosaic.path).table())
    copy = export_ngff04(mosaic.path, args.out / "zeiss.ngff04.zarr", overwrite=True)
    print(f"NGFF 0.4 copy: {copy}")


if __name__ == "__main__":
    main()
