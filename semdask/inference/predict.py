"""Kernels: predict one block (pure numpy in, numpy out; torch inside, no dask, no files).

Two kernels share one contract: a normalised float32 block (chunk + halo) goes
in, blended class probabilities for the chunk's *core* come out, shape
``(n_classes, core_h, core_w)``.

* :func:`predict_windows` evaluates every window of the global grid that
  intersects the core (origins at multiples of the stride, in global
  coordinates) and accumulates ``sum(w * softmax)`` and ``sum(w)`` in raster
  order of the window origins, so each pixel gets the same windows, added in
  the same order, whatever the chunking: the result is bitwise reproducible
  (batch size 1 on CPU).
* :func:`predict_whole` runs the fully convolutional network on the whole block
  at once; with a halo covering the receptive field its core matches an untiled
  whole-image forward.

Examples
--------
An identity "model" (log-probabilities = one-hot of a fixed class) reproduces its input:

>>> import numpy as np, torch
>>> class OneHot(torch.nn.Module):
...     def forward(self, x):
...         return torch.cat([x, 1 - x], dim=1) * 50.0
>>> block = np.zeros((40, 40), np.float32); block[:, 20:] = 1.0
>>> from semdask.inference.windows import blend_weights
>>> p = predict_windows(block, OneHot(), origin=(0, 0), core=(8, 32, 8, 32), window=16,
...                     stride=8, weights=blend_weights(16))
>>> p.shape, bool((p.argmax(0)[:, 12:] == 0).all()), bool((p.argmax(0)[:, :12] == 1).all())
((2, 24, 24), True, True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from semdask.errors import InputError
from semdask.inference.windows import window_origins
from semdask.nets.runtime import autocast

__all__ = ["CPU_TILE", "blend_windows", "predict_whole", "predict_windows"]

log = logging.getLogger(__name__)

#: Default sub-tile core edge of :func:`predict_whole` on CPU (px; 0 or None: whole block).
#: Measured on 2 cores (docs/PERFORMANCE.md): 512 + 2 x 112 px sub-tiles were the fastest
#: per core pixel; whole 1760-px blocks spill the caches and ran 1.3-1.4x slower.
CPU_TILE = 512

def _forward(model: torch.nn.Module, x: np.ndarray, device: torch.device, precision: str,
             channels_last: bool, activation: str = "softmax",
             labels: bool = False,
             run: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Probabilities of a batch ``(b, h, w)`` -> float32 ``(b, C, h, w)``.

    ``activation="softmax"`` turns logits into probabilities; ``"none"`` takes the
    model's output as probabilities already (e.g. an ensemble wrapper, or the
    identity "model" of the invariance tests). ``labels``: return the argmax of
    those probabilities instead, uint8 ``(b, h, w)``, taken on the device. ``run``
    replaces ``model(t)`` (e.g. the sub-tiled forward of :func:`predict_whole`).
    """
    t = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    if device.type == "cuda":  # page-locked host memory: the copy overlaps queued GPU work
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        logits = model(t) if run is None else run(t)
    probs = logits.float() if activation == "none" else torch.softmax(logits.float(), dim=1)
    if labels and device.type != "cpu":  # first maximum, as numpy's argmax, on the device
        return probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
    if labels:  # torch's argmax over channels ran ~8x slower than class planes on CPU
        return _first_argmax(probs.contiguous().numpy())
    return probs.cpu().numpy()


def _first_argmax(p: np.ndarray) -> np.ndarray:
    """``p.argmax(axis=1).astype(uint8)`` of ``(b, C, h, w)``, one pass per class plane.

    Ties go to the first class, as with ``argmax``.
    """
    out = np.zeros((p.shape[0], *p.shape[2:]), np.uint8)
    best = p[:, 0].copy()
    for c in range(1, p.shape[1]):
        np.copyto(out, np.uint8(c), where=p[:, c] > best)
        np.maximum(best, p[:, c], out=best)
    return out


@contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def predict_windows(
    block: np.ndarray,
    model: torch.nn.Module,
    *,
    origin: tuple[int, int],
    core: tuple[int, int, int, int],
    window: int,
    stride: int,
    weights: np.ndarray,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    activation: str = "softmax",
) -> np.ndarray:
    """Blended probabilities of the core from all global-grid windows touching it.

    Parameters
    ----------
    block : ndarray, (h, w) float32
        Normalised image of chunk + halo.
    model : torch.nn.Module
        Maps ``(b, 1, window, window)`` to logits ``(b, C, window, window)``.
    origin : (int, int)
        Global coordinates of ``block[0, 0]``.
    core : (y0, y1, x0, x1)
        Global coordinates of the core (the pixels to return).
    window, stride : int
        Window edge and the grid step; origins are multiples of ``stride``.
    weights : ndarray, (window, window)
        Blend weights (strictly positive, see :func:`semdask.inference.windows.blend_weights`).
    batch_size : int
        Windows per forward pass (1 is fastest on CPU and bitwise reproducible).
    activation : {"softmax", "none"}
        How model outputs become probabilities.

    Returns
    -------
    ndarray, (C, y1 - y0, x1 - x0) float32
    """
    dev = torch.device(device) if isinstance(device, str) else device
    with _eval(model):
        return blend_windows(
            block, lambda x: _forward(model, x, dev, precision, channels_last, activation),
            origin=origin, core=core, window=window, stride=stride, weights=weights,
            batch_size=batch_size)


