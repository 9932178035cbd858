"""The inference invariant: output does not depend on chunking, and matches in-memory references."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdask.errors import InputError
from semdask.inference.graph import (
    argmax_classes,
    blended_labels,
    blended_probs,
    labels_from_probs,
    plan_inference,
)
from semdask.inference.normalise import NormStats
from semdask.inference.windows import blend_weights, window_origins

IDENT = NormStats(0.0, 1.0)  # leaves grey levels as they are (x - 0) / 1


class Identity(torch.nn.Module):
    """'Model' whose output is its input: probabilities are the grey levels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _probs(img, model, *, chunk, stats=IDENT, n_classes=3, activation="softmax", **kw):
    plan = plan_inference(img.shape, chunk=chunk, **kw)
    with dask.config.set(scheduler="synchronous"):
        return blended_probs(da.from_array(img, chunks=97), model, n_classes=n_classes,
                             stats=stats, plan=plan, batch_size=1,
                             activation=activation).compute()


def _reference(img, model, *, window, stride, blend, n_classes, stats=IDENT):
    """Independent in-memory global sliding window on the symmetric-extended image."""
    h, w = img.shape
    pad = window
    big = np.pad(img.astype(np.float32), pad, mode="symmetric")
    x = (big - stats.low) / (stats.high - stats.low)
    wts = blend_weights(window, blend)
    acc = np.zeros((n_classes, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    with torch.inference_mode():
        for oy in window_origins(0, h, window=window, stride=stride):
            for ox in window_origins(0, w, window=window, stride=stride):
                win = x[oy + pad: oy + pad + window, ox + pad: ox + pad + window]
                p = torch.softmax(model(torch.from_numpy(win)[None, None]), 1)[0].numpy()
                a0, a1, b0, b1 = max(oy, 0), min(oy + window, h), max(ox, 0), min(ox + window, w)
                acc[:, a0:a1, b0:b1] += (p[:, a0 - oy: a1 - oy, b0 - ox: b1 - ox]
                                         * wts[a0 - oy: a1 - oy, b0 - ox: b1 - ox])
                wsum[a0:a1, b0:b1] += wts[a0 - oy: a1 - oy, b0 - ox: b1 - ox]
    return acc / wsum


def test_identity_model_reproduces_input_exactly():
    img = np.random.default_rng(0).integers(0, 256, (120, 170)).astype(np.uint8)
    for chunk, overlap in [(64, 0.5), (200, 0.25), (33, 0.0)]:
        out = _probs(img, Identity(), chunk=chunk, n_classes=1, mode="window", window=32,
                     overlap=overlap, blend="uniform", activation="none")
        np.testing.assert_array_equal(out[0], img.astype(np.float32))
    for blend in ("gaussian", "cosine"):
        out = _probs(img, Identity(), chunk=64, n_classes=1, mode="window", window=32,
                     overlap=0.25, blend=blend, activation="none")
        np.testing.assert_allclose(out[0], img, rtol=1e-6)
    out = _probs(img, Identity(), chunk=48, n_classes=1, mode="whole-chunk", window=32,
                 activation="none")
    np.testing.assert_array_equal(out[0], img.astype(np.float32))


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "uniform"])
def test_probabilities_are_normalised_everywhere(tiny_unet, grey_image, blend):
    out = _probs(grey_image, tiny_unet, chunk=64, stats=NormStats(0, 255), mode="window",
                 window=32, overlap=0.25, blend=blend)
    assert out.shape == (3, *grey_image.shape)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize(("overlap", "blend"), [(0.25, "gaussian"), (0.5, "cosine"),
                                                (0.0, "uniform")])
def test_dask_equals_in_memory_sliding_window(tiny_unet, grey_image, overlap, blend):
    stats = NormStats(0, 255)
    plan = plan_inference(grey_image.shape, window=32, overlap=overlap, chunk=64, blend=blend)
    got = _probs(grey_image, tiny_unet, chunk=64, stats=stats, window=32, overlap=overlap,
                 blend=blend)
    ref = _reference(grey_image, tiny_unet, window=32, stride=plan.stride, blend=blend,
                     n_classes=3, stats=stats)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (got.argmax(0) == ref.argmax(0)).mean() > 0.9999


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(h=st.integers(33, 140), w=st.integers(33, 140), c1=st.integers(1, 160),
       c2=st.integers(1, 160), overlap=st.sampled_from([0.0, 0.25, 0.5]))
def test_window_mode_is_bitwise_chunk_invariant(tiny_unet, h, w, c1, c2, overlap):
    img = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w)).astype(np.uint8)
    kw = dict(stats=NormStats(0, 255), mode="window", window=32, overlap=overlap)
    a = _probs(img, tiny_unet, chunk=c1, **kw)
    b = _probs(img, tiny_unet, chunk=c2, **kw)
    np.testing.assert_array_equal(a, b)


def _untiled(img, net, plan):
    """The whole (grid-aligned, symmetric-extended) uint8 image in one forward pass, cropped."""
    h, w = img.shape
    hp, wp = plan.padded_shape
    big = np.pad(img, ((plan.halo, hp - h + plan.halo), (plan.halo, wp - w + plan.halo)),
                 mode="symmetric").astype(np.float32) / 255
    with torch.inference_mode():
        ref = torch.softmax(net(torch.from_numpy(big)[None, None]), 1)[0].numpy()
    return ref[:, plan.halo: plan.halo + h, plan.halo: plan.halo + w]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(h=st.integers(40, 130), w=st.integers(40, 130), c1=st.integers(16, 96),
       c2=st.integers(16, 96))
