"""Training commands beside ``train``: ``pretrain`` (self-supervised, unlabelled mosaics)."""

from __future__ import annotations

from pathlib import Path

import click

from semdask.cli.common import handle_errors, writable_file

__all__ = ["COMMANDS"]


@click.command("pretrain")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, callback=writable_file,
              metavar="ENCODER.safetensors",
              help="Pretrained weights (+ .yaml); give it to train --encoder-weights.")
@click.option("--arch", type=click.Choice(["unet", "resunet"]), default="unet",
              show_default=True, help="Must match the later train --arch.")
@click.option("--norm", type=click.Choice(["batch", "none"]), default="batch",
              show_default=True, help="U-Net normalisation; must match the later train --norm.")
@click.option("--budget", default="500steps", show_default=True, metavar="TIME|Nsteps",
              help="Steps (500steps) or a wall time (5m, 1h, 300): the step count is fitted "
              "to it after timing a few steps.")
@click.option("--window", type=int, default=192, show_default=True,
              help="Window edge in px (a multiple of 16).")
@click.option("--batch-size", "batch_size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True,
              help="Peak learning rate (cosine decay).")
@click.option("--mask-ratio", "mask_ratio", type=float, default=0.4, show_default=True,
              help="Share of 16-px cells masked (inpainting).")
@click.option("--encoder-only", "encoder_only", is_flag=True,
              help="Write the encoder only (default: encoder and decoder).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="Torch device (auto, cpu, cuda, cuda:1, ...).")
@click.option("--workers", type=int, default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@handle_errors
def pretrain_cmd(stores: tuple[Path, ...], out: str, arch: str, norm: str, budget: str,
                 window: int, batch_size: int, lr: float, mask_ratio: float,
                 encoder_only: bool, seed: int, device: str, workers: int,
                 overwrite: bool) -> None:
    """Pretrain a network on unlabelled mosaics STORE... (self-supervised) and write --out.

    The network learns to restore windows whose random 16-px cells were blanked and
    which got Gaussian-Poisson noise (inpainting + denoising); no labels are read.
    Then: semdask train LABELLED... --encoder-weights OUT --arch ARCH. Never
    pretrain on the images you will evaluate on.
    """
    from semdask.training.pretrain import pretrain

    r = pretrain(stores, out, arch=arch, norm=norm, budget=budget, window=window,
                 batch_size=batch_size, lr=lr, mask_ratio=mask_ratio,
                 encoder_only=encoder_only, seed=seed,
                 device=device, num_workers=workers, overwrite=overwrite)
    first = sum(r.losses[:10]) / max(1, len(r.losses[:10]))
    click.echo(f"{r.path}: {r.steps} steps in {r.seconds:.0f} s, reconstruction MSE "
               f"{first:.4f} -> {r.config['final_loss']:.4f}; use it with: semdask train ... "
               f"--arch {arch} --encoder-weights {r.path}")


COMMANDS = [pretrain_cmd]
