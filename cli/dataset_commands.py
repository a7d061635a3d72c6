"""Commands that make datasets: make-dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from protocache.pipeline.datasets.synthetic_birds import SyntheticBirdsConfig, make_dataset

from .app import app, option


@app.command("make-dataset")
def make_dataset_cmd(
    kind: str = typer.Argument(..., help="What to generate: synthetic-birds (a CUB-layout folder of drawn birds)."),
    out: Path = typer.Option(..., help="Folder to write into (the dataset lands in OUT/CUB_200_2011)."),
    classes: int = option(SyntheticBirdsConfig, "classes"),
    per_class: int = option(SyntheticBirdsConfig, "per_class"),
    seed: int = option(SyntheticBirdsConfig, "seed"),
    image_size: int = option(SyntheticBirdsConfig, "image_size"),
):
    """Generate a small dataset on disk, e.g. synthetic birds in CUB-200-2011's layout with true part keypoints."""
    path = make_dataset(kind, out, classes=classes, per_class=per_class, seed=seed, image_size=image_size)
    typer.echo(f"wrote {classes * per_class} images of {classes} classes to {path}")
    typer.echo(f"extract it with: protocache extract --dataset cub --root {out}")
