"""Graph builders: blended U-Net inference over a whole mosaic with ``map_overlap``.

The mosaic is padded once, globally (reflect, up to a multiple of the grid
step), cut into chunks whose edges sit on that grid, and each chunk plus halo
goes through one kernel of :mod:`semdask.inference.predict`. The halo is derived from the
parameters: ``tiling.window_halo(window, stride)`` for blended windows, the receptive-field
radius rounded up to the net's grid (16 px; 32 for a 6-level U-Net) for the whole-chunk
mode. Every chunk sees exactly the context a single global pass would, so the output does
not depend on the chunking.

The model travels to workers as a path and a hash, never as a pickled object:
each worker process loads it once (:func:`semdask.nets.model.get_model`).

Examples
--------
>>> plan = plan_inference((5000, 7000), mode="window", window=256, overlap=0.25, chunk=1000)
>>> plan.stride, plan.halo, plan.chunk, plan.padded_shape
(192, 192, 1152, (5184, 7104))
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np

from semdask import config
from semdask.errors import InputError
from semdask.inference.normalise import NormStats
from semdask.inference.normalise import apply as normalise
from semdask.inference.windows import (
    align_up,
    blend_weights,
    chunk_edge,
    receptive_field_halo,
    stride_for,
    window_halo,
)

__all__ = [
    "MODES",
    "InferencePlan",
    "argmax_classes",
    "blended_probs",
    "confidence_from_probs",
    "labels_from_probs",
    "plan_inference",
    "symmetric_pad",
]

log = logging.getLogger(__name__)

MODES = ("window", "whole-chunk")
NET_MULTIPLE = 16  # total down-sampling of the default U-Net (4 poolings)


@dataclass(frozen=True)
class InferencePlan:
    """Geometry of one inference run (all derived from the parameters)."""

    mode: str
    shape: tuple[int, int]
    window: int
    stride: int
    halo: int
    chunk: int
    grid: int
    padded_shape: tuple[int, int]
    blend: str = "gaussian"
    multiple: int = NET_MULTIPLE  # the net's total down-sampling (inputs are multiples)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Core chunks of the padded mosaic (edges on the grid, none smaller than the halo)."""
        return (_core_chunks(self.padded_shape[0], self.chunk, self.halo),
                _core_chunks(self.padded_shape[1], self.chunk, self.halo))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # the default net's plan as written before deeper nets existed:
        return {k: v for k, v in d.items() if k != "multiple" or v != NET_MULTIPLE}


def _core_chunks(length: int, edge: int, minimum: int) -> tuple[int, ...]:
    n, rem = divmod(length, edge)
    sizes = [edge] * n
    if rem:
        if sizes and rem < max(minimum, 1):
            sizes[-1] += rem  # merge a sliver into its neighbour: map_overlap needs >= halo
        else:
            sizes.append(rem)
    return tuple(sizes) if sizes else (length,)


def plan_inference(
    shape: tuple[int, int],
    *,
    mode: str = "window",
    window: int = 256,
    overlap: float = 0.25,
    chunk: int = 1536,
    receptive_field: int = 204,
    blend: str = "gaussian",
    multiple: int = NET_MULTIPLE,
) -> InferencePlan:
    """Derive stride, halo, chunk edge and global padding from the parameters.

    ``multiple`` is the net's total down-sampling (16 for the default U-Net, 32 for a
    planned deeper one): windows, the whole-chunk halo and its grid are multiples of it.

    Raises
    ------
    InputError
        For an unknown mode, a window that is not a multiple of the net's ``multiple``,
        or (window mode) a mosaic smaller than one window.
    """
    if mode not in MODES:
        raise InputError("mode", expected=f"one of {', '.join(MODES)}", got=repr(mode))
    if len(shape) != 2:
        raise InputError("mosaic", expected="a 2-D (y, x) image", got=f"shape {shape}",
                         fix="select one plane or channel before segmenting")
    net = max(NET_MULTIPLE, int(multiple))
    if window % net:
        raise InputError("window", expected=f"a multiple of {net} px (the net's total "
                         "down-sampling)", got=str(window),
                         fix=f"use --window {align_up(window, net)}")
    if min(shape) < 1:
        raise InputError("mosaic", expected="at least 1 x 1 px", got=f"shape {shape}")
    if mode == "window" and min(shape) < window:  # whole-chunk: any size (mirror-extended)
        raise InputError("mosaic", expected=f"at least one window ({window} x {window} px)",
                         got=f"an image of {shape[0]} x {shape[1]} px",
                         fix=f"use a smaller --window (a multiple of {net} <= {min(shape)}), "
                         "--mode whole-chunk, or pad the image")
    if mode == "window":
        stride = stride_for(window, overlap)
        halo = window_halo(window, stride)
        grid = stride
    else:
        stride = window
        halo = receptive_field_halo(receptive_field, net)
        grid = net
    edge = chunk_edge(chunk, multiple=grid, minimum=max(halo, grid))
    padded = (align_up(shape[0], grid), align_up(shape[1], grid))
    return InferencePlan(mode, (int(shape[0]), int(shape[1])), window, stride, halo, edge, grid,
                         padded, blend, net)


