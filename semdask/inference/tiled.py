"""Kernel: an exact sub-tiled forward of a fully convolutional net (pure torch, no dask).

Inside one block (chunk + halo) the net runs on sub-tiles of ``tile + 2 * halo`` px
instead of the whole block at once, so the activations of one sub-tile stay in the
CPU's caches. Each sub-tile's core sees its whole receptive field (``halo`` covers
its radius, sub-tile origins sit on the net's 16-px pooling grid), so the stitched
cores equal one untiled forward of the block, up to float reassociation (a few ULP).

For the :class:`semdask.nets.unet.UNet` the decoder is cropped as well
(:func:`unet_core_forward`): the encoder needs the full halo, but every decoder
level only needs its core plus the few pixels its remaining 3x3 convolutions read,
so about two thirds of the arithmetic runs on the core alone. Other nets (e.g. the
residual U-Net) run on the full sub-tile and are cropped afterwards.

Examples
--------
>>> import torch
>>> from semdask.nets.unet import UNet
>>> net = UNet(widths=(4, 8, 16), dropout=(0, 0, 0)).eval()
>>> x = torch.rand(1, 1, 160, 192)
>>> with torch.inference_mode():
...     full = net(x)[..., 48:112, 48:144]
...     part = tiled_forward(net, x, core=(48, 112, 48, 144), halo=48, tile=32)
>>> part.shape, bool(torch.allclose(full, part, atol=1e-5))
(torch.Size([1, 4, 64, 96]), True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from semdask.errors import InputError

__all__ = ["is_croppable_unet", "subtile_pool", "tiled_forward", "unet_core_forward"]

log = logging.getLogger(__name__)

_POOL: ThreadPoolExecutor | None = None  #: shared by the blocks of :func:`subtile_pool`


@contextmanager
def subtile_pool(threads: int) -> Iterator[None]:
    """Run the sub-tiles of every block in this process on ``threads`` shared threads.

    Inside the block, :func:`tiled_forward` hands its sub-tiles to the pool instead of
    running them one after the other, so blocks that run at the same time share the
    threads sub-tile by sub-tile: when the last block of a run is alone, all threads
    work on it (without the pool one thread per block, the others idle). The order of
    the sub-tiles and the arithmetic of each are unchanged, so are the results.
    Only CPU forwards without autograd or autocast use the pool.
    """
    global _POOL
    if threads < 2 or _POOL is not None:  # one thread: nothing to share; nested: reuse
        yield
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="semdask-subtile") as pool:
        _POOL = pool
        try:
            yield
        finally:
            _POOL = None


def is_croppable_unet(model: Any) -> bool:
    """True for a plain U-Net (encoder blocks, max-pool, 2x2 transposed convs, 1x1 head)."""
    need = ("enc", "dec", "up", "pool", "head", "depth")
    if (not all(hasattr(model, a) for a in need) or type(model).__name__ != "UNet"
            or getattr(model, "norm", None) is not None):  # unfolded batch norms
        return False
    ups = list(model.up)
    return all(tuple(u.kernel_size) == (2, 2) and tuple(u.stride) == (2, 2)
               and tuple(u.padding) == (0, 0) for u in ups) and tuple(
        model.head.kernel_size) == (1, 1)


def _margins(depth: int) -> list[int]:
    """Decoder output margin per level (even, so crops stay on the 2x up-sampling grid).

    ``m[l]``: pixels around the level-``l`` core that the decoder output must cover
    for the levels above it; a decoder block (two 3x3 convs) reads 2 more.
    """
    m = [0]
    for _ in range(1, depth):
        need = (m[-1] + 2 + 1) // 2  # ceil((m + 2) / 2)
        m.append(need + need % 2)
    return m


def _fits(model: Any, halo: int, h: int, w: int) -> bool:
    """Whether :func:`unet_core_forward` can crop this sub-tile (grid and margins)."""
    mult = 2 ** (int(model.depth) - 1)
    return not (halo % mult or h % mult or w % mult) and halo // mult >= _margins(
        int(model.depth))[-1] and halo >= 2


def _fused_ops() -> Any:
    """oneDNN's fused conv + ReLU (+ add) ops, or None where this torch build lacks them."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
            return None  # autocast (bf16) keeps the plain ops, which it casts
        return ops._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


