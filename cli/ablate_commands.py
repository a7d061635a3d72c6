"""Sweeps over head configs on one store: ablate."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def ablate(
    store: str = typer.Option(..., help="The feature store every point trains on."),
    grid: str = typer.Option(..., help="YAML grid file: head, grid (key -> values) and/or configs, seeds, fit."),
    out: str = typer.Option(..., help="Sweep folder: one run folder per point, results.parquet, summary.png."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds; overrides the grid file's."),
    workers: Optional[int] = typer.Option(None, help="Train groups in parallel on a local dask cluster."),
    scheduler: Optional[str] = typer.Option(None, help="Train groups on an existing dask cluster."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per process."),
    evaluate: Optional[bool] = typer.Option(None, help="Also compute interpretability metrics per point "
                                                       "(default: when the store has part keypoints)."),
):
    """Train a grid of head configs, several heads per read pass; resumes an interrupted sweep."""
    from protocache.pipeline.ablate import AblateConfig, run_ablate
    from protocache.stores.errors import ProtocacheError

    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ProtocacheError(f"--seeds takes comma-separated integers, not {seeds!r}") from None
    summary = run_ablate(AblateConfig(store=store, grid_file=grid, out=out, seeds=seed_list, workers=workers,
                                      scheduler=scheduler, device=device, threads=threads, evaluate=evaluate))
    typer.echo(f"{summary['points']} points: {summary['trained']} trained in {summary['groups']} read pass(es), "
               f"{summary['skipped']} already finished")
    typer.echo(f"results  {summary['results']}")
    if summary["summary"]:
        typer.echo(f"summary  {summary['summary']}")
