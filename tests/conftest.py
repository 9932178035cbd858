"""Shared fixtures: small deterministic models and images; the gpu mark skips without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch


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
    from semdask.model import UNet

    torch.manual_seed(1)
    m = UNet(in_channels=1, n_classes=3, widths=(4, 8, 8), dropout=(0.0, 0.0, 0.0))
    return m.eval()


@pytest.fixture
def grey_image() -> np.ndarray:
    rng = np.random.default_rng(42)
    img = rng.normal(128, 40, size=(150, 190)).clip(0, 255).astype(np.uint8)
    return img