def _conv_relu(conv: Any, x: torch.Tensor, fused: Any) -> torch.Tensor:
    """``relu(conv(x))`` in one oneDNN primitive on CPU (3x3, padding 1, stride 1)."""
    if fused is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return fused(x, conv.weight, conv.bias, list(conv.padding), [1, 1], [1, 1], 1,
                     "relu", [], "")
    return torch.relu(conv(x))


def _conv_cat_relu(conv: Any, a: torch.Tensor, b: torch.Tensor, fused: Any) -> torch.Tensor:
    """``relu(conv(cat([a, b], 1)))`` without the concatenation.

    A convolution is linear in its input channels: ``conv(a, W[:, :ca]) + conv(b, W[:, ca:])``
    (the second with the add and ReLU fused). Concatenating channels-last tensors along
    the channel axis is a strided copy that cost as much as a convolution here.
    """
    ca = a.shape[1]
    w = conv.weight
    if fused is not None and a.device.type == "cpu" and a.dtype == torch.float32:
        y = torch.nn.functional.conv2d(a, w[:, :ca], conv.bias, padding=conv.padding)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            b, y, w[:, ca:], None, list(conv.padding), [1, 1], [1, 1], 1, "add", None,
            "relu", [], "")
    return torch.relu(conv(torch.cat([a, b], dim=1)))


