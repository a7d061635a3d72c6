"""Commands that make datasets: make-dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app


@app.command("make-dataset")
def make_dataset_cmd(
    kind: str = typer.Argument(..., help="What to generate: synthetic-birds (a CUB-layout folder of drawn birds)."),
    out: Path = typer.Option(..., help="Folder to write into (the dataset lands in OUT/CUB_200_2011)."),
    classes: int = typer.Option(4, help="Number of classes (head colour x wing style x tail shape)."),
    per_class: int = typer.Option(12, help="Images per class, half of them (rounded up) train."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
    image_size: int = typer.Option(128, help="Side of the square images in pixels."),
):
    """Generate a small dataset on disk, e.g. synthetic birds in CUB-200-2011's layout with true part keypoints."""
    from protocache.pipeline.synthetic_birds import make_dataset

    path = make_dataset(kind, out, classes=classes, per_class=per_class, seed=seed, image_size=image_size)
    typer.echo(f"wrote {classes * per_class} images of {classes} classes to {path}")
    typer.echo(f"extract it with: protocache extract --dataset cub --root {out}")
