"""Commands that show what a fitted head learned: explain (a static HTML report)."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app


@app.command()
def explain(
    run: str = typer.Argument(..., help="A run folder written by `protocache fit-head`."),
    out: str = typer.Option(..., "--out", help="Report folder; open OUT/index.html in a browser."),
    images: int = typer.Option(8, help="Images of --split to explain (mixing correct and wrong predictions)."),
    split: str = typer.Option("test", help="Split the explained images come from."),
    seed: int = typer.Option(0, help="Seed of the choice of explained images."),
    patches: int = typer.Option(5, help="Top training patches shown per prototype."),
    top_prototypes: int = typer.Option(5, help="Prototypes shown per explained image and class."),
    max_prototypes: Optional[int] = typer.Option(None, help="Show only the N most important prototypes "
                                                           "in the gallery (default: all the head uses)."),
    train_split: str = typer.Option("train", help="Split the gallery's patches come from."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    root: Optional[str] = typer.Option(None, help="Dataset folder, if it moved since extraction."),
):
    """Write a static HTML report: prototype gallery and "this looks like that" evidence for chosen images."""
    from protocache.pipeline.explain import ExplainConfig, explain_run

    result = explain_run(ExplainConfig(run=run, out=out, images=images, split=split, seed=seed, patches=patches,
                                       top_prototypes=top_prototypes, max_prototypes=max_prototypes,
                                       train_split=train_split, batch_size=batch_size, device=device, root=root))
    typer.echo(f"wrote {result.index}: {result.prototypes_shown} of {result.prototypes_used} prototypes, "
               f"{result.images_explained} images ({result.correct} correct, {result.wrong} wrong), "
               f"{result.png_files} PNG files in {result.seconds:.1f}s")
