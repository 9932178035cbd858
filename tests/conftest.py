"""Shared fixtures: small deterministic models and images; the gpu mark skips without CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
import torch

from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.synthetic.sem import COLOURS, PHASES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_determinism() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_unet() -> torch.nn.Module:
    """A randomly initialised 3-level U-Net (multiple of 4 px), eval mode."""
    from semdask.nets.unet import UNet

    torch.manual_seed(1)
    m = UNet(in_channels=1, n_classes=3, widths=(4, 8, 8), dropout=(0.0, 0.0, 0.0))
    return m.eval()


@pytest.fixture
def grey_image() -> np.ndarray:
    rng = np.random.default_rng(42)
    img = rng.normal(128, 40, size=(150, 190)).clip(0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random depth-5 U-Net (16-px grid) with the SOC classes."""
    torch.manual_seed(3)
    m = UNet(widths=(4, 4, 8, 8, 8), dropout=(0, 0, 0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=0.04458, window=64, receptive_field=receptive_field(m))
    return save_model(m, cfg, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def window_mode() -> Iterator[None]:
    """Segment in the blended-window mode (config and CLI subprocesses) for one module."""
    old = os.environ.get("DASK_SEMDASK__SEGMENT__MODE")
    os.environ["DASK_SEMDASK__SEGMENT__MODE"] = "window"
    with dask.config.set({"semdask.segment.mode": "window"}):
        yield
    if old is None:
        os.environ.pop("DASK_SEMDASK__SEGMENT__MODE", None)
    else:
        os.environ["DASK_SEMDASK__SEGMENT__MODE"] = old
