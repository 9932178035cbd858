"""Torch runtime of a worker: device resolution, autocast precision, allocator tuning.

Shared by inference (predict kernels, the model plugin of the workers) and training; it sits
in ``nets`` because it depends on torch alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from semdask.errors import InputError

__all__ = ["Precision", "autocast", "resolve_device", "tune_allocator"]

log = logging.getLogger(__name__)

Precision = str  # "fp32" | "bf16" | "fp16"
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.cache
def tune_allocator() -> bool:
    """Undo Dask's ``MALLOC_TRIM_THRESHOLD_`` for inference workers (glibc only; once).

    Dask nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting it
    switches off glibc's dynamic mmap threshold, so every activation tensor of the
    U-Net (tens to hundreds of MB per block) is mmapped, page-faulted and unmapped
    again: measured here, a 2-worker local cluster spent ~40 % of its CPU time in the
    kernel and ran ~1.7x slower than the same work with large thresholds. This keeps
    up to 256 MB of freed memory per process for reuse and mmaps only blocks above
    32 MB (glibc's maximum). Returns whether the allocator was tuned.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return False
    log.debug("tuned glibc malloc for inference (trim 256 MB, mmap 32 MB): %s", ok)
    return ok


def resolve_device(device: str | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", expected="a device present on this machine", got=str(device),
                         fix="use --device cpu, or run on a GPU worker (profile local-cuda)")
    return dev


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Autocast context for ``precision`` (fp32 = no autocast)."""
    if precision not in _PRECISIONS:
        raise InputError("precision", expected="fp32, bf16 or fp16", got=repr(precision))
    dtype = _PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise InputError("precision", expected="fp32 or bf16 on CPU", got="fp16",
                         fix="use --precision bf16 on CPU (fp16 is for CUDA)")
    return torch.autocast(device_type=device.type, dtype=dtype)
