"""Commands of the segment arrow: segment, fractions, preview, demo (registered by main).

Every option of ``segment`` is resolved and checked (:func:`semdask.inference.run.resolve`)
before a cluster starts or anything is written; choices come from the library's enums
(:mod:`semdask.inference.settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from semdask.cli.common import announce as _announce
from semdask.cli.common import client_for as _client
from semdask.cli.common import cluster_options as _cluster_options
from semdask.cli.common import handle_errors as _handle_errors
from semdask.cli.common import positive as _positive
from semdask.cli.common import skip_teardown as _skip_teardown
from semdask.cli.common import writable_file as _writable_file
from semdask.inference.settings import MAX_CHUNK, Blend, Mode, Precision, choices

__all__ = ["COMMANDS"]


# --- segment / fractions / preview / demo (infer.py, metrics.py) -------------
@click.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--model", "-m", "models", multiple=True, type=click.Path(dir_okay=False),
              help="Model .safetensors [default: the bundled SOC model]; repeat it (or give a "
              "quoted glob) for an ensemble: probabilities are averaged.")
@click.option("--ensemble", default=None, metavar="PREFIX",
              help="Ensemble members PREFIX-m0.safetensors, PREFIX-m1, ... (semdask train "
              "--ensemble); PREFIX may be the train --out file.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average over the 8 flips/rotations (8x slower).")
@click.option("--uncertainty", is_flag=True,
              help="Also write 'uncertainty' (std across members/TTA views of the predicted "
              "class's probability) and 'entropy' (of the mean probabilities, 0..1).")
@click.option("--output", "-o", default=None, type=click.Path(),
              help="Write to this OME-Zarr instead of into MOSAIC.")
@click.option("--mode", type=click.Choice(choices(Mode)), default=None,
              help="Blended sliding windows, or the whole chunk at once (fully convolutional) "
              "[default: semdask.segment.mode, whole-chunk].")
@click.option("--chunks", "chunk", default=None, type=int,
              help=f"Chunk edge in pixels, 16..{MAX_CHUNK} [default: semdask.segment.chunks].")
@click.option("--window", default=None, type=int,
              help="Window edge (multiple of 16) [default: semdask.segment.window if you set "
              "it, else the model's].")
@click.option("--overlap", default=None, type=float,
              help="Window overlap fraction [0, 1); window mode only (whole-chunk: a warning).")
@click.option("--blend", type=click.Choice(choices(Blend)), default=None,
              help="Blend weights of overlapping windows (window mode only).")
@click.option("--precision", type=click.Choice(choices(Precision)), default=None,
              help="Autocast precision (bf16 is ~2.5x faster on recent CPUs; fp16: CUDA only).")
@click.option("--batch-size", default=None, type=int,
              help="Windows per forward pass [default: auto, decided on each worker: 1 on CPU, "
              "16 on CUDA].")
@click.option("--device", default=None,
              help="auto, cpu, cuda, cuda:1, ... [default: semdask.segment.device, auto: each "
              "worker uses CUDA when it has it].")
@click.option("--probs/--no-probs", default=None, show_default="semdask.segment.probs",
              help="Also write float16 class probabilities.")
@click.option("--confidence/--no-confidence", default=None,
              show_default="semdask.segment.confidence", help="Also write the maximum probability.")
@click.option("--run-config", "run_config", default=None, type=click.Path(dir_okay=False),
              help="YAML run settings (keys of semdask.yaml's segment section); flags win over "
              "it, it wins over dask.config.")
@click.option("--name", default="phases", help="Label group name.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs of this name.")
@click.option("--gpu-resources", is_flag=True,
              help="Annotate inference tasks with resources={'GPU': 1} (workers started "
              "with --resources GPU=1, e.g. dask-cuda).")
@click.option("--resume", is_flag=True,
              help="Keep the recorded, intact blocks of an earlier run with the same input, "
              "model and plan; compute only missing or stale ones (see semdask verify).")
@click.option("--rescale/--no-rescale", default=None, show_default="auto",
              help="Resample to the model's training pixel size and back [default: when the "
              "mosaic's and the model's pixel sizes are known and differ by > 5 %].")
@_cluster_options
@_handle_errors
def segment(mosaic: str, models: tuple[str, ...], ensemble: str | None, tta: bool,
            uncertainty: bool, output: str | None, mode: str | None, chunk: int | None,
            window: int | None, overlap: float | None, blend: str | None,
            precision: str | None, batch_size: int | None, device: str | None,
            probs: bool | None, confidence: bool | None, run_config: str | None, name: str,
            overwrite: bool, gpu_resources: bool, resume: bool, rescale: bool | None,
            profile: str | None, scheduler_address: str | None, scheduler_file: str | None,
            n_workers: int | None, dashboard_address: str | None, no_cluster: bool) -> None:
    """Segment MOSAIC (OME-Zarr) into phases; labels go to <OUT or MOSAIC>/labels/NAME.

    Every option is checked before a cluster starts or anything is written. With a Dask
    cluster, a performance report is saved beside the output store as
    <OUT or MOSAIC>.performance.html.
    """
    from contextlib import nullcontext

    import numpy as np

    from semdask.cluster.connect import performance_report_path, profile_has_gpu_workers, report
    from semdask.cluster.inprocess import in_process, threaded
    from semdask.inference.run import resolve
    from semdask.inference.runner import drain_on_sigterm
    from semdask.inference.segment import execute

    kw: dict[str, Any] = dict(
        model=list(models) or None, ensemble=ensemble, tta=tta, uncertainty=uncertainty,
        output=output, mode=mode, window=window, overlap=overlap, blend=blend, chunk=chunk,
        precision=precision, batch_size=batch_size, device=device, probs=probs,
        confidence=confidence, name=name, overwrite=overwrite, resume=resume, rescale=rescale,
        run_config=run_config)
    if no_cluster and profile:
        raise click.UsageError("--no-cluster and --profile exclude each other")
    gpu = gpu_resources or (not no_cluster and profile_has_gpu_workers(
        profile, scheduler_address=scheduler_address, scheduler_file=scheduler_file))
    # everything but the workers' devices, before a cluster starts or a file is written
    run = resolve(mosaic, check_device=no_cluster, gpu_resources=gpu, **kw)
    # fast path (issue 13): a mosaic this machine does in less than a cluster's start-up
    no_cluster = no_cluster or in_process(
        int(np.prod(run.mosaic.image.shape[-2:])), profile=profile,
        scheduler_address=scheduler_address, scheduler_file=scheduler_file,
        n_workers=n_workers, dashboard_address=dashboard_address, gpu=gpu)
    with drain_on_sigterm(), threaded() if no_cluster else nullcontext(), _client(
            no_cluster, profile=profile, scheduler_address=scheduler_address,
            scheduler_file=scheduler_file, n_workers=n_workers,
            dashboard_address=dashboard_address) as client:
        _announce(client)
        if client is not None:  # again, with the devices of the workers that will run it
            run = resolve(mosaic, client=client, gpu_resources=gpu, **kw)
        with report(client, performance_report_path(output or mosaic)) as html:
            r = execute(run, client=client)
    if html is not None:
        click.echo(f"performance report: {html}")
    click.echo(f"wrote {r.output}/{r.labels} ({r.shape[0]} x {r.shape[1]} px, {r.plan.mode} "
               f"mode) in {r.seconds:.1f} s = {r.mpix_per_s:.2f} MPix/s")
    if len(r.members) > 1 or tta:
        click.echo(f"ensemble of {len(r.members)} model(s){' x 8 TTA views' if tta else ''}"
                   + (f"; also wrote {', '.join(r.extras)}" if r.extras else ""))
    if r.rescale != 1.0:
        click.echo(f"inferred at the model's pixel size (resampled by {r.rescale:.4g} and back)")
    if no_cluster:  # outputs complete, lock released, no worker processes: a fast exit
        _skip_teardown()


@click.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.option("--labels", "name", default="phases", help="Label group to count.")
@click.option("--pixel-size", type=float, default=None, callback=_positive,
              help="Pixel size in um, > 0 [default: from the store].")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
              callback=_writable_file, help="Also write the table as CSV.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              callback=_writable_file, help="Also write the table as JSON.")
@click.option("--truth", default=None, help="Also show a reference label group, e.g. truth.")
@_handle_errors
def fractions(mosaic: str, name: str, pixel_size: float | None, csv_out: str | None,
              json_out: str | None, truth: str | None) -> None:
    """Phase area fractions (pooled counts) and areas in um^2."""
    from semdask.analysis.metrics import mosaic_fractions

    f = mosaic_fractions(mosaic, labels=name, pixel_size_um=pixel_size)
    ref = mosaic_fractions(mosaic, labels=truth, pixel_size_um=pixel_size) if truth else None
    click.echo(f.table(ref))
    if csv_out:
        Path(csv_out).write_text(f.to_csv())
    if json_out:
        Path(json_out).write_text(f.to_json())


@click.command()
@click.argument("mosaic", type=click.Path(exists=False))
@click.argument("out_png", type=click.Path(dir_okay=False), callback=_writable_file)
@click.option("--labels", "name", default="phases")
@click.option("--level", type=int, default=None,
              help="Pyramid level [default: finest level with side <= --max-side].")
@click.option("--max-side", type=int, default=2048)
@click.option("--alpha", type=float, default=0.45)
@_handle_errors
def preview(mosaic: str, out_png: str, name: str, level: int | None, max_side: int,
            alpha: float) -> None:
    """Write an overlay PNG of image and labels at one pyramid level."""
    from semdask.analysis.preview import preview as run

    png = run(mosaic, out_png, labels=name, level=level, alpha=alpha, max_side=max_side)
    click.echo(f"wrote {png}")


@click.command()
@click.option("--out", "workdir", default="demo-output", type=click.Path(file_okay=False),
              show_default=True)
@click.option("--shape", nargs=2, type=int, default=(8192, 8192), show_default=True)
@click.option("--seed", type=int, default=2026)
@click.option("--nio-fraction", type=float, default=0.15)
@click.option("--mode", type=click.Choice(choices(Mode)), default=None)
@click.option("--precision", type=click.Choice(choices(Precision)), default=None)
@click.option("--chunks", "chunk", type=int, default=None,
              help=f"Chunk edge in pixels, 16..{MAX_CHUNK}.")
@_cluster_options
@_handle_errors
def demo(workdir: str, shape: tuple[int, int], seed: int, nio_fraction: float,
         mode: str | None, precision: str | None, chunk: int | None,
         profile: str | None, scheduler_address: str | None, scheduler_file: str | None,
         n_workers: int | None, dashboard_address: str | None, no_cluster: bool) -> None:
    """Synthesise an SOC mosaic, segment it with the bundled model, report phase fractions."""
    from semdask.synthetic.demo import run_demo

    with _client(no_cluster, profile=profile, scheduler_address=scheduler_address,
                 scheduler_file=scheduler_file, n_workers=n_workers,
                 dashboard_address=dashboard_address) as client:
        _announce(client)
        r = run_demo(workdir, shape=tuple(shape), seed=seed, nio_fraction=nio_fraction,
                     mode=mode, precision=precision, chunk=chunk, client=client,
                     echo=click.echo)
    click.echo(r.summary())


# --- end segment --------------------------------------------------------------


COMMANDS = [segment, fractions, preview, demo]
