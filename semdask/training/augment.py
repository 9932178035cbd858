"""Batched, seeded augmentation on the training device (torch + kornia).

:class:`Augmenter` transforms a batch ``(image (n, 1, h, w) float, labels (n, h, w)
int64[, weights (n, h, w) float])``. Geometric transforms move image, labels and
weights identically: exact flips/rot90 (the dihedral group), then one resampling
grid per sample composed of a small affine (rotation, scale, shear), a
magnification jitter (random rescale about the centre, i.e. rescale then crop or
pad back to the window) and an elastic grid distortion (a smooth random
displacement field). The image is resampled bilinearly with reflected borders,
labels by nearest neighbour with pixels from outside the window set to ``-100``
(ignored), weights bilinearly like the image. Intensity transforms touch the image
only: Gaussian blur (kornia), brightness, contrast, gamma, the Gaussian-Poisson
noise of the paper's eq. 2, ``I' = Poisson(I * C) / C + N(0, sigma)``, and a
charging-like brightness gradient (a linear ramp plus a bright Gaussian blob).

Every random number comes from the augmenter's own generator (parameters on the
CPU, noise fields on the device from a seed drawn there), so a seed reproduces a
pass exactly on the same device.

Examples
--------
>>> import torch
>>> aug = Augmenter("default", seed=0)
>>> img, lab = torch.rand(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32))
>>> out_img, out_lab = aug(img, lab)
>>> out_img.shape, out_lab.shape, bool(((out_lab >= -100) & (out_lab < 4)).all())
(torch.Size([2, 1, 32, 32]), torch.Size([2, 32, 32]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from semdask.errors import InputError

__all__ = ["PRESETS", "AugmentConfig", "Augmenter", "preset"]

IGNORE = -100
_EXACT_POISSON = 30.0  # counts above this: normal approximation of Poisson
Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``p_*``, per sample) and ranges of every transform.

    Ranges are ``(low, high)`` drawn uniformly (log-uniformly for the
    multiplicative ones: scale, magnify, contrast, gamma, noise counts).
    """

    dihedral: bool = True
    p_affine: float = 0.0
    rotate_deg: float = 15.0
    scale: Range = (0.9, 1.1)
    shear_deg: float = 5.0
    p_magnify: float = 0.0
    magnify: Range = (0.8, 1.25)
    p_elastic: float = 0.0
    elastic_px: float = 3.0
    elastic_grid: int = 32
    p_blur: float = 0.0
    blur_sigma: Range = (0.3, 1.2)
    p_brightness: float = 0.0
    brightness: Range = (-0.1, 0.1)
    p_contrast: float = 0.0
    contrast: Range = (0.8, 1.25)
    p_gamma: float = 0.0
    gamma: Range = (0.75, 1.33)
    p_noise: float = 0.0
    noise_counts: Range = (30.0, 1000.0)
    noise_sigma: Range = (0.0, 0.04)
    p_charging: float = 0.0
    charging: Range = (0.02, 0.12)


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(dihedral=False),
    "flips": AugmentConfig(),  # flips and rot90 only (the paper; semdask 0.1's training)
    "light": AugmentConfig(p_brightness=0.5, brightness=(-0.05, 0.05), p_contrast=0.5,
                           contrast=(0.9, 1.1), p_noise=0.3, noise_counts=(200.0, 2000.0),
                           noise_sigma=(0.0, 0.02)),
    "default": AugmentConfig(p_affine=0.4, p_magnify=0.3, p_elastic=0.2, p_blur=0.2,
                             p_brightness=0.5, p_contrast=0.5, p_gamma=0.4, p_noise=0.5,
                             p_charging=0.25),
    "strong": AugmentConfig(p_affine=0.6, rotate_deg=30.0, scale=(0.8, 1.25), shear_deg=10.0,
                            p_magnify=0.5, magnify=(0.6, 1.6), p_elastic=0.4, elastic_px=5.0,
                            p_blur=0.35, blur_sigma=(0.3, 2.0), p_brightness=0.7,
                            brightness=(-0.2, 0.2), p_contrast=0.7, contrast=(0.6, 1.6),
                            p_gamma=0.6, gamma=(0.6, 1.6), p_noise=0.7,
                            noise_counts=(10.0, 1000.0), noise_sigma=(0.0, 0.08),
                            p_charging=0.4, charging=(0.05, 0.25)),
}


def preset(name: str | AugmentConfig, **overrides: Any) -> AugmentConfig:
    """The named preset (``none``, ``light``, ``default``, ``strong``) with overrides."""
    if isinstance(name, AugmentConfig):
        return replace(name, **overrides)
    if name not in PRESETS:
        raise InputError("augment", expected=" | ".join(PRESETS), got=repr(name))
    return replace(PRESETS[name], **overrides)


