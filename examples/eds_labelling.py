"""EDS-guided labelling on a synthetic mosaic: accuracy against the truth vs scribble count.

The paper made its U-Net training labels with Ilastik from SEM + EDS maps and a few hand
scribbles. This example does that step with ``semdask.label`` on a synthetic SOC mosaic
(which knows its truth and its true EDS misregistration):

1. one full ``label()`` run (register EDS, features, random forest, write
   ``labels/eds-rf`` + ``eds-rf-confidence``), timed, extrapolated to a gigapixel;
2. a sweep: scribbles per class x (SEM + EDS, SEM only), accuracy and mIoU against
   ``labels/truth``; features are built once (lazily) and each classifier predicts them all.

Writes ``eds_labelling.csv`` and ``eds_labelling.png`` (accuracy vs scribbles) into --out.

    python examples/eds_labelling.py --out eds-demo --shape 2048 2048 --counts 5 20 100 500
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import dask
import numpy as np

from semdask.analysis.metrics import confusion_matrix, scores_from_confusion
from semdask.labelling.annotations import read_annotations, synthetic_scribbles
from semdask.labelling.label import (
    build_features,
    fit_classifier,
    label,
    predict_probs,
    training_pixels,
)
from semdask.storage import io
from semdask.synthetic.sem import PHASES, synthetic_mosaic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("eds-labelling-output"))
    ap.add_argument("--shape", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    ap.add_argument("--counts", type=int, nargs="+", default=[5, 20, 100],
                    help="scribbles per class to sweep")
    ap.add_argument("--trees", type=int, default=50, help="random-forest trees")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="threads of the dask scheduler")
    a = ap.parse_args()
    dask.config.set(scheduler="threads", num_workers=a.workers)
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "eds.ome.zarr"
    H, W = a.shape

    print(f"synthesising a {H} x {W} mosaic (image, labels/truth, eds at 1/4) -> {store}")
    io.write_synthetic(store, synthetic_mosaic((H, W), seed=a.seed), overwrite=True)
    truth = io.open_labels(store, "truth").data
    truth_np = truth.compute()

    def score(pred: object) -> dict:
        return scores_from_confusion(confusion_matrix(pred, truth, len(PHASES)).compute(),
                                     PHASES)

    # 1. one full run through the public entry point, timed
    n_full = max(a.counts)
    scrib = synthetic_scribbles(truth_np, n_full, seed=a.seed)
    io.write_labels(store, scrib, name="scribbles", classes=["unlabelled", *PHASES],
                    overwrite=True)
    r = label(store, "labels/scribbles", name="eds-rf", n_estimators=a.trees, overwrite=True,
              seed=a.seed)
    s = score(io.open_labels(store, "eds-rf").data)
    true = np.multiply(r.true_shift_px or (np.nan, np.nan), 4)
    assert r.shift is not None
    print(f"EDS shift (dy, dx): estimated {r.shift.mean[0]:+.2f}, {r.shift.mean[1]:+.2f} SEM px,"
          f" true {true[0]:+.2f}, {true[1]:+.2f}")
    print(f"label(): {n_full} scribbles/class, accuracy {s['accuracy']:.4f}, mIoU "
          f"{s['miou']:.4f}; {r.seconds['total']:.1f} s (register {r.seconds['register']:.1f}, "
          f"fit {r.seconds['fit']:.1f}, predict+write {r.seconds['predict']:.1f}) for "
          f"{H * W / 1e6:.2f} MPix; register + predict + write extrapolated: "
          f"{r.s_per_gpix / 3600:.2f} h per gigapixel ({a.workers} threads) + the fit")

    # 2. the sweep: features once per EDS setting, one forest per scribble count
    rows = []
    for use_eds in (True, False):
        fs = build_features(store, eds="store" if use_eds else None)
        for n in a.counts:
            ann = read_annotations(synthetic_scribbles(truth_np, n, seed=a.seed), (H, W),
                                   fs.chunks, classes=PHASES)
            t0 = time.perf_counter()
            X, y = training_pixels(fs.data, ann, len(PHASES), seed=a.seed)
            clf = fit_classifier(X, y, n_estimators=a.trees, seed=a.seed)
            t1 = time.perf_counter()
            pred = predict_probs(fs.data, clf, len(PHASES)).argmax(axis=0)
            s = score(pred)
            rows.append({"scribbles_per_class": n, "eds": use_eds, "train_pixels": len(y),
                         "accuracy": round(s["accuracy"], 4), "miou": round(s["miou"], 4),
                         **{f"iou_{k}": round(v, 4) for k, v in s["iou"].items()},
                         "fit_s": round(t1 - t0, 1),
                         "predict_s": round(time.perf_counter() - t1, 1)})
            print(f"  {'SEM+EDS' if use_eds else 'SEM    '} {n:>4} scribbles/class "
                  f"({len(y):>6} px): accuracy {s['accuracy']:.4f}, mIoU {s['miou']:.4f}")

    csv_path = a.out / "eds_labelling.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = a.out / "eds_labelling.png"
    plot(rows, png, f"synthetic {H} x {W}, {a.trees} trees")
    print(f"wrote {csv_path} and {png}")
    gain = [x["accuracy"] - y["accuracy"] for x in rows if x["eds"] for y in rows
            if not y["eds"] and y["scribbles_per_class"] == x["scribbles_per_class"]]
    print(f"EDS gain in accuracy: {', '.join(f'{100 * g:+.1f}' for g in gain)} pp")


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for eds, colour in ((True, "tab:green"), (False, "tab:grey")):
        sel = [r for r in rows if r["eds"] == eds]
        n = [r["scribbles_per_class"] for r in sel]
        tag = "SEM + EDS" if eds else "SEM only"
        ax.plot(n, [100 * r["accuracy"] for r in sel], "o-", color=colour,
                label=f"{tag}: accuracy")
        ax.plot(n, [100 * r["miou"] for r in sel], "s--", color=colour, label=f"{tag}: mIoU")
    ax.set_xscale("log")
    ax.set_xlabel("scribbles per class")
    ax.set_ylabel("% against the truth")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
