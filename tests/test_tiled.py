"""The sub-tiled whole-chunk forward equals one untiled forward (exactness of the fast kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semdask.errors import InputError
from semdask.inference.predict import predict_whole
from semdask.inference.tiled import is_croppable_unet, tiled_forward, unet_core_forward
from semdask.inference.windows import receptive_field_halo
from semdask.nets.unet import UNet


@pytest.fixture(scope="module")
def unet5() -> UNet:
    """A 5-level U-Net (16-px grid, like the bundled model) with random weights."""
    torch.manual_seed(3)
    return UNet(widths=(4, 6, 8, 8, 8), dropout=(0.0,) * 5).eval()


class ConvNet(torch.nn.Module):
    """Not a U-Net: three 3x3 convolutions (receptive field 7 px)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(5, 5, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(5, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _block(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, h, w, generator=g).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tile", [16, 48, 64, None])
def test_tiled_unet_equals_untiled_forward(unet5: UNet, tile: int | None) -> None:
    halo = receptive_field_halo(unet5.receptive_field())
    core = (halo, halo + 96, halo, halo + 144)  # ragged sub-tiles for tile 64
    x = _block(96 + 2 * halo, 144 + 2 * halo)
    assert is_croppable_unet(unet5)
    with torch.inference_mode():
        ref = unet5(x)[..., core[0]: core[1], core[2]: core[3]]
        got = tiled_forward(unet5, x, core=core, halo=halo, tile=tile)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.9999


def test_cropped_decoder_equals_the_full_decoder(unet5: UNet) -> None:
    halo = receptive_field_halo(unet5.receptive_field())
    x = _block(64 + 2 * halo, 32 + 2 * halo, seed=1)
    with torch.inference_mode():
        ref = unet5(x)[..., halo: halo + 64, halo: halo + 32]
        got = unet_core_forward(unet5, x, halo, (64, 32))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="multiples of 16"):
        unet_core_forward(unet5, x, halo, (60, 32))


def test_tiled_generic_net_equals_untiled_forward() -> None:
    net = ConvNet().eval()
    assert not is_croppable_unet(net)
    x = _block(32 + 80, 32 + 48, seed=2)
    core = (32, 32 + 48, 32, 32 + 16)
    with torch.inference_mode():
        ref = net(x)[..., 32:80, 32:48]
        got = tiled_forward(net, x, core=core, halo=32, tile=16)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_tiled_forward_needs_context_on_the_grid(unet5: UNet) -> None:
    x = _block(160, 160)
    with pytest.raises(InputError, match="context per side"):
        tiled_forward(unet5, x, core=(16, 144, 16, 144), halo=32, tile=32)
    with pytest.raises(InputError, match="context per side"):
        tiled_forward(unet5, x, core=(40, 120, 40, 120), halo=40, tile=32)


def test_predict_whole_subtiles_match_one_block(unet5: UNet) -> None:
    """The kernel's sub-tiles (probabilities and labels) equal one whole-block forward."""
    halo = receptive_field_halo(unet5.receptive_field())
    block = np.random.default_rng(5).random((80 + 2 * halo, 112 + 2 * halo)).astype(np.float32)
    core = (halo, halo + 80, halo, halo + 112)
    whole = predict_whole(block, unet5, core=core, tile=None)
    tiled = predict_whole(block, unet5, core=core, tile=32)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)
    lab = predict_whole(block, unet5, core=core, tile=32, labels=True)
    assert lab.dtype == np.uint8 and lab.shape == (80, 112)
    assert (lab == whole.argmax(0)).mean() > 0.9999


def test_tiled_unet_with_unfolded_norms_equals_untiled_forward() -> None:
    torch.manual_seed(5)
    net = UNet(widths=(4, 6, 8), dropout=(0.0,) * 3, norm="batch").train()
    with torch.no_grad():
        net(2.0 * torch.rand(2, 1, 64, 64))  # running statistics off the identity
    net.eval()
    assert not is_croppable_unet(net) and is_croppable_unet(net.folded())
    halo = receptive_field_halo(net.receptive_field())
    core = (halo, halo + 64, halo, halo + 96)
    x = _block(64 + 2 * halo, 96 + 2 * halo, seed=2)
    with torch.inference_mode():
        ref = net(x)[..., core[0]: core[1], core[2]: core[3]]
        got = tiled_forward(net, x, core=core, halo=halo, tile=32)
        folded = tiled_forward(net.folded(), x, core=core, halo=halo, tile=32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, ref, atol=1e-4, rtol=1e-4)


def test_subtile_pool_shares_sub_tiles_and_keeps_the_result(unet5: UNet,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks inside subtile_pool run their sub-tiles on the pool's threads; same numbers."""
    import threading

    from semdask.inference import tiled

    halo = receptive_field_halo(unet5.receptive_field())
    core = (halo, halo + 96, halo, halo + 144)
    x = _block(96 + 2 * halo, 144 + 2 * halo, seed=6)
    seen: set[str] = set()
    real = tiled.unet_core_forward

    def spy(*a: object, **k: object) -> torch.Tensor:
        seen.add(threading.current_thread().name)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(tiled, "unet_core_forward", spy)
    with torch.inference_mode():
        alone = tiled_forward(unet5, x, core=core, halo=halo, tile=48)
        assert seen == {threading.current_thread().name}
        seen.clear()
        with tiled.subtile_pool(2):
            pooled = tiled_forward(unet5, x, core=core, halo=halo, tile=48)
            assert tiled._POOL is not None
        assert tiled._POOL is None
    assert seen and all(n.startswith("semdask-subtile") for n in seen)
    assert torch.equal(pooled, alone)
    seen.clear()
    with tiled.subtile_pool(2):  # autograd on: the caller's thread, as without the pool
        tiled_forward(unet5, x, core=core, halo=halo, tile=48)
    assert seen == {threading.current_thread().name}
