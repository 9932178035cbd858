"""Batched augmentation: geometry shared by image/labels/weights, label set, seeds, intensities."""

from __future__ import annotations

import pytest
import torch

from semdask.errors import InputError
from semdask.training.augment import PRESETS, Augmenter, preset

N, H = 6, 64
GEOMETRIC = preset("none", dihedral=True, p_affine=1.0, p_magnify=1.0, p_elastic=1.0)


def _stripes(n: int = N, h: int = H) -> torch.Tensor:
    """Label maps 0..3 whose neighbouring regions differ by exactly 1 (triangle wave)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    t = torch.stack([((yy * (k + 1) + xx * 2) // 24) % 6 for k in range(n)])
    return torch.where(t > 3, 6 - t, t)


def _only(**kw: object) -> Augmenter:
    return Augmenter(preset("none", **kw), seed=3)


def test_presets_and_bad_input() -> None:
    assert set(PRESETS) == {"none", "flips", "light", "default", "strong"}
    assert PRESETS["strong"].p_elastic > PRESETS["default"].p_elastic > 0
    with pytest.raises(InputError, match="augment"):
        preset("heavy")
    with pytest.raises(InputError, match="labels"):
        Augmenter("light")(torch.zeros(2, 1, 8, 8), torch.zeros(2, 7, 8, dtype=torch.long))
    img, lab = torch.rand(2, 1, 16, 16), torch.randint(0, 4, (2, 16, 16))
    o_img, o_lab = Augmenter("none")(img, lab)
    assert torch.equal(o_img, img) and torch.equal(o_lab, lab)


def test_geometry_is_identical_for_image_labels_and_weights() -> None:
    lab = _stripes()
    img = lab[:, None].float()
    o_img, o_lab, o_w = Augmenter(GEOMETRIC, seed=1)(img, lab, lab.float())
    valid = o_lab >= 0
    assert 0.5 < float(valid.float().mean()) < 1.0  # warps moved pixels in from outside
    assert set(o_lab.unique().tolist()) <= {-100, 0, 1, 2, 3}
    diff = (o_img[:, 0] - o_lab.float()).abs()[valid]
    # bilinear image vs nearest labels: within one class step, exact almost everywhere
    assert float(diff.max()) < 1.0 and float(diff.mean()) < 0.1
    assert float((o_img[:, 0].round().long() == o_lab)[valid].float().mean()) > 0.95
    assert torch.equal(o_w, o_img[:, 0])  # weights follow the image's resampling exactly
    # the geometry really changed (not the identity)
    assert float((o_lab != lab)[valid].float().mean()) > 0.2
    # a wrong geometry (another sample's warp) would not match
    other = torch.roll(o_lab, 1, dims=0)
    ok = valid & (other >= 0)
    assert float((o_img[:, 0] - other.float()).abs()[ok].mean()) > 0.3


def test_dihedral_is_exact_and_keeps_ignore() -> None:
    lab = torch.randint(0, 4, (16, 12, 12))
    lab[:, 0, 0] = -100
    img = torch.rand(16, 1, 12, 12)
    o_img, o_lab = Augmenter(preset("none", dihedral=True), seed=0)(img, lab)
    seen = set()
    for i in range(16):
        variants = [torch.rot90(lab[i], k, (-2, -1)) for k in range(4)]
        variants += [torch.flip(v, (-1,)) for v in variants]
        match = [k for k, v in enumerate(variants) if torch.equal(v, o_lab[i])]
        assert match, "labels are not a flip/rotation of the input"
        k = match[0]
        v = torch.rot90(img[i, 0], k % 4, (-2, -1))
        assert torch.equal(torch.flip(v, (-1,)) if k >= 4 else v, o_img[i, 0])
        seen.add(k)
        assert int((o_lab[i] == -100).sum()) == 1
    assert len(seen) >= 4


def test_seeded_reproducibility() -> None:
    img, lab = torch.rand(4, 1, 32, 32), torch.randint(0, 4, (4, 32, 32))
    a = Augmenter("strong", seed=5)(img, lab)
    b = Augmenter("strong", seed=5)(img, lab)
    c = Augmenter("strong", seed=6)(img, lab)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    aug = Augmenter("strong", seed=5)
    first = aug(img, lab)
    second = aug(img, lab)  # the stream moves on
    assert not torch.equal(first[0], second[0])
    aug.reseed(5)
    assert torch.equal(aug(img, lab)[0], a[0])


def test_intensity_transforms_move_statistics_the_expected_way() -> None:
    g = torch.Generator().manual_seed(0)
    img = 0.3 + 0.4 * torch.rand(8, 1, 48, 48, generator=g)
    lab = torch.zeros(8, 48, 48, dtype=torch.long)

    def run(**kw: object) -> torch.Tensor:
        out_img, out_lab = _only(**kw)(img, lab)
        assert torch.equal(out_lab, lab)  # intensity transforms never touch labels
        return out_img

    assert float((run(p_brightness=1.0, brightness=(0.1, 0.2)) - img).mean()) == pytest.approx(
        0.15, abs=0.03)
    assert float(run(p_contrast=1.0, contrast=(1.5, 2.0)).std()) > 1.4 * float(img.std())
    assert float(run(p_contrast=1.0, contrast=(0.5, 0.6)).std()) < 0.7 * float(img.std())
    assert float(run(p_gamma=1.0, gamma=(1.5, 2.0)).mean()) < float(img.mean()) - 0.1
    assert float(run(p_gamma=1.0, gamma=(0.5, 0.6)).mean()) > float(img.mean()) + 0.1
    assert float(run(p_blur=1.0, blur_sigma=(1.0, 1.5)).std()) < 0.6 * float(img.std())
    noisy = run(p_noise=1.0, noise_counts=(50.0, 60.0), noise_sigma=(0.05, 0.06))
    assert float((noisy - img).std()) > 0.05
    assert float((noisy - img).mean()) == pytest.approx(0.0, abs=0.01)  # unbiased
    charged = run(p_charging=1.0, charging=(0.2, 0.3))
    assert float((charged - img).mean()) > 0.01  # the blob brightens
    assert float((charged - img).std()) > 0.01  # and it varies across the window


def test_poisson_part_of_the_noise_grows_with_the_signal() -> None:
    aug = _only(p_noise=1.0, noise_counts=(100.0, 100.0), noise_sigma=(0.0, 0.0))
    dark, bright = torch.full((4, 1, 64, 64), 0.05), torch.full((4, 1, 64, 64), 0.8)
    lab = torch.zeros(4, 64, 64, dtype=torch.long)
    out_dark = aug(dark, lab)[0]
    var_dark = float((out_dark - dark).var())
    counts = out_dark * 100  # small counts are drawn exactly: whole photon numbers
    assert torch.allclose(counts, counts.round(), atol=1e-3)
    var_bright = float((aug(bright, lab)[0] - bright).var())
    # eq. 2: Poisson(I * C) / C has variance I / C
    assert var_dark == pytest.approx(0.05 / 100, rel=0.15)
    assert var_bright == pytest.approx(0.8 / 100, rel=0.15)


@pytest.mark.gpu
def test_augment_on_cuda() -> None:
    lab = _stripes().cuda()
    img = lab[:, None].float()
    o_img, o_lab = Augmenter("strong", seed=0)(img, lab)
    assert o_img.is_cuda and o_lab.is_cuda
    assert set(o_lab.unique().tolist()) <= {-100, 0, 1, 2, 3}
    a = Augmenter(GEOMETRIC, seed=2)(img, lab)
    b = Augmenter(GEOMETRIC, seed=2)(img, lab)
    assert torch.equal(a[1], b[1])
    valid = a[1] >= 0
    assert float((a[0][:, 0] - a[1].float()).abs()[valid].max()) < 1.0
