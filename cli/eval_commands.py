"""Commands that judge fitted heads: evaluate."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, echo_json


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="A run folder written by `protocache fit-head`."),
    split: str = typer.Option("test", help="Split to evaluate."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    compare: Optional[str] = typer.Option(None, help="A second run (other seed) for cross-run prototype drift."),
    drift_split: str = typer.Option("train", help="Split whose top patches define prototype drift."),
    batch_size: int = typer.Option(128, help="Images per batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
):
    """Accuracy (top-1/top-5, per class, confusion matrix) and interpretability metrics of a run."""
    from protocache.pipeline.evaluate import EvaluateConfig, evaluate_run

    results = evaluate_run(run, EvaluateConfig(split=split, batch_size=batch_size, device=device,
                                               drift_split=drift_split, compare_run=compare))
    if as_json:
        echo_json(results)
        return

    def fmt(metric):
        value = results[metric].get("value") if isinstance(results[metric], dict) else results[metric]
        return f"{value:.3f}" if isinstance(value, float) else f"n/a ({results[metric].get('reason', '')})"

    typer.echo(f"run            {results['run']}  ({results['split']}, {results['num_images']} images)")
    typer.echo(f"top-1          {results['top1']:.4f}")
    typer.echo(f"top-5          {results['top5']:.4f}")
    typer.echo(f"prototypes     {results['prototype_count']}  (local size {results['local_size']})")
    for metric in ("consistency", "stability", "purity", "drift"):
        typer.echo(f"{metric:<14} {fmt(metric)}")
    typer.echo(f"written to     {run}/eval-{split}.json")
