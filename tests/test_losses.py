"""Training losses: CE (== torch), Dice, focal, ignore pixels, pixel and class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semdask.errors import InputError
from semdask.training.losses import LOSSES, build_loss, class_weights_from_counts

C = 4


def _batch(seed: int = 0, ignore: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 8, 12, generator=g) * 3
    target = torch.randint(0, C, (2, 8, 12), generator=g)
    target[0, :3, :5] = ignore
    target[1, 6:, 2] = ignore
    return logits, target


@pytest.mark.parametrize("ignore", [-100, 255])
def test_ce_equals_torch_cross_entropy_with_ignore_and_class_weights(ignore: int) -> None:
    logits, target = _batch(ignore=ignore)
    cw = torch.tensor([0.5, 2.0, 1.0, 0.25])
    for weights in (None, cw):
        got = build_loss("ce", n_classes=C, class_weights=weights, ignore_index=ignore)(
            logits, target)
        want = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore)
        torch.testing.assert_close(got, want)
    # uniform pixel weights change nothing (weighted mean)
    got = build_loss("ce", n_classes=C, ignore_index=ignore)(
        logits, target, torch.full(target.shape, 0.3))
    torch.testing.assert_close(got, F.cross_entropy(logits, target, ignore_index=ignore))


def test_pixel_weights_multiply_the_per_pixel_loss() -> None:
    logits, target = _batch()
    w = torch.rand(target.shape, generator=torch.Generator().manual_seed(3))
    per = F.cross_entropy(logits, target, reduction="none")  # 0 at ignored pixels
    valid = (target != -100).float()
    want = (w * per).sum() / (w * valid).sum()
    torch.testing.assert_close(build_loss("ce", n_classes=C)(logits, target, w), want)


def test_focal_with_gamma_zero_is_ce_and_downweights_easy_pixels() -> None:
    logits, target = _batch()
    cw = torch.tensor([1.0, 3.0, 0.5, 1.0])
    f0 = build_loss("focal", n_classes=C, focal_gamma=0.0, class_weights=cw)(logits, target)
    torch.testing.assert_close(f0, F.cross_entropy(logits, target, weight=cw))
    f2 = build_loss("focal", n_classes=C)(logits, target)
    assert 0 < float(f2) < float(F.cross_entropy(logits, target))
    # manual focal on the valid pixels
    valid = target != -100
    logp = F.log_softmax(logits, 1).gather(1, target.clamp_min(0)[:, None])[:, 0][valid]
    torch.testing.assert_close(f2, (-(1 - logp.exp()) ** 2 * logp).mean())


def test_dice_of_perfect_prediction_is_zero_and_ce_dice_mixes() -> None:
    _, target = _batch()
    onehot = F.one_hot(target.clamp_min(0), C).permute(0, 3, 1, 2).float()
    perfect = 40.0 * onehot - 20.0
    for name in LOSSES:
        assert float(build_loss(name, n_classes=C)(perfect, target)) < 1e-6
    logits, _ = _batch(seed=1)
    ce = F.cross_entropy(logits, target)
    full = build_loss("ce+dice", n_classes=C, dice_weight=1.0)(logits, target)
    assert 0.3 < float(full) < 1.0  # random logits: poor overlap
    mixed = build_loss("ce+dice", n_classes=C)(logits, target)
    torch.testing.assert_close(mixed, 0.6 * ce + 0.4 * full)
    # the dice term by hand (all classes present, smooth = 1)
    valid = (target != -100).float()[:, None]
    p = F.softmax(logits, 1) * valid
    oh = onehot * valid
    dice = (2 * (p * oh).sum((0, 2, 3)) + 1) / (p.sum((0, 2, 3)) + oh.sum((0, 2, 3)) + 1)
    torch.testing.assert_close(full, 1 - dice.mean())


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_and_zero_weight_pixels_get_no_gradient(name: str) -> None:
    logits, target = _batch()
    logits[0, :, :3, :5] = torch.tensor([1e4, -1e4, 0.0, 5.0])[:, None, None]  # extreme
    x = logits.clone().requires_grad_(True)
    w = torch.ones(target.shape)
    w[1, :2] = 0.0
    loss = build_loss(name, n_classes=C)(x, target, w)
    loss.backward()
    assert x.grad is not None and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    ignored = (target == -100) | (w == 0)
    assert float(x.grad.abs().permute(1, 0, 2, 3)[:, ignored].max()) == 0.0
    assert float(x.grad.abs().permute(1, 0, 2, 3)[:, ~ignored].max()) > 0.0
    # zero weights everywhere: zero loss and zero gradient, not NaN
    y = logits.clone().requires_grad_(True)
    zero = build_loss(name, n_classes=C)(y, target, torch.zeros(target.shape))
    zero.backward()
    assert float(zero.detach()) == 0.0 and y.grad is not None and float(y.grad.abs().max()) == 0.0


def test_bf16_autocast_is_computed_in_float32() -> None:
    logits, target = _batch()
    want = F.cross_entropy(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = build_loss("ce+dice", n_classes=C, dice_weight=0.0)(logits.bfloat16(), target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(logits.bfloat16().float(), target))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_loss_errors() -> None:
    with pytest.raises(InputError, match=r"ce, ce\+dice, focal"):
        build_loss("dice", n_classes=C)
    with pytest.raises(InputError, match="class_weights"):
        build_loss("ce", n_classes=C, class_weights=torch.ones(3))
    loss = build_loss("ce", n_classes=C)
    logits, target = _batch()
    with pytest.raises(InputError, match=r"class ids 0\.\.3"):
        loss(logits, torch.where(target < 0, 255, target))
    with pytest.raises(InputError, match="integer"):
        loss(logits, target.float())
    with pytest.raises(InputError, match="logits"):
        loss(logits[:, :3], target)
    with pytest.raises(InputError, match="weight"):
        loss(logits, target, torch.ones(2, 8))


def test_class_weights_from_counts_formulas() -> None:
    counts = np.array([100, 400, 0, 1600])
    f = np.array([100, 400, 1600]) / 2100
    for scheme, raw in [("inverse", 1 / f), ("inverse_sqrt", 1 / np.sqrt(f)),
                        ("median_freq", np.median(f) / f)]:
        w = class_weights_from_counts(counts, scheme=scheme, max_ratio=1000).numpy()
        assert w.dtype == np.float32
        present = [0, 1, 3]
        np.testing.assert_allclose(w[present], raw / raw.mean(), rtol=1e-6)
        assert w[2] == 1.0  # absent class: the mean weight
        assert w[present].mean() == pytest.approx(1.0)
    w = class_weights_from_counts(counts, scheme="inverse", max_ratio=4.0).numpy()
    assert w[[0, 1, 3]].max() / w[[0, 1, 3]].min() == pytest.approx(4.0)
    np.testing.assert_allclose(w[[0, 1, 3]], np.array([4, 4, 1]) / 3, rtol=1e-6)
    assert torch.equal(class_weights_from_counts(np.array([5, 5, 5])), torch.ones(3))
    for bad in (np.array([0, 0]), np.array([[1, 2]]), np.array([1.0, -1.0]),
                np.array([1.0, np.nan])):
        with pytest.raises(InputError, match="counts"):
            class_weights_from_counts(bad)
    with pytest.raises(InputError, match="inverse_sqrt"):
        class_weights_from_counts(counts, scheme="sqrt")
    with pytest.raises(InputError, match="max_ratio"):
        class_weights_from_counts(counts, max_ratio=0.5)
