"""Does self-supervised pretraining help? NASA splits, from scratch vs pretrained, same budget.

    python examples/pretraining_study.py --config Super3 --seeds 0 1 --window 128 \
        --epochs 4 --steps-per-epoch 15 --pretrain-budget 80steps \
        --pretrain-args="--batch-size 4" --train-args="--batch-size 4" --out runs/pretrain

For every config: ``semdask pretrain`` on the *unlabelled images of the config's
train + val split* (the test images are never seen), then, per seed, two runs of
``examples/real_data.py``'s pipeline with the same seed, window, epochs and steps:
``scratch`` (random initialisation) and ``pretrained`` (``train --encoder-weights``).
Both are scored on the official test split (pooled confusion matrix). Prints a table
of per-class IoU and mIoU (mean and spread over seeds, from every finished run under
OUT) and writes ``OUT/<config>/summary.json``. ``--arms`` lets two processes share the
work (e.g. ``--arms scratch`` beside ``--arms pretrained``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_data  # the sibling example: convert, train, segment, score

ARMS = ("scratch", "pretrained")


def _row(name: str, runs: list[dict[str, Any]]) -> str:
    def cell(vals: list[float]) -> str:
        m = statistics.fmean(vals)
        return f"{m:.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    classes = list(runs[0]["test"]["classes"])
    ious = [cell([r["test"]["classes"][c]["iou"] for r in runs]) for c in classes]
    return (f"| {name} | " + " | ".join(ious) + f" | {cell([r['test']['miou'] for r in runs])}"
            f" | {cell([r['test']['accuracy'] for r in runs])} |")


def _unlabelled(dataset: str, config: str, data_root: Path | None, out: Path) -> list[Path]:
    """The config's train + val images as image-only stores (no labels group)."""
    data = real_data.find_dataset(dataset, data_root)
    ids, _ = real_data.split_ids(json.loads((data / "meta.json").read_text()), config, data)
    names = ids["train"] + ids["val"]
    real_data.semdask(["convert", *[str(data / "images" / f"{i}.png") for i in names],
                       str(out), "--overwrite"])
    return [out / f"{i}.ome.zarr" for i in names] if len(names) > 1 else [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["Super3"], metavar="NAME")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("pretraining-study"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                    help="Which arms this process runs (two processes can share an --out).")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps-per-epoch", type=int, default=15)
    ap.add_argument("--pretrain-budget", default="80steps")
    ap.add_argument("--pretrain-args", default="", metavar="ARGS",
                    help="More semdask pretrain options, quoted.")
    ap.add_argument("--train-args", default="", metavar="ARGS",
                    help="More semdask train options for both arms, quoted.")
    args = ap.parse_args(argv)
    base = argparse.Namespace(data_root=args.data_root, window=args.window, epochs=args.epochs,
                              steps_per_epoch=args.steps_per_epoch, budget=None, scale=None,
                              tta=False, quick=False, train_args=args.train_args)
    for config in args.config:
        dataset = real_data.CONFIGS.get(config, "nasa_super")
        out = args.out.resolve() / config
        encoder = out / "encoder.safetensors"
        if "pretrained" in args.arms and not encoder.exists():  # never the test images
            unlabelled = _unlabelled(dataset, config, args.data_root, out / "unlabelled")
            real_data.semdask(["-v", "pretrain", *map(str, unlabelled), "--out", str(encoder),
                               "--window", str(args.window), "--budget", args.pretrain_budget,
                               "--seed", "0", *shlex.split(args.pretrain_args)])
        for arm in args.arms:
            opts = copy.copy(base)
            if arm == "pretrained":
                opts.train_args += f" --encoder-weights {shlex.quote(str(encoder))}"
            for seed in args.seeds:
                real_data.run_one(dataset, config, seed, opts, out / f"{arm}-s{seed}")
        done = {a: [json.loads(f.read_text()) for f in sorted(out.glob(f"{a}-s*/results.json"))]
                for a in ARMS}  # every finished run of either arm (any process, any seed)
        if not all(done.values()):
            continue
        classes = list(done["scratch"][0]["test"]["classes"])
        table = "\n".join([f"| {config} | " + " | ".join(classes) + " | mIoU | accuracy |",
                           "|---" * (len(classes) + 3) + "|",
                           _row("from scratch", done["scratch"]),
                           _row("pretrained", done["pretrained"])])
        print("\n" + table)
        (out / "summary.json").write_text(json.dumps(
            {"table": table, "pretrain": yaml.safe_load(encoder.with_suffix(".yaml").read_text()),
             "command": "python examples/pretraining_study.py "
                        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
             "runs": {a: [{k: r[k] for k in ("seed", "test", "seconds")} for r in v]
                      for a, v in done.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