def blend_windows(
    block: np.ndarray,
    forward: Callable[[np.ndarray], np.ndarray],
    *,
    origin: tuple[int, int],
    core: tuple[int, int, int, int],
    window: int,
    stride: int,
    weights: np.ndarray,
    batch_size: int = 1,
) -> np.ndarray:
    """The window loop of :func:`predict_windows` with any ``forward``.

    ``forward`` maps a batch of windows ``(b, window, window)`` to probabilities
    ``(b, ..., C, window, window)``; the result is ``(..., C, y1 - y0, x1 - x0)``
    (e.g. one map per test-time augmentation view, :mod:`semdask.inference.ensemble`). Every
    element sees the same additions in the same order as with ``predict_windows``.
    """
    y0, y1, x0, x1 = core
    by, bx = origin
    oys = window_origins(y0, y1, window=window, stride=stride)
    oxs = window_origins(x0, x1, window=window, stride=stride)
    if (oys.size and (oys[0] < by or oys[-1] + window > by + block.shape[0])) or (
        oxs.size and (oxs[0] < bx or oxs[-1] + window > bx + block.shape[1])
    ):
        raise InputError("block", expected="a halo covering every window touching the core",
                         got=f"block {block.shape} at {origin} for core {core}",
                         fix="use tiling.window_halo(window, stride) as map_overlap depth")
    acc: np.ndarray | None = None
    wsum = np.zeros((y1 - y0, x1 - x0), np.float32)
    origins = [(int(oy), int(ox)) for oy in oys for ox in oxs]
    for i in range(0, len(origins), batch_size):
        batch = origins[i : i + batch_size]
        x = np.stack([block[oy - by : oy - by + window, ox - bx : ox - bx + window]
                      for oy, ox in batch])
        probs = forward(x)
        if acc is None:
            acc = np.zeros((*probs.shape[1:-2], y1 - y0, x1 - x0), np.float32)
        for (oy, ox), p in zip(batch, probs, strict=True):
            # intersection of the window with the core, in core and window coordinates
            a0, a1 = max(oy, y0), min(oy + window, y1)
            b0, b1 = max(ox, x0), min(ox + window, x1)
            w = weights[a0 - oy : a1 - oy, b0 - ox : b1 - ox]
            acc[..., a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += (
                p[..., a0 - oy : a1 - oy, b0 - ox : b1 - ox] * w)
            wsum[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += w
    if acc is None:
        raise InputError("core", expected="a non-empty core", got=str(core))
    acc /= wsum
    return acc


def predict_whole(
    block: np.ndarray,
    model: torch.nn.Module,
    *,
    core: tuple[int, int, int, int],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    multiple: int = 16,
    activation: str = "softmax",
    labels: bool = False,
    tile: int | None = -1,
) -> np.ndarray:
    """Run the fully convolutional model on the whole block and return its core.

    Probabilities ``(C, h, w)`` float32, or with ``labels`` their argmax, uint8
    ``(h, w)``, taken on the device.

    Parameters
    ----------
    block : ndarray, (h, w) float32
        Chunk + halo; ``h`` and ``w`` must be multiples of ``multiple`` (the net's
        total down-sampling factor).
    core : (y0, y1, x0, x1)
        The core in *block* coordinates.
    tile : int or None
        Sub-tile core edge (px, a multiple of ``multiple``): the net runs on sub-tiles
        of ``tile`` plus the block's halo on every side, so activations stay in cache
        (:func:`semdask.inference.tiled.tiled_forward`; a U-Net also crops its decoder
        to the core). Exact: the stitched core equals the untiled forward of the block
        up to float reassociation. ``-1`` (default): :data:`CPU_TILE` on CPU, whole
        block elsewhere; ``None`` or ``0``: the whole block in one forward.
    """
    if block.shape[0] % multiple or block.shape[1] % multiple:
        raise InputError("block", expected=f"sides that are multiples of {multiple}",
                         got=str(block.shape),
                         fix="align chunk edges and the halo to the network's 16-px grid")
    dev = torch.device(device) if isinstance(device, str) else device
    y0, y1, x0, x1 = core
    halo = min(y0, x0, block.shape[0] - y1, block.shape[1] - x1)
    if tile == -1:
        tile = CPU_TILE if dev.type == "cpu" else None
    run = None
    # sub-tiles need the context on every side on the grid; a block with less (a tiny
    # mosaic's) runs whole, as before
    if tile and halo >= 2 * multiple and halo % multiple == 0 and all(
            v % multiple == 0 for v in core):
        from semdask.inference.tiled import tiled_forward

        def run(t: torch.Tensor) -> torch.Tensor:
            return tiled_forward(model, t, core=core, halo=halo, tile=tile, multiple=multiple)

    with _eval(model):
        out = _forward(model, block[None], dev, precision, channels_last, activation,
                       labels, run)[0]
    if run is not None:
        return np.ascontiguousarray(out)
    return np.ascontiguousarray(out[..., y0:y1, x0:x1])
