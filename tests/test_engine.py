"""The training step engine: fast CPU dropout, in-place U-Net, fused optimiser, allocator."""

from __future__ import annotations

import copy
import resource
import sys
import types
from typing import Any

import pytest
import torch

from semdask.nets.dropout import Dropout, keep_mask
from semdask.nets.unet import UNet
from semdask.training.augment import Augmenter
from semdask.training.engine import TrainStep, cpu_allocator, keep_update_kernel, make_optimizer
from semdask.training.losses import build_loss


def test_dropout_mask_is_bernoulli_scaled_seeded_and_laid_out_like_the_input() -> None:
    x = torch.ones(4, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    m = keep_mask(x, 0.2)
    assert m.shape == x.shape and m.is_contiguous(memory_format=torch.channels_last)
    kept = m > 0
    n = m.numel()
    # keep share within 5 binomial standard deviations of 0.8
    assert abs(float(kept.float().mean()) - 0.8) < 5 * (0.8 * 0.2 / n) ** 0.5
    assert torch.all(m[kept] == torch.tensor(1 / 0.8, dtype=torch.float32))
    torch.manual_seed(3)
    assert torch.equal(keep_mask(x, 0.2), m)  # torch.manual_seed reproduces the step
    assert not torch.equal(keep_mask(x, 0.2), m)
    # per channel and per position the mask is independent (no striding artefacts)
    share = kept.float().mean(dim=(0, 2, 3))
    assert float(share.min()) > 0.75 and float(share.max()) < 0.85


def test_dropout_forward_backward_and_modes() -> None:
    d = Dropout(0.3)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert x.grad is not None
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert torch.all(x.grad[~kept] == 0)
    assert torch.allclose(y.detach()[kept], x.detach()[kept] / 0.7)
    assert torch.equal(d.eval()(x), x)  # evaluation: identity
    assert torch.equal(Dropout(0.0)(x), x)
    assert isinstance(d, torch.nn.Dropout) and d.state_dict() == {}  # files unchanged


def _legacy_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    x = torch.relu(self.conv1(x))
    return torch.relu(self.conv2(self.drop(x)))


def _no_dropout(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return net


def test_inplace_relu_unet_gives_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    net = _no_dropout(UNet(widths=(4, 8, 16)))
    old = copy.deepcopy(net)
    for blk in old.modules():
        if hasattr(blk, "conv1") and hasattr(blk, "drop"):
            blk.forward = types.MethodType(_legacy_forward, blk)
    x, y = torch.rand(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32))
    losses = []
    for m in (net, old):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for p, q in zip(net.parameters(), old.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)


def test_train_step_matches_the_plain_step_within_float_rounding() -> None:
    torch.manual_seed(0)
    net = _no_dropout(UNet(widths=(4, 8, 16)))
    ref = copy.deepcopy(net).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_fn = build_loss("ce+dice", n_classes=4)
    step = TrainStep(net, make_optimizer("adam", net.parameters(), lr=1e-2), loss_fn,
                     Augmenter("none"), torch.device("cpu"))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    assert step.optimizer.param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.rand(2, 1, 32, 32, generator=gen)
        y = torch.randint(0, 4, (2, 32, 32), generator=gen)
        got = step([x, y])
        want = loss_fn(ref(x.contiguous(memory_format=torch.channels_last)), y, None)
        opt.zero_grad(set_to_none=True)
        want.backward()
        opt.step()
        assert not got.requires_grad
        assert float(got) == pytest.approx(float(want.detach()), rel=1e-5)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_resume_keeps_the_fused_update() -> None:
    net = UNet(widths=(4, 8))
    opt = make_optimizer("adamw", net.parameters(), lr=1e-3, weight_decay=0.01)
    state = opt.state_dict()
    for g in state["param_groups"]:  # as written before the fused update existed
        g["fused"], g["foreach"] = None, None
    keep_update_kernel(opt, lambda: opt.load_state_dict(state))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["fused"] is True
    assert opt.param_groups[0]["weight_decay"] == 0.01


def _faults(n: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(n)  # allocate and touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_cpu_allocator_reuses_pages_and_is_restored() -> None:
    n = 16 << 20  # 64 MiB: glibc mmaps it by default, 16384 pages to fault in
    with cpu_allocator("cpu") as tuned:
        if not tuned:
            pytest.skip("not glibc")
        with cpu_allocator("cpu"):  # re-entrant
            for _ in range(20):  # steady state (the first few may still grow the heap)
                _faults(n)
        reused = min(_faults(n) for _ in range(3))
    fresh = max(_faults(n) for _ in range(3))  # mmap is back: blocks come fresh again
    assert reused < 2000 < fresh
    with cpu_allocator("cuda") as tuned:
        assert tuned is False