def unet_core_forward(model: Any, x: torch.Tensor, halo: int,
                      core: tuple[int, int]) -> torch.Tensor:
    """Logits of the core ``x[..., halo:halo + core[0], halo:halo + core[1]]`` of a U-Net.

    The encoder runs on the whole input; each decoder level only on its core plus a
    small margin (``_margins``). ``halo`` and the core sides must be multiples of
    ``2 ** (depth - 1)``; with ``halo`` at least the receptive-field radius the
    result equals the core of ``model(x)`` (up to float reassociation). On CPU the
    convolutions run as oneDNN primitives with the ReLU (and the skip connection's
    add) fused. The model must be in eval mode (dropout off).
    """
    depth = int(model.depth)
    mult = 2 ** (depth - 1)
    if halo % mult or core[0] % mult or core[1] % mult:
        raise InputError("sub-tile", expected=f"halo and core sides that are multiples of {mult}",
                         got=f"halo {halo}, core {core}",
                         fix="align the halo and the sub-tile edge to the network's grid")
    marg = _margins(depth)
    if halo // mult < marg[-1] or halo < marg[0] + 2:
        raise InputError("sub-tile halo", expected=f"at least {marg[-1] * mult} px",
                         got=str(halo), fix="use the receptive-field halo of the plan")
    fused = _fused_ops()
    skips = []
    h = x
    for i, block in enumerate(model.enc):
        h = h if i == 0 else model.pool(h)
        h = _conv_relu(block.conv2, _conv_relu(block.conv1, h, fused), fused)
        skips.append(h)
    # bottom level: crop the encoder output to its core + margin
    lv = depth - 1
    o, m = halo // mult, marg[lv]
    h = h[..., o - m: o + core[0] // mult + m, o - m: o + core[1] // mult + m]
    for lv in reversed(range(depth - 1)):
        s = 2 ** lv
        o, m = halo // s, marg[lv]
        need = m + 2  # the decoder block's input margin (two 3x3 convs)
        up = model.up[lv](h)  # covers the core +- 2 * marg[lv + 1] >= need
        cut = 2 * marg[lv + 1] - need
        cy, cx = core[0] // s, core[1] // s
        up = up[..., cut: cut + cy + 2 * need, cut: cut + cx + 2 * need]
        skip = skips[lv][..., o - need: o + cy + need, o - need: o + cx + need]
        blk = model.dec[lv]
        h = _conv_relu(blk.conv2, _conv_cat_relu(blk.conv1, skip, up, fused), fused)
        h = h[..., 2: 2 + cy + 2 * m, 2: 2 + cx + 2 * m]
    head = model.head
    if fused is not None and h.device.type == "cpu" and h.dtype == torch.float32:
        # oneDNN's 1x1 convolution (torch's own falls back to a slow generic kernel here)
        return fused(h, head.weight, head.bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
    return head(h)


def tiled_forward(model: Any, x: torch.Tensor, *, core: tuple[int, int, int, int], halo: int,
                  tile: int | None, multiple: int = 16) -> torch.Tensor:
    """Model output on ``core`` of ``x`` computed sub-tile by sub-tile.

    Parameters
    ----------
    model : torch.nn.Module
        A fully convolutional net (inputs multiples of ``multiple`` px).
    x : torch.Tensor, (n, c, h, w)
        The block: the core plus at least ``halo`` px of context on every side.
    core : (y0, y1, x0, x1)
        The core in block coordinates; ``y0, x0 >= halo``, ``y1, x1 <= side - halo``.
    halo : int
        Context per side of each sub-tile (a multiple of ``multiple``, covering the
        receptive-field radius).
    tile : int or None
        Core edge of a sub-tile (a multiple of ``multiple``); ``None`` or a tile at
        least the core's size runs the core in one piece.

    Returns
    -------
    torch.Tensor, (n, C, y1 - y0, x1 - x0)
    """
    y0, y1, x0, x1 = core
    if halo % multiple or y0 % multiple or x0 % multiple or y0 < halo or x0 < halo or (
            y1 + halo > x.shape[-2] or x1 + halo > x.shape[-1]):
        raise InputError("block", expected=f"a core with {halo} px of context per side on the "
                         f"{multiple}-px grid", got=f"core {core} of a block {tuple(x.shape)}",
                         fix="use the plan's whole-chunk halo and 16-px aligned chunks")
    crop = is_croppable_unet(model)
    step = tile if tile and tile > 0 else max(y1 - y0, x1 - x0)
    step = max(multiple, step - step % multiple)
    jobs = []
    for ty in range(y0, y1, step):
        ey = min(ty + step, y1)
        for tx in range(x0, x1, step):
            ex = min(tx + step, x1)
            # sides of the sub-tile on the grid (a ragged core is extended inside the block)
            py, px = -(ey - ty) % multiple, -(ex - tx) % multiple
            sub = x[..., ty - halo: ey + py + halo, tx - halo: ex + px + halo]
            if sub.shape[-2] != ey + py - ty + 2 * halo or sub.shape[-1] != ex + px - tx + 2 * halo:
                raise InputError("block", expected="sides that are multiples of "
                                 f"{multiple} around the core", got=str(tuple(x.shape)),
                                 fix="align chunk edges and the halo to the network's grid")
            jobs.append((ty, ey, tx, ex, sub, (ey + py - ty, ex + px - tx)))

    def one(sub: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
        if sub.device.type == "cpu":  # a dense channels-last copy: oneDNN's fast layout
            sub = sub.contiguous(memory_format=torch.channels_last)
        if crop and _fits(model, halo, *side):
            return unet_core_forward(model, sub, halo, side)
        return model(sub)[..., halo: halo + side[0], halo: halo + side[1]]

    def pooled(sub: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread
            return one(sub, side)

    subs, sides = [j[4] for j in jobs], [j[5] for j in jobs]
    pool = _POOL
    if pool is not None and len(jobs) > 1 and x.device.type == "cpu" and not (
            torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        outs = list(pool.map(pooled, subs, sides))
    else:
        outs = list(map(one, subs, sides))
    # one output, filled in place (no concatenations)
    result = outs[0].new_empty((*outs[0].shape[:-2], y1 - y0, x1 - x0))
    for (ty, ey, tx, ex, _, _), out in zip(jobs, outs, strict=True):
        result[..., ty - y0: ey - y0, tx - x0: ex - x0] = out[..., : ey - ty, : ex - tx]
    return result
