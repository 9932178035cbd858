"""Packaged defaults merged into ``dask.config["semdask"]``.

Keyword arguments always win over configuration; configuration wins over the
packaged ``semdask.yaml``.

Examples
--------
>>> from semdask import config
>>> config.get("segment.window")
256
>>> import dask
>>> with dask.config.set({"semdask.segment.window": 512}):
...     config.get("segment.window")
512
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

__all__ = ["get", "packaged", "resolve"]

_fn = os.path.join(os.path.dirname(__file__), "semdask.yaml")
with open(_fn) as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)


def get(key: str, default: Any = None) -> Any:
    """Return ``semdask.<key>`` from the active Dask configuration."""
    return dask.config.get(f"semdask.{key}", default=default)


def resolve(value: Any, key: str) -> Any:
    """Return ``value`` unless it is None, else the configured ``semdask.<key>``."""
    return get(key) if value is None else value


def packaged(key: str) -> Any:
    """Return ``semdask.<key>`` as packaged in ``semdask.yaml`` (None when absent).

    A configured value that differs from it was set by the user (a dask YAML file,
    a ``DASK_SEMDASK__...`` environment variable or ``dask.config.set``).
    """
    node: Any = _defaults.get("semdask", {})
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