@functools.lru_cache(maxsize=8)
def _weights(window: int, blend: str) -> np.ndarray:
    return blend_weights(window, blend)


def _chunk_task(
    block: np.ndarray,
    *,
    plan: InferencePlan,
    model: Any,
    model_sha: str | None,
    stats: NormStats,
    precision: str,
    batch_size: int | str,
    device: str,
    activation: str = "softmax",
    tta: bool = False,
    spread: bool = False,
    labels: bool = False,
    tile: int | None = -1,
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    from semdask.inference.predict import predict_whole, predict_windows
    from semdask.nets.runtime import resolve_device, tune_allocator

    assert block_id is not None
    iy, ix = block_id[-2], block_id[-1]
    ych, xch = plan.chunks
    cy0, cx0 = sum(ych[:iy]), sum(xch[:ix])
    cy1, cx1 = cy0 + ych[iy], cx0 + xch[ix]
    dev = resolve_device(device)
    # "auto" is decided here, on the worker that runs the block
    batch = (16 if dev.type == "cuda" else 1) if batch_size == "auto" else int(batch_size)
    tune_allocator()
    x = normalise(block, stats)
    h = plan.halo
    if isinstance(model, tuple) or tta or spread:  # ensemble / TTA (semdask.inference.ensemble)
        from semdask.inference.ensemble import predict_members

        window = plan.mode == "window"
        p = predict_members(
            x, [_member(m, dev) for m in (model if isinstance(model, tuple) else (model,))],
            mode=plan.mode, origin=(cy0 - h, cx0 - h),
            core=(cy0, cy1, cx0, cx1) if window else (h, h + cy1 - cy0, h, h + cx1 - cx0),
            window=plan.window, stride=plan.stride, weights=_weights(plan.window, plan.blend),
            tta=tta, spread=spread, batch_size=batch, device=dev, precision=precision,
            channels_last=dev.type == "cuda" or not window, activation=activation)
        return argmax_classes(p) if labels else p
    model = _member(model, dev)
    if plan.mode == "window":
        p = predict_windows(
            x, model, origin=(cy0 - h, cx0 - h), core=(cy0, cy1, cx0, cx1),
            window=plan.window, stride=plan.stride, weights=_weights(plan.window, plan.blend),
            batch_size=batch, device=dev, precision=precision,
            channels_last=dev.type == "cuda", activation=activation)
        return argmax_classes(p) if labels else p
    return predict_whole(x, model, core=(h, h + cy1 - cy0, h, h + cx1 - cx0), device=dev,
                         precision=precision, channels_last=True, activation=activation,
                         labels=labels, multiple=plan.multiple,
                         tile=align_up(tile, plan.multiple) if tile and tile > 0 else tile)


def _subtile() -> int:
    """Sub-tile edge of the whole-chunk kernel: ``semdask.segment.tile`` if set, else -1.

    -1 lets :func:`semdask.inference.predict.predict_whole` choose (its ``CPU_TILE`` on CPU,
    whole blocks on GPUs); 0 runs whole blocks everywhere (the engine before issue 13,
    e.g. ``DASK_SEMDASK__SEGMENT__TILE=0`` for a before/after comparison).
    """
    v = config.get("segment.tile", None)
    if v is None:
        return -1
    if str(v).strip().lower() in ("auto", "-1"):
        return -1
    n = int(v)
    if n < 0 or n % NET_MULTIPLE:
        raise InputError("segment.tile", expected=f"0 or a positive multiple of {NET_MULTIPLE}",
                         got=repr(v), fix="DASK_SEMDASK__SEGMENT__TILE=512 (or 0: whole blocks)")
    return n


def _member(model: Any, dev: Any) -> Any:
    if isinstance(model, str):  # the usual case: each worker process loads the file once
        from semdask.nets.model import get_model

        return get_model(model, dev)[0]
    return model.to(dev)


def _as_task_model(model: Any) -> Any:
    """A path travels as a string, an ensemble as a tuple; modules as they are."""
    if isinstance(model, (list, tuple)):
        return tuple(_as_task_model(m) for m in model)
    return str(model) if isinstance(model, (str, os.PathLike)) else model


def blended_probs(
    image: da.Array,
    model: Any,
    *,
    n_classes: int,
    stats: NormStats,
    plan: InferencePlan,
    model_sha: str | None = None,
    precision: str | None = None,
    batch_size: int | str | None = None,
    device: str = "auto",
    activation: str = "softmax",
    tta: bool = False,
    spread: bool = False,
) -> da.Array:
    """Class probabilities ``(C, y, x)`` float32 of a whole mosaic, lazily.

    Parameters
    ----------
    image : dask.array.Array, (y, x)
        The mosaic at native dtype (normalised inside the kernel with ``stats``).
    model : str, torch.nn.Module, or a list of them
        A safetensors model file readable by every worker (loaded once per worker
        process), or an in-memory module (for tests and the threaded scheduler: a
        module is pickled into every task on a distributed cluster). A list is an
        ensemble: every member runs on the same windows and the probabilities are
        averaged (:func:`semdask.inference.ensemble.predict_members`).
    tta : bool
        Test-time augmentation: also average over the 8 D4 views of every window
        (whole-chunk mode: of every block).
    spread : bool
        Append one channel: the uncertainty (std across members x views of the
        predicted class's probability, :mod:`semdask.inference.ensemble`); ``(C + 1, y, x)``.
    n_classes : int
        Output classes of the model.
    stats : NormStats
        Mosaic-wide normalisation (computed once, never per chunk).
    plan : InferencePlan
        From :func:`plan_inference` for this image's shape.

    Returns
    -------
    dask.array.Array
        Chunked ``(C, chunk, chunk)`` with the core chunk grid of ``plan``, cropped to
        the mosaic; chunk edges are multiples of ``plan.chunk``, ready for
        shard-aligned writes.
    """
    return _infer(image, model, n_classes=n_classes, stats=stats, plan=plan,
                  model_sha=model_sha, precision=precision, batch_size=batch_size,
                  device=device, activation=activation, tta=tta, spread=spread, labels=False)


def blended_labels(image: da.Array, model: Any, *, n_classes: int, stats: NormStats,
                   plan: InferencePlan, **kwargs: Any) -> da.Array:
    """``labels_from_probs(blended_probs(...))`` in one layer: uint8 ``(y, x)``.

    The argmax is taken inside the inference task (on the device in whole-chunk
    mode), so only one byte per pixel leaves the GPU and no probability chunks
    travel between tasks. Labels are identical to the two-step graph; use it when
    no probabilities, confidence or uncertainty are written. ``kwargs``: those of
    :func:`blended_probs` except ``spread``.
    """
    if kwargs.get("spread"):
        raise InputError("spread", expected="False for labels only", got="True",
                         fix="use blended_probs(..., spread=True) for the uncertainty channel")
    return _infer(image, model, n_classes=n_classes, stats=stats, plan=plan, labels=True,
                  **kwargs)


def _infer(image: da.Array, model: Any, *, n_classes: int, stats: NormStats,
           plan: InferencePlan, model_sha: str | None = None, precision: str | None = None,
           batch_size: int | str | None = None, device: str = "auto",
           activation: str = "softmax", tta: bool = False, spread: bool = False,
           labels: bool = False) -> da.Array:
    if tuple(image.shape) != plan.shape:
        raise InputError("plan", expected=f"a plan for shape {image.shape}", got=str(plan.shape))
    precision = config.resolve(precision, "segment.precision")
    batch_size = config.resolve(batch_size, "segment.batch-size")  # "auto": on the worker
    batch_size = "auto" if str(batch_size) == "auto" else int(batch_size)
    # One global mirror-symmetric extension (halo on the left, grid remainder + halo on the
    # right), cut so that every block is core + 2 halo: the outer chunks carry the padding,
    # the inner ones get their halo from their neighbours (boundary "none").
    h = plan.halo
    pad = [(h, p - s + h) for p, s in zip(plan.padded_shape, plan.shape, strict=True)]
    x = symmetric_pad(image, pad) if h or any(p[1] for p in pad) else image
    x = x.rechunk(tuple(_with_pad(c, h) for c in plan.chunks))
    task = functools.partial(
        _chunk_task, plan=plan, model=_as_task_model(model), model_sha=model_sha, stats=stats,
        precision=str(precision), batch_size=batch_size, device=device,
        activation=activation, tta=bool(tta), spread=bool(spread), labels=labels,
        tile=_subtile())
    if labels:
        out = da.map_overlap(task, x, depth=h, boundary="none", trim=False, chunks=plan.chunks,
                             dtype=np.uint8, meta=np.empty((0, 0), np.uint8),
                             name="semdask-infer")
        return out[: plan.shape[0], : plan.shape[1]] if plan.padded_shape != plan.shape else out
    probs = da.map_overlap(
        task, x, depth=h, boundary="none", trim=False, new_axis=0,
        chunks=((n_classes + bool(spread),), *plan.chunks), dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32), name="semdask-infer")
    if plan.padded_shape != plan.shape:
        probs = probs[:, : plan.shape[0], : plan.shape[1]]
    return probs


