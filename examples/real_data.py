"""Real SEM data, end to end: convert, train from scratch, segment, evaluate on the test split.

    python examples/real_data.py --config Super1 --budget 30m --out runs/super1
    python examples/real_data.py --config all --budget 30m --seeds 0 1 --out runs/all \
        --results-md docs/RESULTS.md          # the seven configs, two seeds, the table
    python examples/real_data.py --config all --seeds 0 1 --out runs/all --reuse  # resume
    python examples/real_data.py --out runs/all --collect --results-md docs/RESULTS.md
    python examples/real_data.py --out runs/all --rescore --tta   # + segment --tta scores
    python examples/real_data.py --quick --data-root tests/data --out /tmp/rd   # CI: seconds

Uses the NASA benchmark sets normalised in ``../shared/data`` (``<dataset>/images/<id>.png``
grey SEM, ``labels/<id>.png`` class indices, 255 = ignore, ``meta.json`` with the classes and
the published splits; see that folder's README). Falls back to ``tests/data`` (three Super
images) when the dataset is not there.

Every step is a ``semdask`` command run in this process and printed as a shell line, so the
run can be repeated from a terminal:

1. ``semdask convert`` the split's images with their label images -> one store per image,
   ``labels/truth`` with the dataset's class names;
2. ``semdask train`` from scratch on the train stores with the package's default recipe
   (planned from the data; ``--budget`` fits its schedule), validating on the val stores
   (``--split stores``); only data-specific things are given (stores, labels, budget);
3. ``semdask segment`` every test store with the best model (``labels/pred``);
4. pooled test scores over all test images (one confusion matrix of all their pixels,
   255 = ignore skipped): per-class IoU and Dice, mIoU (rare classes included), accuracy.

Prints a results table and writes ``OUT/results.json`` (several configs, ``--seeds`` or
``--reuse``: ``OUT/<config>-s<seed>/results.json`` and ``OUT/summary.json``); ``--results-md FILE``
writes the table (per-class IoU, mIoU, accuracy, budget, wall time, spread over seeds)
between the ``real-data-table`` markers of FILE. ``--reuse`` keeps the finished runs of an
earlier (interrupted) call with the same budget; ``--collect`` only tabulates every finished
run under ``--out`` (of the ``--config`` names, when given); ``--rescore [--tta]`` segments
their test stores again (with test-time flips: a table column of its own) without training.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
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


def pooled_scores(stores: list[Path], classes: list[str], pred: str = "pred") -> dict[str, Any]:
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
            cm += np.asarray(confusion_matrix(open_labels(s, pred).data,
                                              open_labels(s, "truth").data, n).compute())
    else:
        pairs = [LabelPair(s.name.removesuffix(".ome.zarr"), open_labels(s, pred).data,
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


CONFIGS = {"Super1": "nasa_super", "Super2": "nasa_super", "Super3": "nasa_super",
           "Super4": "nasa_super", "EBC1": "nasa_ebc", "EBC2": "nasa_ebc", "EBC3": "nasa_ebc"}
_START, _END = "<!-- real-data-table:start -->", "<!-- real-data-table:end -->"


def run_one(dataset: str, config: str, seed: int, args: argparse.Namespace,
            out: Path) -> dict[str, Any]:
    """Convert, train, segment and score one published split with one seed."""
    data = find_dataset(dataset, args.data_root)
    meta = json.loads((data / "meta.json").read_text())
    ids, used = split_ids(meta, config, data)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{dataset} {used} seed {seed} from {data}: "
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

    # 2. train from scratch: the package's planned recipe + the data-specific options
    model = out / "model.safetensors"
    cmd = ["-v", "train", *map(str, stores["train"]), "--out", str(model), "--labels", "truth",
           "--seed", str(seed)]
    for v in stores.get("val", []):
        cmd += ["--val-store", str(v)]
    window = args.window or (128 if args.quick else None)
    cmd += ["--window", str(window)] if window else []
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else None)
    cmd += ["--epochs", str(epochs)] if epochs is not None else []
    steps = args.steps_per_epoch if args.steps_per_epoch is not None else (
        2 if args.quick else None)
    cmd += ["--steps-per-epoch", str(steps)] if steps is not None else []
    cmd += ["--batch-size", "2"] if args.quick else []
    cmd += ["--budget", args.budget] if args.budget else []
    cmd += ["--scale", str(args.scale)] if args.scale is not None else []
    cmd += shlex.split(args.train_args)
    run("train", cmd)

    # 3. segment the test stores with the best model
    for s in stores["test"]:
        run("segment", segment_args(s, model, "pred", args.tta))

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
    plan_yaml = model.with_name(model.stem + ".train.yaml")
    result = {"dataset": dataset, "config": used, "seed": seed, "data": str(data), "ids": ids,
              "quick": args.quick, "budget": args.budget, "model": str(model), "test": scores,
              "plan": plan_yaml.read_text() if plan_yaml.is_file() else None,
              "train_history": history, "seconds": {k: round(v, 1) for k, v in timings.items()},
              "commands": ["semdask " + " ".join(shlex.quote(a) for a in c) for c in commands]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\ntest split of {dataset} {used}, seed {seed}: {len(ids['test'])} images, "
          f"{scores['pixels']} labelled pixels (pooled)")
    print(f"{'class':<32}{'IoU':>8}{'Dice':>8}{'share':>8}")
    for c, v in scores["classes"].items():
        print(f"{c:<32}{v['iou']:8.4f}{v['dice']:8.4f}{v['share']:8.3f}")
    print(f"{'mIoU':<32}{scores['miou']:8.4f}\n{'accuracy':<32}{scores['accuracy']:8.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"results: {out / 'results.json'}", flush=True)
    return result


def _reused(out: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The finished run in ``out`` when ``--reuse`` is given and its budget is the same."""
    f = out / "results.json"
    if not (args.reuse and f.is_file()):
        return None
    r: dict[str, Any] = json.loads(f.read_text())
    if r.get("budget") != args.budget or bool(r.get("quick")) != args.quick:
        return None
    print(f"reusing {f} ({r['config']} seed {r['seed']}: test mIoU {r['test']['miou']:.4f})")
    return r


