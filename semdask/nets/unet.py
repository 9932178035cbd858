"""The U-Net of the paper (section 3.2): Keras-style conv blocks, max-pool, transposed conv.

Examples
--------
>>> import torch
>>> net = UNet(widths=(4, 8, 16), dropout=(0.1, 0.1, 0.2)).eval()
>>> net(torch.zeros(1, 1, 32, 32)).shape
torch.Size([1, 4, 32, 32])
>>> UNet().receptive_field(), UNet().receptive_field(at=0)
(204, 188)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semdask.errors import ModelError
from semdask.nets.dropout import Dropout

__all__ = ["DEFAULT_DROPOUT", "DEFAULT_WIDTHS", "UNet"]

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
DEFAULT_DROPOUT = (0.1, 0.1, 0.2, 0.2, 0.3)


class _Block(nn.Module):
    """Two 3x3 convolutions (padding 1) with ReLU; dropout between them (Keras U-Net).

    With ``norm="batch"`` each convolution (then without bias) is followed by a batch
    norm. ReLU runs in place (a convolution's backward needs its input, not its output),
    and the dropout is :class:`semdask.nets.dropout.Dropout` (fast on the CPU).
    """

    def __init__(self, cin: int, cout: int, p: float, norm: str | None = None) -> None:
        super().__init__()
        bn = norm == "batch"
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)
        self.norm1: nn.Module = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.drop = Dropout(p)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not bn)
        self.norm2: nn.Module = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)), inplace=True)
        return F.relu(self.norm2(self.conv2(self.drop(x))), inplace=True)


class UNet(nn.Module):
    """U-Net: encoder (conv blocks + 2x2 max-pool), decoder (2x2 transposed conv + skip).

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a grey SEM image).
    n_classes : int
        Output channels (logits; softmax is applied by the caller).
    widths : sequence of int
        Channels per level, shallowest first; ``len(widths)`` is the depth. Inputs
        must be multiples of ``2 ** (depth - 1)`` pixels.
    dropout : sequence of float
        Dropout per level (mirrored in the decoder).
    norm : {None, "none", "batch"}
        Batch norm after every 3x3 convolution (training converges in fewer steps);
        ``"none"`` is the same as None (the paper's net).
        :meth:`folded` merges them into the convolutions for inference, where a batch
        norm is a fixed per-channel affine map: the folded net is a plain U-Net.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4,
                 widths: Sequence[int] = DEFAULT_WIDTHS,
                 dropout: Sequence[float] | None = None, norm: str | None = None) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if dropout is None:
            dropout = (DEFAULT_DROPOUT + (0.3,) * len(widths))[: len(widths)]
        dropout = tuple(float(p) for p in dropout)
        if len(widths) < 1 or len(dropout) != len(widths) or min(widths) < 1:
            raise ModelError("UNet widths/dropout", expected="one positive width and one "
                             "dropout rate per level", got=f"widths={widths}, dropout={dropout}")
        if norm not in (None, "none", "batch"):
            raise ModelError("UNet norm", expected="None, 'none' or 'batch'", got=repr(norm))
        norm = None if norm == "none" else norm
        self.in_channels, self.n_classes = int(in_channels), int(n_classes)
        self.widths, self.dropout, self.norm = widths, dropout, norm
        cins = (self.in_channels, *widths[:-1])
        self.enc = nn.ModuleList(_Block(ci, w, p, norm)
                                 for ci, w, p in zip(cins, widths, dropout, strict=True))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in range(len(widths) - 1))
        self.dec = nn.ModuleList(_Block(2 * widths[i], widths[i], dropout[i], norm)
                                 for i in range(len(widths) - 1))
        _he_init(self)
        self.head = nn.Conv2d(widths[0], self.n_classes, 1)  # PyTorch's init: small logits

    @property
    def depth(self) -> int:
        """Number of levels (pooling steps + 1)."""
        return len(self.widths)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return int(2 ** (self.depth - 1))

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments (for :class:`ModelConfig`)."""
        kw: dict[str, Any] = {"in_channels": self.in_channels, "n_classes": self.n_classes,
                              "widths": list(self.widths), "dropout": list(self.dropout)}
        return kw if self.norm is None else {**kw, "norm": self.norm}

    def folded(self) -> UNet:
        """The same function in eval mode as a plain U-Net: batch norms merged into convs.

        ``w' = w * g / sqrt(var + eps)`` and ``b' = beta - mean * g / sqrt(var + eps)`` (the
        normed convolutions have no bias) per output channel, from the running statistics
        (computed in float64). Returns ``self`` when the net has no norms.

        Examples
        --------
        >>> net = UNet(widths=(4, 8), dropout=(0, 0), norm="batch").eval()
        >>> x = torch.rand(1, 1, 32, 32)
        >>> plain = net.folded()
        >>> plain.norm, bool(torch.allclose(net(x), plain(x), atol=1e-5))
        (None, True)
        """
        if self.norm is None:
            return self
        plain = UNet(self.in_channels, self.n_classes, self.widths, self.dropout)
        src = self.state_dict()
        out = {k: v for k, v in src.items() if ".norm" not in k and ".conv" not in k}
        for name, mod in self.named_modules():
            if not isinstance(mod, _Block):
                continue
            for i in (1, 2):
                conv, bn = getattr(mod, f"conv{i}"), getattr(mod, f"norm{i}")
                g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                out[f"{name}.conv{i}.weight"] = (conv.weight.double() * g[:, None, None, None]
                                                 ).to(conv.weight.dtype)
                out[f"{name}.conv{i}.bias"] = (bn.bias.double() - bn.running_mean.double() * g
                                               ).to(conv.weight.dtype)  # normed convs: no bias
        plain.load_state_dict(out, strict=True)
        dev = next(self.parameters()).device
        return plain.to(dev).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, n_classes, h, w)`` for ``(n, in_channels, h, w)``."""
        m = self.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ModelError("UNet input", expected=f"(n, {self.in_channels}, h, w) with h and "
                             f"w multiples of {m}", got=f"shape {tuple(x.shape)}",
                             fix=f"pad the image to a multiple of {m} px (reflect)")
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = self.dec[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)

    def receptive_field(self, *, at: int | None = None) -> int:
        """Receptive field edge in pixels: the widest input span that reaches one output pixel.

        Computed analytically by propagating an output pixel's interval back through
        every conv, pool and transposed conv (both skip and deep paths). The span
        depends on the pixel's position modulo ``2 ** (depth - 1)`` (pooling
        alignment): for the default net it is 188 px at positions 0, 1, 14, 15 (mod
        16) and 204 px elsewhere. ``at=None`` gives the maximum over positions (use
        it for halos); ``at=p`` the span for output column ``p``.
        """
        if at is not None:
            lo, hi = _interval(self, int(at))
            return hi - lo + 1
        return max(self.receptive_field(at=p) for p in range(self.multiple))