def symmetric_pad(image: da.Array, pad: list[tuple[int, int]]) -> da.Array:
    """Mirror-symmetric padding of any width, identical to ``np.pad(mode="symmetric")``.

    Axes whose pads fit inside the array use ``dask.array.pad``; an axis shorter than
    one of its pads (a mosaic smaller than a halo) is held in one chunk and padded by
    ``np.pad`` inside each block, one graph layer per axis whatever the widths.

    Examples
    --------
    >>> x = np.arange(5)
    >>> bool((symmetric_pad(da.from_array(x), [(12, 9)]).compute()
    ...       == np.pad(x, (12, 9), mode="symmetric")).all())
    True
    >>> symmetric_pad(da.ones((1, 1), chunks=1), [(300, 400), (2, 0)]).shape
    (701, 3)
    """
    if len(pad) != image.ndim:
        raise InputError("pad", expected=f"{image.ndim} (before, after) pairs",
                         got=f"{len(pad)} pairs")
    x = image
    for ax, (before, after) in enumerate(pad):
        before, after = int(before), int(after)
        if before < 0 or after < 0:
            raise InputError("pad", expected="non-negative widths", got=repr(pad[ax]))
        if not before and not after:
            continue
        widths = [(0, 0)] * x.ndim
        widths[ax] = (before, after)
        n = x.shape[ax]
        if max(before, after) <= n:
            x = da.pad(x, widths, mode="symmetric")
            continue
        # the axis is shorter than a pad: one chunk along it, np.pad in every block
        x = x.rechunk({ax: n})
        chunks = tuple((n + before + after,) if i == ax else c for i, c in enumerate(x.chunks))
        x = x.map_blocks(np.pad, widths, mode="symmetric", chunks=chunks, dtype=x.dtype,
                         meta=np.empty((0,) * x.ndim, x.dtype))
    return x