class Augmenter:
    """Callable batch augmentation (see the module docstring).

    Parameters
    ----------
    config : str or AugmentConfig
        A preset name or a configuration.
    seed : int
        Seed of the parameter generator (:meth:`reseed` starts a new pass).
    """

    def __init__(self, config: str | AugmentConfig = "default", *, seed: int = 0) -> None:
        self.config = preset(config)
        self._gen = torch.Generator().manual_seed(int(seed))

    def reseed(self, seed: int) -> None:
        """Restart the random stream (e.g. ``seed * 1000 + epoch`` for a resumable pass)."""
        self._gen.manual_seed(int(seed))

    # ------------------------------------------------------------------ random helpers
    def _u(self, n: int, lo: float, hi: float, *, log: bool = False) -> torch.Tensor:
        r = torch.rand(n, generator=self._gen, dtype=torch.float64)
        if log:
            return torch.exp(math.log(lo) + r * (math.log(hi) - math.log(lo))).float()
        return (lo + r * (hi - lo)).float()

    def _hit(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self._gen) < p if p > 0 else torch.zeros(n, dtype=torch.bool)

    def _device_gen(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._gen)))
        return g

    # ------------------------------------------------------------------ geometry
    def _dihedral(self, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
        n = next(x for x in xs if x is not None).shape[0]
        code = torch.randint(0, 8, (n,), generator=self._gen)
        out = [x.clone() if x is not None else None for x in xs]
        for c in code.unique().tolist():
            idx = torch.nonzero(code == c).flatten().to(xs[0].device)  # type: ignore[union-attr]
            for j, x in enumerate(xs):
                if x is None:
                    continue
                s = x.index_select(0, idx)
                s = torch.rot90(s, c % 4, dims=(-2, -1))
                s = torch.flip(s, dims=(-1,)) if c >= 4 else s
                out[j][idx] = s  # type: ignore[index]
        return out

    def _grid(self, n: int, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """Sampling grids (n, h, w, 2) for the warped samples, or None when none is."""
        c = self.config
        aff, mag = self._hit(n, c.p_affine), self._hit(n, c.p_magnify)
        ela = self._hit(n, c.p_elastic)
        if not bool((aff | mag | ela).any()):
            return None
        rot = torch.deg2rad(self._u(n, -c.rotate_deg, c.rotate_deg)) * aff
        shear = torch.tan(torch.deg2rad(self._u(n, -c.shear_deg, c.shear_deg))) * aff
        scale = torch.where(aff, self._u(n, *c.scale, log=True), torch.ones(n))
        scale = scale * torch.where(mag, self._u(n, *c.magnify, log=True), torch.ones(n))
        cos, sin = torch.cos(rot), torch.sin(rot)
        # input = M @ output, pixel units about the centre; zoom s > 1 magnifies
        m = torch.stack([torch.stack([cos, cos * shear - sin], -1),
                         torch.stack([sin, sin * shear + cos], -1)], -2) / scale[:, None, None]
        # the grid itself is built on the device: only the n 2x2 matrices travel
        ys = torch.arange(h, dtype=torch.float32, device=device) - (h - 1) / 2
        xs = torch.arange(w, dtype=torch.float32, device=device) - (w - 1) / 2
        pts = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2) as (x, y)
        src = torch.einsum("nij,hwj->nhwi", m.to(device), pts)
        if bool(ela.any()):
            g = self._device_gen(device)
            gh, gw = max(2, h // c.elastic_grid + 2), max(2, w // c.elastic_grid + 2)
            coarse = torch.randn(n, 2, gh, gw, generator=g, device=device) * c.elastic_px
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
            src = src + field.permute(0, 2, 3, 1) * ela.to(device)[:, None, None, None]
        half = torch.tensor([w / 2, h / 2], device=device)
        return src / half  # normalised coordinates, align_corners=False

    def _warp(self, grid: torch.Tensor, img: torch.Tensor, lab: torch.Tensor,
              wgt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        img = F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        stack = torch.stack([lab.to(grid.dtype), torch.ones_like(lab, dtype=grid.dtype)], 1)
        lv = F.grid_sample(stack, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        lab = torch.where(lv[:, 1] > 0.5, lv[:, 0].round().long(), IGNORE)
        if wgt is not None:
            wgt = F.grid_sample(wgt[:, None].to(grid.dtype), grid, mode="bilinear",
                                padding_mode="reflection", align_corners=False)[:, 0]
        return img, lab, wgt

    # ------------------------------------------------------------------ intensity
    def _intensity(self, img: torch.Tensor) -> torch.Tensor:
        c, n, dev = self.config, img.shape[0], img.device
        h, w = img.shape[-2:]

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.to(dev, img.dtype)[:, None, None, None]

        hit = self._hit(n, c.p_blur)
        if bool(hit.any()):
            import kornia

            sig = self._u(n, *c.blur_sigma)[hit]
            k = 2 * math.ceil(3 * max(c.blur_sigma)) + 1
            idx = torch.nonzero(hit).flatten().to(dev)
            blurred = kornia.filters.gaussian_blur2d(
                img.index_select(0, idx), (k, k), torch.stack([sig, sig], -1).to(dev, img.dtype),
                border_type="reflect")
            img = img.index_copy(0, idx, blurred)
        gamma = torch.where(self._hit(n, c.p_gamma), self._u(n, *c.gamma, log=True), torch.ones(n))
        if bool((gamma != 1).any()):
            img = torch.sign(img) * img.abs().pow(col(gamma))
        contrast = torch.where(self._hit(n, c.p_contrast), self._u(n, *c.contrast, log=True),
                               torch.ones(n))
        if bool((contrast != 1).any()):
            mean = img.mean(dim=(1, 2, 3), keepdim=True)
            img = (img - mean) * col(contrast) + mean
        bright = torch.where(self._hit(n, c.p_brightness), self._u(n, *c.brightness),
                             torch.zeros(n))
        img = img + col(bright)
        hit = self._hit(n, c.p_charging)
        if bool(hit.any()):
            amp = self._u(n, *c.charging) * hit
            gy, gx = (self._u(n, -1.0, 1.0) * amp for _ in range(2))
            cy, cx, r = self._u(n, 0.0, 1.0), self._u(n, 0.0, 1.0), self._u(n, 0.15, 0.5)
            yy = torch.linspace(0, 1, h, device=dev)[None, :, None]
            xx = torch.linspace(0, 1, w, device=dev)[None, None, :]
            ramp = gy.to(dev)[:, None, None] * (yy - 0.5) + gx.to(dev)[:, None, None] * (xx - 0.5)
            d2 = (yy - cy.to(dev)[:, None, None]) ** 2 + (xx - cx.to(dev)[:, None, None]) ** 2
            blob = amp.to(dev)[:, None, None] * torch.exp(-d2 / (2 * r.to(dev)[:, None, None] ** 2))
            img = img + (ramp + blob)[:, None].to(img.dtype)
        hit = self._hit(n, c.p_noise)
        if bool(hit.any()):
            g = self._device_gen(dev)
            counts = col(torch.where(hit, self._u(n, *c.noise_counts, log=True), torch.ones(n)))
            sigma = col(self._u(n, *c.noise_sigma) * hit)
            pos = img.clamp(min=0)
            lam = (pos * counts).float()
            # exact Poisson where the count is small, its normal limit N(lam, lam) elsewhere
            draw = lam + lam.sqrt() * torch.randn(lam.shape, generator=g, device=dev)
            small = lam < _EXACT_POISSON
            if dev.type == "cuda":  # no boolean indexing: it waits for the GPU
                draw = torch.where(small, torch.poisson(lam, generator=g), draw)
            else:  # exact draws on the CPU only where they are needed
                draw[small] = torch.poisson(lam[small], generator=g)
            shot = draw.to(img.dtype) / counts - pos
            gauss = torch.randn(img.shape, generator=g, device=dev, dtype=img.dtype) * sigma
            img = img + shot * col(hit.float()) + gauss
        return img

    # ------------------------------------------------------------------ call
    def __call__(self, image: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Augment a batch; returns ``(image, labels)`` or ``(image, labels, weights)``."""
        if image.ndim != 4 or labels.shape != (image.shape[0], *image.shape[2:]):
            raise InputError("augment batch", expected="image (n, c, h, w) and labels (n, h, w)",
                             got=f"{tuple(image.shape)} and {tuple(labels.shape)}")
        img, lab, wgt = image.float(), labels, weights
        if self.config.dihedral and img.shape[-1] == img.shape[-2]:
            img, lab, wgt = self._dihedral(img, lab, wgt)  # type: ignore[assignment]
        grid = self._grid(img.shape[0], img.shape[-2], img.shape[-1], img.device)
        if grid is not None:
            img, lab, wgt = self._warp(grid, img, lab, wgt)
        img = self._intensity(img)
        return (img, lab) if wgt is None else (img, lab, wgt)
