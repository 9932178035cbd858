"""Whole-chunk kernel: core pixels per CPU-second by sub-tile edge, and exactness (issue 13).

For one block of the bundled U-Net (``--core`` px + the plan's halo on every side) this
prints, for each sub-tile edge, the CPU seconds of one forward (one torch thread,
``time.process_time``: robust on a shared machine), the core MPix per CPU-second and the
largest logit difference / label agreement with one untiled forward of the block.
``0`` is the whole block through the cropped, fused kernel; ``plain`` is ``model(x)``.

    python benchmarks/subtiles.py --core 1536 --tiles 0 256 512 768 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from semdask.inference.tiled import tiled_forward
from semdask.inference.windows import receptive_field_halo
from semdask.nets.model import bundled_model_path, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--core", type=int, default=1536)
    ap.add_argument("--tiles", nargs="+", type=int, default=[0, 256, 512, 768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load_model(bundled_model_path())
    model = model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    h, c = receptive_field_halo(cfg.receptive_field), args.core
    x = torch.rand(1, 1, c + 2 * h, c + 2 * h).contiguous(memory_format=torch.channels_last)
    core = (h, h + c, h, h + c)
    runs: dict[str, list[float]] = {}
    with torch.inference_mode():
        ref = model(x)[..., h: h + c, h: h + c]
        for t in args.tiles:
            out = tiled_forward(model, x, core=core, halo=h, tile=t or None)
            agree = 100 * float((out.argmax(1) == ref.argmax(1)).float().mean())
            print(f"tile {t or 'whole':>5}: max |logit diff| {float((out - ref).abs().max()):.1e}"
                  f", labels {agree:.4f} % equal to the untiled forward")
        for _ in range(args.repeats):  # interleaved
            for t in args.tiles:
                c0 = time.process_time()
                tiled_forward(model, x, core=core, halo=h, tile=t or None)
                runs.setdefault(str(t or "whole"), []).append(time.process_time() - c0)
            c0 = time.process_time()
            model(x)
            runs.setdefault("plain", []).append(time.process_time() - c0)
    print(f"block {c} + 2 x {h} px, {args.threads} torch thread(s)")
    for name, v in runs.items():
        med = statistics.median(v)
        print(f"{name:>6}: {med:6.2f} CPU-s (min {min(v):.2f}, max {max(v):.2f})  "
              f"{c * c / med / 1e6:.3f} core MPix per CPU-s")


if __name__ == "__main__":
    main()