def _with_pad(chunks: tuple[int, ...], halo: int) -> tuple[int, ...]:
    out = list(chunks)
    out[0] += halo
    out[-1] += halo
    return tuple(out)


def argmax_classes(p: np.ndarray) -> np.ndarray:
    """``p.argmax(axis=0).astype(uint8)`` for ``(C, y, x)`` in one pass per class plane.

    NumPy's ``argmax`` over the outer axis walks the planes with a stride; comparing
    whole planes is about 1.5x faster for the few classes of a phase map. Ties go to the
    first class, as with ``argmax``.

    >>> import numpy as np
    >>> p = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    >>> p[2, 0, 0] = p[1, 0, 0] = 2.0  # a tie: the first class wins
    >>> bool((argmax_classes(p) == p.argmax(0)).all()), int(argmax_classes(p)[0, 0])
    (True, 1)
    """
    out = np.zeros(p.shape[1:], np.uint8)
    best = p[0].copy()
    for c in range(1, p.shape[0]):
        np.copyto(out, np.uint8(c), where=p[c] > best)
        np.maximum(best, p[c], out=best)
    return out


def labels_from_probs(probs: da.Array) -> da.Array:
    """Integer class map (uint8) from probabilities ``(C, y, x)``: blend probs, never labels."""
    return da.map_blocks(argmax_classes, probs, drop_axis=0, dtype=np.uint8,
                         meta=np.empty((0, 0), np.uint8))


def confidence_from_probs(probs: da.Array) -> da.Array:
    """Confidence = maximum class probability, float16 ``(y, x)``."""
    return da.map_blocks(lambda p: p.max(axis=0).astype(np.float16), probs, drop_axis=0,
                         dtype=np.float16, meta=np.empty((0, 0), np.float16))
