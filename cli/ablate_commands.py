"""Sweeps over head configs on one store: ablate."""

from __future__ import annotations

from typing import Optional

import typer

from protocache.pipeline.ablate import AblateConfig

from .app import app, option


@app.command()
def ablate(
    store: str = option(AblateConfig, "store", default=...),
    grid: str = option(AblateConfig, "grid_file", "--grid", default=...),
    out: str = option(AblateConfig, "out", default=...),
    seeds: Optional[str] = option(AblateConfig, "seeds", help="Comma-separated seeds; overrides the grid file's."),
    workers: Optional[int] = option(AblateConfig, "workers"),
    scheduler: Optional[str] = option(AblateConfig, "scheduler"),
    device: str = option(AblateConfig, "device"),
    threads: Optional[int] = option(AblateConfig, "threads"),
    evaluate: Optional[bool] = option(AblateConfig, "evaluate"),
    resume: str = option(AblateConfig, "resume"),
    progress: bool = option(AblateConfig, "progress"),
):
    """Train a grid of head configs, several heads per read pass; resumes an interrupted sweep."""
    from protocache.pipeline.ablate import run_ablate
    from protocache.stores.errors import ProtocacheError

    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ProtocacheError(f"--seeds takes comma-separated integers, not {seeds!r}") from None
    summary = run_ablate(AblateConfig(store=store, grid_file=grid, out=out, seeds=seed_list, workers=workers,
                                      scheduler=scheduler, device=device, threads=threads, evaluate=evaluate,
                                      resume=resume, progress=progress))
    typer.echo(f"{summary['points']} points: {summary['trained']} trained in {summary['groups']} read pass(es), "
               f"{summary['skipped']} already finished")
    typer.echo(f"results  {summary['results']}")
    if summary["summary"]:
        typer.echo(f"summary  {summary['summary']}")
    chosen = summary["chosen"]
    if chosen is None:
        typer.echo("chosen   none: no point has a validation split (val_fraction 0), so no config is chosen")
    else:
        test = "n/a" if chosen["test_accuracy"] is None else f"{100 * chosen['test_accuracy']:.2f}%"
        typer.echo(f"chosen   {chosen['config']} by val accuracy {100 * chosen['val_accuracy']:.2f}% "
                   f"(mean of {len(chosen['seeds'])} seed(s), best of {chosen['configs_ranked']} configs); "
                   f"its test accuracy {test}")