def collect(out: Path, configs: list[str] | None) -> list[dict[str, Any]]:
    """Every finished run under ``out`` (``results.json``), in config then seed order."""
    found = [json.loads(f.read_text()) for f in sorted(out.glob("*/results.json"))]
    runs = [r for r in found if configs is None or r["config"] in configs]
    if not runs:
        raise SystemExit(f"--collect: no results.json under {out}/*/"
                         + (f" for {', '.join(configs)}" if configs else ""))
    order = {c: i for i, c in enumerate(CONFIGS)}
    return sorted(runs, key=lambda r: (order.get(r["config"], 99), r["seed"]))


def segment_args(store: Path, model: Path, name: str, tta: bool) -> list[str]:
    """``semdask segment`` of one test store into ``labels/<name>`` (in this process)."""
    return ["segment", str(store), "--model", str(model), "--name", name, "--no-cluster",
            "--overwrite", *(["--tta"] if tta else [])]


def rescore(run: dict[str, Any], tta: bool) -> dict[str, Any]:
    """Segment the test stores of a finished run again and score them (no training).

    With ``tta`` (``segment --tta``) the scores go to ``test_tta`` (labels ``pred-tta``),
    else they replace ``test``; ``results.json`` is rewritten.
    """
    model = Path(run["model"])
    folder = model.parent / "stores" / "test"
    stores = [folder / f"{i}.ome.zarr" for i in run["ids"]["test"]]
    name, key = ("pred-tta", "test_tta") if tta else ("pred", "test")
    t0 = time.perf_counter()
    for s in stores:
        semdask(segment_args(s, model, name, tta))
    run[key] = pooled_scores(stores, list(run["test"]["classes"]), name)
    run["seconds"][f"segment{'_tta' if tta else ''}"] = round(time.perf_counter() - t0, 1)
    (model.parent / "results.json").write_text(json.dumps(run, indent=1))
    print(f"{run['config']} seed {run['seed']}: test mIoU {run[key]['miou']:.4f}"
          f"{' with --tta' if tta else ''}", flush=True)
    return run


def show_plan(dataset: str, config: str, args: argparse.Namespace, out: Path) -> None:
    """Convert the train split of ``config`` and print the recipe ``semdask train`` plans."""
    from semdask.training.config import TrainConfig
    from semdask.training.planning import fingerprint, plan, plan_table

    data = find_dataset(dataset, args.data_root)
    ids, used = split_ids(json.loads((data / "meta.json").read_text()), config, data)
    names, folder = ids["train"], out / "stores" / "train"
    semdask(["convert", *[str(data / "images" / f"{i}.png") for i in names],
             str(folder / f"{names[0]}.ome.zarr" if len(names) == 1 else folder),
             "--labels", str(data / "labels"), "--classes-from", str(data / "meta.json"),
             "--overwrite"])
    overrides = {"budget": args.budget} if args.budget else {}
    fp = fingerprint([folder / f"{i}.ome.zarr" for i in names])
    cfg, why = plan(fp, TrainConfig.from_kwargs(**overrides))
    print(f"== {dataset} {used}\n{plan_table(cfg, why, fp)}", flush=True)