def _he_init(net: nn.Module) -> None:
    """He (Kaiming) normal initialisation of the convs (all are before a ReLU), zero biases.

    PyTorch's default (uniform, ``a = sqrt(5)``) shrinks the signal about 2.5x per
    conv + ReLU, so the deep path of an unnormalised U-Net starts ~1e-4 times weaker
    than its skips and learns slowly; He keeps the activations' scale through the
    depth (as the paper's Keras U-Net, ``he_normal``).
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _conv_back(conv: nn.Module, a: int, b: int) -> tuple[int, int]:
    k, p = int(conv.kernel_size[0]), int(conv.padding[0])  # type: ignore[index]
    return a - p, b + (k - 1 - p)


def _interval(model: UNet, p: int) -> tuple[int, int]:
    """Input columns ``[lo, hi]`` that can influence output column ``p`` (exact, 1-D)."""

    def block_back(block: _Block, a: int, b: int) -> tuple[int, int]:
        return _conv_back(block.conv1, *_conv_back(block.conv2, a, b))

    def enc(level: int, a: int, b: int) -> tuple[int, int]:
        a, b = block_back(model.enc[level], a, b)  # type: ignore[arg-type]
        return (a, b) if level == 0 else enc(level - 1, 2 * a, 2 * b + 1)

    def dec(level: int, a: int, b: int) -> tuple[int, int]:
        if level == model.depth - 1:
            return enc(level, a, b)
        a, b = block_back(model.dec[level], a, b)  # type: ignore[arg-type]
        up: Any = model.up[level]
        k, s, pad = int(up.kernel_size[0]), int(up.stride[0]), int(up.padding[0])
        ua, ub = -(-(a - (k - 1) + pad) // s), (b + pad) // s
        (ea, eb), (da, db) = enc(level, a, b), dec(level + 1, ua, ub)
        return min(ea, da), max(eb, db)

    return dec(0, p, p)

