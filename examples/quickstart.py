"""Quickstart with the Python API: synthesise, segment, measure, preview.

    python examples/quickstart.py --shape 2048 2048 --out /tmp/semdask-quickstart

Every step is one public function; the CLI (``semdask synth|segment|fractions|preview``)
calls the same functions.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from semdask.analysis.metrics import confusion_matrix, mosaic_fractions, scores_from_confusion
from semdask.analysis.preview import preview
from semdask.cluster.connect import connect
from semdask.inference.segment import segment
from semdask.storage import io as sio
from semdask.synthetic.sem import SynthParams, synthetic_mosaic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(2048, 2048))
    ap.add_argument("--out", type=Path, default=Path("quickstart-output"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    path = args.out / "mosaic.ome.zarr"
    # 1. a synthetic Ni/YSZ electrode mosaic with known truth (labels/truth) and EDS maps
    sio.write_synthetic(path, synthetic_mosaic(tuple(args.shape), seed=11,
                                               params=SynthParams(nio_fraction=0.3)),
                        overwrite=True)
    # 2. segment it with the bundled model on a local Dask cluster (dashboard on 127.0.0.1)
    with connect(n_workers=args.workers, dashboard_address="127.0.0.1:0") as client:
        print(f"dashboard: {client.dashboard_link}")
        result = segment(path, client=client, confidence=True, overwrite=True)
    print(f"segmented {result.shape} in {result.seconds:.1f} s ({result.mpix_per_s:.2f} MPix/s)")
    # 3. phase fractions from pooled counts, against the truth
    print(mosaic_fractions(path).table(mosaic_fractions(path, labels="truth")))
    pred, truth = sio.open_labels(path, "phases"), sio.open_labels(path, "truth")
    scores = scores_from_confusion(confusion_matrix(pred.data, truth.data, 4).compute(),
                                   pred.classes)
    print(f"accuracy {scores['accuracy']:.4f}, mIoU {scores['miou']:.4f}")
    # 4. an overlay preview at a coarse pyramid level
    print(f"preview: {preview(path, args.out / 'preview.png')}")


if __name__ == "__main__":
    main()