def _spread(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per config (mean ± sd over seeds), per-class IoU."""
    tta = any("test_tta" in r for r in results)  # rescored with segment --tta
    rows = ["| config | seeds | budget | IoU per class (mean ± sd) | mIoU | accuracy | "
            "training wall |" + (" mIoU, segment --tta |" if tta else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if tta else "")]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    for config, rs in by.items():
        classes = list(rs[0]["test"]["classes"])
        per = ", ".join(f"{c} {_spread([r['test']['classes'][c]['iou'] for r in rs])}"
                        for c in classes)
        wall = [r["seconds"].get("train", 0.0) for r in rs]
        rows.append(f"| {config} | {', '.join(str(r['seed']) for r in rs)} | "
                    f"{rs[0]['budget'] or 'default'} | {per} | "
                    f"**{_spread([r['test']['miou'] for r in rs])}** | "
                    f"{_spread([100 * r['test']['accuracy'] for r in rs], 1)} % | "
                    f"{statistics.fmean(wall):.0f} s |")
        if tta:
            with_tta = [r["test_tta"]["miou"] for r in rs if "test_tta" in r]
            rows[-1] += f" {_spread(with_tta) if with_tta else '-'} |"
    return "\n".join(rows)


def write_markdown(path: Path, table: str, command: str) -> None:
    """Put ``table`` between the real-data-table markers of ``path`` (appended if absent)."""
    block = f"{_START}\n`{command}`\n\n{table}\n{_END}"
    text = path.read_text() if path.is_file() else ""
    if _START in text and _END in text:
        text = text[:text.index(_START)] + block + text[text.index(_END) + len(_END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["nasa_super", "nasa_ebc"], default=None,
                    help="[from --config; nasa_super]")
    ap.add_argument("--config", default=None, nargs="+", metavar="NAME",
                    help=f"Published split(s): {', '.join(CONFIGS)} or all [Super1 / EBC1].")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="Folder holding <dataset>/ [../shared/data, else tests/data].")
    ap.add_argument("--out", type=Path, default=Path("real-data-output"))
    ap.add_argument("--budget", default=None,
                    help="semdask train --budget (30m, 2000steps) [package default].")
    ap.add_argument("--epochs", type=int, default=None, help="[planned; quick: 1]")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="[planned]")
    ap.add_argument("--window", type=int, default=None,
                    help="Training window edge [planned; quick: 128].")
    ap.add_argument("--seed", type=int, default=None, help="One seed [0].")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="Several seeds.")
    ap.add_argument("--scale", type=float, default=None,
                    help="Train at this share of the images' sampling [planned].")
    ap.add_argument("--tta", action="store_true", help="segment --tta (flips and rotations).")
    ap.add_argument("--train-args", default="", metavar="ARGS",
                    help="More semdask train options, quoted (e.g. --train-args='--no-plan').")
    ap.add_argument("--results-md", type=Path, default=None, metavar="FILE",
                    help="Write the summary table into FILE (e.g. docs/RESULTS.md).")
    ap.add_argument("--quick", action="store_true", help="A few steps only (CI smoke run).")
    ap.add_argument("--reuse", action="store_true",
                    help="Keep runs already finished under --out with the same budget.")
    ap.add_argument("--collect", action="store_true",
                    help="Run nothing: tabulate the finished runs under --out.")
    ap.add_argument("--rescore", action="store_true",
                    help="Train nothing: segment the test stores of the finished runs under "
                    "--out again and score them (with --tta: an extra column).")
    ap.add_argument("--plan-only", action="store_true",
                    help="Only print the planned recipe of each config's train split.")
    args = ap.parse_args(argv)
    names = args.config or [{"nasa_super": "Super1", "nasa_ebc": "EBC1"}[
        args.dataset or "nasa_super"]]
    if names == ["all"]:
        names = list(CONFIGS)
    seeds = args.seeds or [args.seed or 0]
    jobs = [(args.dataset or CONFIGS.get(c, "nasa_super"), c, s) for c in names for s in seeds]
    out = args.out.resolve()
    if args.plan_only:
        for d, c in dict.fromkeys((d, c) for d, c, _ in jobs):
            show_plan(d, c, args, out / c)
        return 0
    if args.collect or args.rescore:
        results = collect(out, None if args.config in (None, ["all"]) else args.config)
        results = [rescore(r, args.tta) for r in results] if args.rescore else results
    else:
        nested = len(jobs) > 1 or args.seeds is not None or args.reuse
        results = [_reused(where, args) or run_one(d, c, s, args, where)
                   for d, c, s in jobs for where in [out / f"{c}-s{s}" if nested else out]]
    table = summary_table(results)
    print("\n" + table)
    if len(results) > 1:
        (out / "summary.json").write_text(json.dumps(
            {"table": table, "runs": [{k: r[k] for k in ("dataset", "config", "seed", "test",
                                                          "seconds", "budget")}
                                      for r in results]}, indent=1))
    if args.results_md is not None:
        write_markdown(args.results_md, table, "python examples/real_data.py "
                       + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
