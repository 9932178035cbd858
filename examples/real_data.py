"""Real SEM data, end to end: convert, train from scratch, segment, evaluate on the test split.

    python examples/real_data.py --dataset nasa_super --config Super1 --out runs/super1
    python examples/real_data.py --dataset nasa_ebc --config EBC1 --out runs/ebc1 --window 256
    python examples/real_data.py --quick --data-root tests/data --out /tmp/rd   # CI: seconds

Uses the NASA benchmark sets normalised in ``../shared/data`` (``<dataset>/images/<id>.png``
grey SEM, ``labels/<id>.png`` class indices, 255 = ignore, ``meta.json`` with the classes and
the published splits; see that folder's README). Falls back to ``tests/data`` (three Super
images) when the dataset is not there.

Every step is a ``semdask`` command run in this process and printed as a shell line, so the
run can be repeated from a terminal:

1. ``semdask convert`` the split's images with their label images -> one store per image,
   ``labels/truth`` with the dataset's class names;
2. ``semdask train`` from scratch on the train stores with the package's default recipe,
   validating on the val stores (``--split stores``) when the installed version can;
   only data-specific things are given (stores, labels, window, epochs);
3. ``semdask segment`` every test store with the best model (``labels/pred``);
4. pooled test scores over all test images (one confusion matrix of all their pixels,
   255 = ignore skipped): per-class IoU and Dice, mIoU (rare classes included), accuracy.

Prints a results table and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def semdask(args: list[str]) -> float:
    """Run one ``semdask`` command in this process; print it as a shell line; seconds taken."""
    from semdask.cli.main import main

    print("$ semdask " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    try:
        main.main(args=args, prog_name="semdask", standalone_mode=False)
    except SystemExit as e:  # the CLI's error handler exits with a status
        if e.code not in (0, None):
            raise
    return time.perf_counter() - t0


def find_dataset(dataset: str, root: Path | None) -> Path:
    """``<root>/<dataset>``: the given root, else ../shared/data, else tests/data."""
    roots = [root] if root is not None else [REPO.parent / "shared" / "data",
                                             REPO / "tests" / "data"]
    for r in roots:
        if (r / dataset / "meta.json").is_file():
            return (r / dataset).resolve()
    sys.exit(f"no {dataset}/meta.json under {', '.join(map(str, roots))}: pass --data-root")


def split_ids(meta: dict[str, Any], config: str, data: Path) -> tuple[dict[str, list[str]], str]:
    """Train/val/test ids of ``config`` (or of the ``splits`` of a test copy), present on disk."""
    cfg = (meta.get("paper_configs") or {}).get(config)
    used = config
    if cfg is None:
        if "splits" not in meta:
            sys.exit(f"{config} is not among {sorted(meta.get('paper_configs', {}))}")
        cfg, used = meta["splits"], "splits (test copy)"
    ids = {s: [i for i in cfg.get(s, []) if (data / "images" / f"{i}.png").is_file()]
           for s in ("train", "val", "test")}
    if not ids["train"] or not ids["test"]:
        sys.exit(f"{used}: no train or no test images found in {data / 'images'}")
    return ids, used


def train_options() -> set[str]:
    """Option names the installed ``semdask train`` accepts."""
    from semdask.cli.main import main

    return {o for p in main.commands["train"].params for o in p.opts}


def pooled_scores(stores: list[Path], classes: list[str]) -> dict[str, Any]:
    """Per-class IoU/Dice, mIoU and accuracy from one confusion matrix over all test stores.

    ``semdask.analysis.evaluate.evaluate_pairs`` (pooled counts, boundary F1, per-image rows) when
    installed, else the pooled confusion matrix of ``semdask.metrics``.
    """
    from semdask.analysis.metrics import class_scores, confusion_matrix
    from semdask.storage.io import open_labels

    n = len(classes)
    extra: dict[str, Any] = {}
    try:
        from semdask.analysis.evaluate import LabelPair, evaluate_pairs
    except ImportError:
        cm = np.zeros((n, n), np.int64)
        for s in stores:
            cm += np.asarray(confusion_matrix(open_labels(s, "pred").data,
                                              open_labels(s, "truth").data, n).compute())
    else:
        pairs = [LabelPair(s.name.removesuffix(".ome.zarr"), open_labels(s, "pred").data,
                           open_labels(s, "truth").data) for s in stores]
        ev = evaluate_pairs(pairs, classes=classes, overlay=False)
        cm = np.asarray(ev.pooled.confusion, np.int64)
        d = ev.to_dict()
        extra = {"boundary_f1": d["pooled"].get("boundary_f1"), "tolerance_px": ev.tolerance,
                 "images": {r["name"]: {"accuracy": r.get("accuracy"), "miou": r.get("miou")}
                            for r in d["images"]}}
    per = class_scores(cm)
    support, total = cm.sum(1), max(int(cm.sum()), 1)
    iou = per["iou"]
    return {"accuracy": float(np.trace(cm) / total), "miou": float(np.nanmean(iou)),
            "pixels": int(cm.sum()),
            "classes": {c: {"iou": float(iou[i]), "dice": float(per["dice"][i]),
                            "share": float(support[i] / total)} for i, c in enumerate(classes)},
            "confusion": cm.tolist(), **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["nasa_super", "nasa_ebc"], default="nasa_super")
    ap.add_argument("--config", default=None, help="Published split [Super1 / EBC1].")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="Folder holding <dataset>/ [../shared/data, else tests/data].")
    ap.add_argument("--out", type=Path, default=Path("real-data-output"))
    ap.add_argument("--epochs", type=int, default=None, help="[package default; quick: 1]")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="[package default]")
    ap.add_argument("--window", type=int, default=None,
                    help="Training window edge [256; quick: 128].")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=None,
                    help="Train at this share of the images' sampling (semdask train --scale; "
                    "0.5: twice the context per window); segment applies it to the test images.")
    ap.add_argument("--train-args", default="", metavar="ARGS",
                    help="More semdask train options, quoted (e.g. '--class-weights auto').")
    ap.add_argument("--quick", action="store_true", help="A few steps only (CI smoke run).")
    args = ap.parse_args(argv)
    config = args.config or {"nasa_super": "Super1", "nasa_ebc": "EBC1"}[args.dataset]
    data = find_dataset(args.dataset, args.data_root)
    meta = json.loads((data / "meta.json").read_text())
    ids, used = split_ids(meta, config, data)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.dataset} {used} from {data}: "
          + ", ".join(f"{len(v)} {k}" for k, v in ids.items()), flush=True)
    timings: dict[str, float] = {}
    commands: list[list[str]] = []

    def run(name: str, cmd: list[str]) -> None:
        commands.append(cmd)
        timings[name] = timings.get(name, 0.0) + semdask(cmd)

    # 1. convert every split's images with their labels
    stores: dict[str, list[Path]] = {}
    for split, names in ids.items():
        if not names:
            continue
        folder = out / "stores" / split  # one image: the store path itself
        target = folder / f"{names[0]}.ome.zarr" if len(names) == 1 else folder
        run("convert", ["convert", *[str(data / "images" / f"{i}.png") for i in names],
                        str(target), "--labels", str(data / "labels"),
                        "--classes-from", str(data / "meta.json"), "--overwrite"])
        stores[split] = [folder / f"{i}.ome.zarr" for i in names]

    # 2. train from scratch: package defaults + the data-specific options
    model = out / "model.safetensors"
    have = train_options()
    cmd = ["-v", "train", *map(str, stores["train"]), "--out", str(model), "--labels", "truth",
           "--window", str(args.window or (128 if args.quick else 256)), "--seed", str(args.seed)]
    if stores.get("val") and "--val-store" in have:
        cmd[2:2] = list(map(str, stores["val"]))
        cmd += ["--split", "stores"] if "--split" in have else []
        for v in stores["val"]:
            cmd += ["--val-store", str(v)]
    elif stores.get("val"):
        print("note: this semdask train has no --val-store: validating on a band of the "
              "train stores", flush=True)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else None)
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    steps = args.steps_per_epoch if args.steps_per_epoch is not None else (
        2 if args.quick else None)
    if steps is not None:
        cmd += ["--steps-per-epoch", str(steps)]
    if args.quick:
        cmd += ["--batch-size", "2"]
    if args.scale is not None:
        cmd += ["--scale", str(args.scale)]
    cmd += shlex.split(args.train_args)
    run("train", cmd)

    # 3. segment the test stores with the best model
    for s in stores["test"]:
        run("segment", ["segment", str(s), "--model", str(model), "--name", "pred",
                        "--no-cluster", "--overwrite"])

    # 4. pooled test scores
    t0 = time.perf_counter()
    classes = list(meta["classes"])
    scores = pooled_scores(stores["test"], classes)
    timings["evaluate"] = time.perf_counter() - t0
    history = []
    metrics_csv = model.with_name(model.stem + ".metrics.csv")
    if metrics_csv.is_file():
        with open(metrics_csv, newline="") as f:
            history = list(csv.DictReader(f))
    result = {"dataset": args.dataset, "config": used, "data": str(data), "ids": ids,
              "quick": args.quick, "model": str(model), "test": scores,
              "train_history": history, "seconds": {k: round(v, 1) for k, v in timings.items()},
              "commands": ["semdask " + " ".join(shlex.quote(a) for a in c) for c in commands]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\ntest split of {args.dataset} {used}: {len(ids['test'])} images, "
          f"{scores['pixels']} labelled pixels (pooled)")
    print(f"{'class':<32}{'IoU':>8}{'Dice':>8}{'share':>8}")
    for c, v in scores["classes"].items():
        print(f"{c:<32}{v['iou']:8.4f}{v['dice']:8.4f}{v['share']:8.3f}")
    print(f"{'mIoU':<32}{scores['miou']:8.4f}\n{'accuracy':<32}{scores['accuracy']:8.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
