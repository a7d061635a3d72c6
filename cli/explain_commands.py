"""Commands that show what a fitted head learned: explain (a static HTML report)."""

from __future__ import annotations

from typing import Optional

import typer

from protocache.pipeline.config import field_docs
from protocache.pipeline.explain.config import ExplainConfig

from .app import app, option


@app.command()
def explain(
    run: str = typer.Argument(..., help=field_docs(ExplainConfig)["run"]),
    out: str = typer.Option(..., "--out", help=field_docs(ExplainConfig)["out"]),
    images: int = option(ExplainConfig, "images"),
    split: str = option(ExplainConfig, "split"),
    seed: int = option(ExplainConfig, "seed"),
    patches: int = option(ExplainConfig, "patches"),
    top_prototypes: int = option(ExplainConfig, "top_prototypes"),
    max_prototypes: Optional[int] = option(ExplainConfig, "max_prototypes"),
    train_split: str = option(ExplainConfig, "train_split"),
    batch_size: int = option(ExplainConfig, "batch_size"),
    device: str = option(ExplainConfig, "device"),
    root: Optional[str] = option(ExplainConfig, "root"),
):
    """Write a static HTML report: prototype gallery and "this looks like that" evidence for chosen images."""
    from protocache.pipeline.explain import explain_run

    result = explain_run(ExplainConfig(run=run, out=out, images=images, split=split, seed=seed, patches=patches,
                                       top_prototypes=top_prototypes, max_prototypes=max_prototypes,
                                       train_split=train_split, batch_size=batch_size, device=device, root=root))
    typer.echo(f"wrote {result.index}: {result.prototypes_shown} of {result.prototypes_used} prototypes, "
               f"{result.images_explained} images ({result.correct} correct, {result.wrong} wrong), "
               f"{result.png_files} PNG files in {result.seconds:.1f}s")
