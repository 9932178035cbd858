"""The training step engine: one optimiser step per batch, tuned for the CPU and CUDA alike.

:class:`TrainStep` is the step of ``semdask train`` (and of anything that must time it,
such as a budget planner): batch to the device, batched augmentation, channels-last
forward (bf16 autocast on CUDA only), loss, ``zero_grad(set_to_none=True)``, backward
and a fused optimiser update. It returns the loss as a detached tensor, so the caller
decides when to synchronise (``float(loss)`` once per step is cheap on the CPU).

What makes the CPU step fast (measured on 2 cores with ``benchmarks/training.py``):

* :func:`cpu_allocator` keeps glibc malloc from handing every large activation back to
  the kernel. By default a U-Net activation of tens of MB is ``mmap``-ed, page-faulted
  in 4 KiB pages on first touch and unmapped when freed, for every tensor of every
  step: elementwise kernels (ReLU, dropout, the optimiser) then run at a quarter of
  their speed and a large share of the step is kernel time.
* :func:`make_optimizer` builds Adam/AdamW with the fused kernel (one pass over all
  parameters) where torch provides it.
* The U-Net itself uses in-place ReLU and a fast CPU dropout
  (:class:`semdask.nets.dropout.Dropout`).

What does not pay on a CPU without native bf16 (no ``avx512_bf16``/``amx_bf16`` in
``lscpu``): bf16 autocast (emulated; measured 2.8x the CPU time of fp32 per patch), and
``torch.compile`` of the model (about a minute of compilation per shape, and slower
than eager on 2 cores), so the step uses neither on the CPU.

Examples
--------
>>> import torch
>>> from semdask.nets.unet import UNet
>>> from semdask.training.augment import Augmenter
>>> from semdask.training.losses import build_loss
>>> net = UNet(widths=(4, 8))
>>> step = TrainStep(net, make_optimizer("adam", net.parameters(), lr=1e-3),
...                  build_loss("ce", n_classes=4), Augmenter("none"), torch.device("cpu"))
>>> loss = step([torch.rand(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32))])
>>> loss.shape, loss.requires_grad
(torch.Size([]), False)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["TrainStep", "cpu_allocator", "keep_update_kernel", "make_optimizer"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
# glibc's default mmap count, and the thresholds its dynamic policy reaches once a
# >= 32 MB block was freed (any U-Net step frees several)
_GLIBC_MMAP_MAX, _GLIBC_MMAP_THRESHOLD, _GLIBC_TRIM = 65536, 32 << 20, 64 << 20
_T = TypeVar("_T")
_lock = threading.Lock()
_depth = 0


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl or another libc: leave it alone
        return None


@contextlib.contextmanager
def cpu_allocator(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Keep freed CPU tensors in the heap for reuse while training (glibc only).

    Inside the block glibc serves every allocation from its heap (``M_MMAP_MAX = 0``)
    and keeps freed memory (``M_TRIM_THRESHOLD = 1 GiB``), so the activations of step
    ``n + 1`` reuse the pages of step ``n`` instead of being mapped and page-faulted
    again. On exit ``malloc_trim`` returns the free memory to the system, mmap is
    allowed again and the thresholds become those glibc's dynamic policy settles on for
    such tensors (mmap above 32 MB, trim above 64 MB) unless ``MALLOC_MMAP_MAX_``,
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` set them. Re-entrant; a
    no-op (yields False) for CUDA devices and other C libraries.
    """
    global _depth
    libc = _libc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
            log.debug("glibc malloc tuned for training (no mmap, trim 1 GiB): %s", ok)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _env_int("MALLOC_MMAP_MAX_", _GLIBC_MMAP_MAX))
                libc.mallopt(_M_MMAP_THRESHOLD,
                             _env_int("MALLOC_MMAP_THRESHOLD_", _GLIBC_MMAP_THRESHOLD))
                libc.mallopt(_M_TRIM_THRESHOLD,
                             _env_int("MALLOC_TRIM_THRESHOLD_", _GLIBC_TRIM))
                libc.malloc_trim(0)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (``"adam"``) or AdamW (``"adamw"``), fused where torch has the kernel.

    The fused update gives the same result as the per-tensor loop within float32
    rounding; where it is not available (e.g. parameters on a device without it), the
    ``foreach`` implementation is used instead.
    """
    cls = torch.optim.AdamW if str(name) == "adamw" else torch.optim.Adam
    plist = list(params)
    try:
        return cls(plist, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError) as e:  # no fused kernel for these tensors
        log.debug("fused %s unavailable (%s): foreach", name, e)
        return cls(plist, lr=lr, weight_decay=weight_decay, foreach=True)


def keep_update_kernel(opt: torch.optim.Optimizer, load: Callable[[], _T]) -> _T:
    """Run ``load()`` (e.g. a ``load_state_dict``) and keep the optimiser's fused kernel.

    Loading replaces the parameter groups with the saved ones, and checkpoints written
    before the fused update would switch it off again.
    """
    kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    out = load()
    for g, k in zip(opt.param_groups, kernel, strict=False):
        g.update(k)
    return out


class TrainStep:
    """One training step per call: ``step(batch, lr) -> loss`` (a detached 0-d tensor).

    Parameters
    ----------
    model : torch.nn.Module
        The network, already on ``device`` (it is put in channels-last layout here).
    optimizer : torch.optim.Optimizer
        Built by :func:`make_optimizer` (any optimiser works).
    loss_fn : callable
        ``loss_fn(logits, labels, weights_or_None)`` (:func:`semdask.training.losses.build_loss`).
    augment : callable
        Batch augmentation ``augment(image, labels[, weights])``
        (:class:`semdask.training.augment.Augmenter`).
    device : torch.device
        Training device.
    amp : bool
        bf16 autocast on CUDA (no effect on the CPU).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[..., torch.Tensor], augment: Callable[..., Any],
                 device: torch.device, *, amp: bool = False) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.augment, self.device = augment, torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def __call__(self, batch: Sequence[torch.Tensor], lr: float | None = None) -> torch.Tensor:
        """Augment ``batch`` (``image, labels[, weights]``), step once, return the loss."""
        if lr is not None:
            self.set_lr(lr)
        batch = [b.to(self.device, non_blocking=True) for b in batch]
        img, lab, *wgt = self.augment(*batch)
        img = img.contiguous(memory_format=torch.channels_last)
        with (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp
              else contextlib.nullcontext()):
            logits = self.model(img)
        value = self.loss_fn(logits, lab, wgt[0] if wgt else None)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()
        return value.detach()