def test_whole_chunk_mode_matches_untiled_forward(tiny_unet, h, w, c1, c2):
    from semdask.nets.model import receptive_field

    rf = receptive_field(tiny_unet)
    img = np.random.default_rng(h + 7 * w).integers(0, 256, (h, w)).astype(np.uint8)
    kw = dict(stats=NormStats(0, 255), mode="whole-chunk", window=32, receptive_field=rf)
    a = _probs(img, tiny_unet, chunk=c1, **kw)
    b = _probs(img, tiny_unet, chunk=c2, **kw)
    plan = plan_inference(img.shape, chunk=c1, **{k: v for k, v in kw.items() if k != "stats"})
    np.testing.assert_allclose(a, _untiled(img, tiny_unet, plan), atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("chunks", [(64, 96), (96, 160)])
def test_deeper_net_whole_chunk_uses_its_own_grid(chunks) -> None:
    """A 6-level U-Net (inputs multiples of 32): halo, chunks and padding on its 32-px grid,
    chunk-invariant and equal to one untiled forward."""
    from semdask.nets.model import ModelConfig, receptive_field
    from semdask.nets.unet import UNet

    torch.manual_seed(3)
    net = UNet(n_classes=3, widths=(2, 2, 4, 4, 4, 4), dropout=(0.0,) * 6).eval()
    assert ModelConfig.for_model(net, classes=["a", "b", "c"]).multiple == net.multiple == 32
    img = np.random.default_rng(5).integers(0, 256, (150, 170)).astype(np.uint8)
    kw = dict(stats=NormStats(0, 255), mode="whole-chunk", window=64,
              receptive_field=receptive_field(net), multiple=32)
    plan = plan_inference(img.shape, chunk=chunks[0], **{k: v for k, v in kw.items()
                                                         if k != "stats"})
    assert plan.grid == plan.multiple == 32 and plan.halo % 32 == 0
    assert all(c % 32 == 0 for c in plan.chunks[0][:-1]) and plan.padded_shape[0] % 32 == 0
    assert "multiple" in plan.to_dict()
    a, b = (_probs(img, net, chunk=c, **kw) for c in chunks)
    np.testing.assert_allclose(a, _untiled(img, net, plan), atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(InputError, match="multiple of 32"):
        plan_inference(img.shape, mode="window", window=48, multiple=32)
    # the default net's plan is written as before (no new key)
    assert "multiple" not in plan_inference(img.shape, mode="window", window=48).to_dict()


def test_labels_from_probs_argmax():
    p = da.from_array(np.array([[[0.2, 0.7]], [[0.8, 0.3]]], np.float32), chunks=(2, 1, 1))
    assert labels_from_probs(p).compute().tolist() == [[1, 0]]


@pytest.mark.parametrize(("shape", "kw", "msg"), [
    ((20, 300), dict(window=32), "at least one window"),
    ((100, 100), dict(window=30), "multiple of 16"),
    ((100, 100), dict(window=32, mode="tiles"), "one of window"),
    ((100, 100), dict(window=32, overlap=1.0), "fraction"),
])
def test_bad_geometry_is_a_clear_error(shape, kw, msg):
    with pytest.raises(InputError, match=msg):
        plan_inference(shape, **kw)


@pytest.mark.parametrize("mode", ["window", "whole-chunk"])
def test_mosaic_smaller_than_the_halo(tiny_unet, mode):
    """Halos wider than the image (one-window mosaics) reflect like np.pad, any chunking."""
    img = np.random.default_rng(3).integers(0, 256, (40, 50)).astype(np.uint8)
    kw = dict(stats=NormStats(0, 255), mode=mode, window=32, overlap=0.25,
              receptive_field=204)
    plan = plan_inference(img.shape, chunk=32, **{k: v for k, v in kw.items() if k != "stats"})
    if mode == "whole-chunk":
        assert plan.halo > max(img.shape)
    a = _probs(img, tiny_unet, chunk=32, **kw)
    b = _probs(img, tiny_unet, chunk=200, **kw)
    assert a.shape == (3, 40, 50)
    np.testing.assert_allclose(a.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), levels=st.integers(2, 5),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float16]))
def test_argmax_classes_equals_numpy_argmax_with_ties(c, h, w, levels, seed, dtype) -> None:
    # few distinct values: many ties, which must go to the first class as with argmax
    p = np.random.default_rng(seed).integers(0, levels, (c, h, w)).astype(dtype)
    got = argmax_classes(p)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, p.argmax(axis=0))


@pytest.mark.parametrize("mode", ["window", "whole-chunk"])
@pytest.mark.parametrize("chunk", [48, 80])
def test_blended_labels_equal_labels_of_blended_probs(tiny_unet, mode, chunk) -> None:
    """The fused graph (argmax inside the task, on the device) == the two-step graph."""
    from semdask.nets.model import receptive_field

    img = np.random.default_rng(chunk).integers(0, 256, (113, 150)).astype(np.uint8)
    plan = plan_inference(img.shape, chunk=chunk, mode=mode, window=32,
                          receptive_field=receptive_field(tiny_unet))
    kw = dict(n_classes=3, stats=NormStats(0, 255), plan=plan, batch_size=1)
    x = da.from_array(img, chunks=64)
    with dask.config.set(scheduler="synchronous"):
        fused = blended_labels(x, tiny_unet, **kw)
        two = labels_from_probs(blended_probs(x, tiny_unet, **kw))
        assert fused.dtype == np.uint8 and fused.chunks == two.chunks
        np.testing.assert_array_equal(fused.compute(), two.compute())
    with pytest.raises(InputError, match="spread"):
        blended_labels(x, tiny_unet, spread=True, **kw)
