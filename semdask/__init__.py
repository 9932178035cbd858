"""semdask: distributed phase segmentation of SEM mosaics on Dask.

The public functions mirror the CLI sub-commands (see ``semdask --help``).
Heavy modules are imported lazily so ``import semdask`` stays fast.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "segment": "semdask.infer",
    "open_mosaic": "semdask.io",
    "load_model": "semdask.model",
    "phase_fractions": "semdask.metrics",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semdask' has no attribute {name!r}")
