"""A residual-encoder U-Net: a ResNet-34-like encoder (trained from scratch) + U-Net decoder.

The encoder is a full-resolution stem (two 3x3 convolutions) followed by ResNet
stages of :class:`BasicBlock` s, each stage halving the resolution, so the total
stride is ``2 ** len(layers)`` (16 for the default four stages: the inference
engine's 16-px grid). The decoder upsamples with 2x2 transposed convolutions and
concatenates the skip of the same resolution before two 3x3 conv + BN + ReLU
layers, back to full resolution; a 1x1 head gives the logits.

All encoder parameters live under the ``encoder.`` prefix so they can be frozen,
given their own learning rate, or loaded from another model's file
(:meth:`ResUNet.load_encoder`). Nothing here unpickles: weights are safetensors.

Examples
--------
>>> import torch
>>> net = ResUNet(layers=(1, 1), widths=(8, 16), stem_width=4).eval()
>>> net(torch.zeros(1, 1, 32, 32)).shape
torch.Size([1, 4, 32, 32])
>>> net.multiple, net.receptive_field(at=0)
(4, 35)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semdask.errors import ModelError

__all__ = ["ENGINE_MULTIPLE", "BasicBlock", "ResUNet"]

log = logging.getLogger(__name__)

ENGINE_MULTIPLE = 16  # the inference engine pads and aligns to 16 px (semdask.inference.graph)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv (stride s) + BN + ReLU, 3x3 conv + BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 convolution (stride s) + BN when the
    shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class _Encoder(nn.Module):
    """Stem at stride 1, then one ResNet stage per width (each starts with stride 2)."""

    def __init__(self, cin: int, stem: int, layers: tuple[int, ...],
                 widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(cin, stem), *_conv_bn(stem, stem))
        chans = (stem, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(*(BasicBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1],
                                       2 if j == 0 else 1) for j in range(n)))
            for i, n in enumerate(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class _UpBlock(nn.Module):
    """2x2 transposed conv, concatenate the skip, two 3x3 conv + BN + ReLU (dropout between)."""

    def __init__(self, cin: int, cskip: int, cout: int, p: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv1 = nn.Sequential(*_conv_bn(cskip + cout, cout))
        self.drop = nn.Dropout(p)
        self.conv2 = nn.Sequential(*_conv_bn(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip, self.up(x)], dim=1)
        return self.conv2(self.drop(self.conv1(x)))


class ResUNet(nn.Module):
    """U-Net with a residual (ResNet-34-like) encoder, output at full resolution.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a grey SEM image).
    n_classes : int
        Output channels (logits).
    layers : sequence of int
        Basic blocks per encoder stage ((3, 4, 6, 3) is ResNet-34). At most 4
        stages: inputs must be multiples of ``2 ** len(layers)`` and the inference
        engine works on a 16-px grid.
    widths : sequence of int
        Channels per stage.
    stem_width : int
        Channels of the full-resolution stem (the shallowest skip).
    decoder_widths : sequence of int, optional
        Channels of the decoder blocks, deepest first; default: the encoder's
        widths mirrored, ending with ``stem_width``.
    dropout : float
        Dropout on the deepest features and inside every decoder block.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4, *,
                 layers: Sequence[int] = (3, 4, 6, 3),
                 widths: Sequence[int] = (64, 128, 256, 512), stem_width: int = 32,
                 decoder_widths: Sequence[int] | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        layers, widths = tuple(int(n) for n in layers), tuple(int(w) for w in widths)
        skips = (int(stem_width), *widths[:-1])
        dec = tuple(int(w) for w in decoder_widths) if decoder_widths is not None else skips[::-1]
        if (not 1 <= len(layers) <= 4 or len(widths) != len(layers) or len(dec) != len(layers)
                or min(layers + widths + dec + (int(stem_width), int(in_channels),
                                                 int(n_classes))) < 1
                or not 0.0 <= float(dropout) < 1.0):
            raise ModelError("ResUNet layers/widths", expected="1 to 4 stages with one positive "
                             "block count, width and decoder width each, and 0 <= dropout < 1",
                             got=f"layers={layers}, widths={widths}, decoder_widths={dec}, "
                             f"stem_width={stem_width}, dropout={dropout}",
                             fix=f"e.g. ResUNet(layers=(3, 4, 6, 3), widths=(64, 128, 256, 512)); "
                             f"more stages would exceed the engine's {ENGINE_MULTIPLE}-px grid")
        self.in_channels, self.n_classes = int(in_channels), int(n_classes)
        self.layers, self.widths, self.stem_width = layers, widths, int(stem_width)
        self.decoder_widths, self.dropout = dec, float(dropout)
        self._frozen = False
        self.encoder = _Encoder(self.in_channels, self.stem_width, layers, widths)
        self.drop = nn.Dropout(self.dropout)
        cins = (widths[-1], *dec[:-1])
        self.decoder = nn.ModuleList(_UpBlock(ci, s, co, self.dropout)
                                     for ci, s, co in zip(cins, skips[::-1], dec, strict=True))
        self.head = nn.Conv2d(dec[-1], self.n_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) initialisation for convolutions, BatchNorm at identity (from scratch)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this (the total stride)."""
        return int(2 ** len(self.layers))

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments (for :class:`semdask.nets.model.ModelConfig`)."""
        return {"in_channels": self.in_channels, "n_classes": self.n_classes,
                "layers": list(self.layers), "widths": list(self.widths),
                "stem_width": self.stem_width, "decoder_widths": list(self.decoder_widths),
                "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, n_classes, h, w)`` for ``(n, in_channels, h, w)``."""
        m = self.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ModelError("ResUNet input", expected=f"(n, {self.in_channels}, h, w) with h "
                             f"and w multiples of {m}", got=f"shape {tuple(x.shape)}",
                             fix=f"pad the image to a multiple of {m} px (reflect)")
        feats = self.encoder(x)
        y = self.drop(feats[-1])
        for block, skip in zip(self.decoder, feats[-2::-1], strict=True):
            y = block(y, skip)
        return self.head(y)

    # -- transfer learning ---------------------------------------------------------------

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder (e.g. for a lower learning rate)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the encoder (decoder and head)."""
        enc = {id(p) for p in self.encoder.parameters()}
        return (p for p in self.parameters() if id(p) not in enc)

    def freeze_encoder(self) -> ResUNet:
        """Stop training the encoder: no gradients, BatchNorm statistics kept (eval mode).

        The encoder stays in eval mode through later ``train()`` calls until
        :meth:`unfreeze_encoder`.
        """
        self.encoder.requires_grad_(False)
        self._frozen = True
        self.encoder.eval()
        return self

    def unfreeze_encoder(self) -> ResUNet:
        """Undo :meth:`freeze_encoder`."""
        self.encoder.requires_grad_(True)
        self._frozen = False
        self.encoder.train(self.training)
        return self

    def train(self, mode: bool = True) -> ResUNet:
        """Set training mode (a frozen encoder stays in eval mode)."""
        super().train(mode)
        if self._frozen:
            self.encoder.eval()
        return self

    def save_encoder(self, path: str | os.PathLike[str]) -> Path:
        """Write the encoder's tensors (names ``encoder.*``) to a safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"encoder.{k}": v.detach().to("cpu").contiguous().clone()
                   for k, v in self.encoder.state_dict().items()}, str(path),
                  metadata={"semdask-encoder": "ResUNet", "format": "pt"})
        return path

    def load_encoder(self, path: str | os.PathLike[str]) -> int:
        """Load encoder weights from a safetensors file; return the number of tensors loaded.

        Tensors named ``encoder.*`` are used (a whole ResUNet model file or one from
        :meth:`save_encoder`); others (decoder, head) are ignored. A file with no
        ``encoder.`` names is read as a bare encoder state (names without prefix).

        Raises
        ------
        ModelError
            The file is not safetensors, or names or shapes do not match this
            encoder (a few are listed).
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types; never unpickles
            raise ModelError(str(path), expected="a safetensors file with encoder weights",
                             got=f"{type(e).__name__}: {e}",
                             fix="write it with ResUNet.save_encoder(path) "
                             "or semdask.nets.model.save_model") from None
        prefixed = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        got = prefixed if prefixed else tensors
        want = self.encoder.state_dict()
        optional = {k for k in want if k.endswith("num_batches_tracked")}
        missing = sorted(set(want) - set(got) - optional)
        extra = sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got)
                        if tuple(want[k].shape) != tuple(got[k].shape))
        if missing or extra or shapes:
            detail = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in
                                                               extra[:3]]
            detail += [f"{k}: {tuple(got[k].shape)} (model {tuple(want[k].shape)})"
                       for k in shapes[:3]]
            raise ModelError(f"{path} encoder tensors", expected=f"the {len(want)} tensors of "
                             f"this encoder (layers={list(self.layers)}, widths="
                             f"{list(self.widths)}, stem_width={self.stem_width}, "
                             f"in_channels={self.in_channels})",
                             got=f"{len(missing)} missing, {len(extra)} unexpected, "
                             f"{len(shapes)} wrong shapes: " + "; ".join(detail),
                             fix="build the ResUNet with the encoder settings of the file")
        state = {k: v for k, v in got.items() if k in want}
        self.encoder.load_state_dict(state, strict=False)
        log.info("loaded %d encoder tensors from %s", len(state), path)
        return len(state)

    # -- receptive field -----------------------------------------------------------------

    def _interval(self, p: int) -> tuple[int, int]:
        """Input columns ``[lo, hi]`` that can influence output column ``p`` (exact, 1-D)."""

        def conv(c: Any, a: int, b: int) -> tuple[int, int]:
            k, s, pad = int(c.kernel_size[0]), int(c.stride[0]), int(c.padding[0])
            return s * a - pad, s * b - pad + k - 1

        def seq(mods: Sequence[Any], a: int, b: int) -> tuple[int, int]:
            for c in reversed([m for m in mods if isinstance(m, nn.Conv2d)]):
                a, b = conv(c, a, b)
            return a, b

        def enc(level: int, a: int, b: int) -> tuple[int, int]:
            if level == 0:
                return seq(list(self.encoder.stem), a, b)
            stage: Any = self.encoder.stages[level - 1]
            for block in reversed(list(stage)):
                ma, mb = conv(block.conv1, *conv(block.conv2, a, b))
                sa, sb = seq(list(block.shortcut.modules()), a, b)
                a, b = min(ma, sa), max(mb, sb)
            return enc(level - 1, a, b)

        def dec(i: int, a: int, b: int) -> tuple[int, int]:
            # output of decoder block i lives at level n - 1 - i
            level = len(self.layers) - 1 - i
            up: Any = self.decoder[i]
            a, b = seq([*up.conv1, *up.conv2], a, b)
            k, s, pad = int(up.up.kernel_size[0]), int(up.up.stride[0]), int(up.up.padding[0])
            ua, ub = -(-(a - (k - 1) + pad) // s), (b + pad) // s
            deep = enc(level + 1, ua, ub) if i == 0 else dec(i - 1, ua, ub)
            skip = enc(level, a, b)
            return min(deep[0], skip[0]), max(deep[1], skip[1])

        return dec(len(self.layers) - 1, p, p)

    def receptive_field(self, *, at: int | None = None) -> int:
        """Receptive field edge in pixels: the widest input span that reaches one output pixel.

        Computed analytically through every convolution, stride and transposed
        convolution (skip, residual and deep paths). ``at=None`` is the maximum
        over output positions modulo :attr:`multiple` (use it for halos).
        """
        if at is not None:
            lo, hi = self._interval(int(at))
            return hi - lo + 1
        return max(self.receptive_field(at=p) for p in range(self.multiple))
