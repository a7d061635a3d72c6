"""Commands that judge fitted heads: evaluate."""

from __future__ import annotations

from typing import Optional

import typer

from protocache.pipeline.evaluate import EvaluateConfig, evaluate_run

from .app import app, echo_json, option


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="A run folder written by `protocache fit-head`."),
    split: str = option(EvaluateConfig, "split"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    compare: Optional[str] = option(EvaluateConfig, "compare_run", "--compare"),
    drift_split: str = option(EvaluateConfig, "drift_split"),
    batch_size: int = option(EvaluateConfig, "batch_size"),
    device: str = option(EvaluateConfig, "device"),
):
    """Accuracy (top-1/top-5, per class, confusion matrix) and interpretability metrics of a run."""
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
    typer.echo(f"prototypes     {results['prototype_count']}  ({results['prototypes_used']} used; local size "
               f"{results['local_size']})")
    k = results["class_prototype_k"]
    typer.echo(f"class rule     {results['class_prototype_rule']}" + (f" (k = {k})" if k is not None else ""))
    purity = results["purity"]
    for metric in ("consistency", "stability", "purity", "drift"):
        extra = (f"  ({purity['part_related']} of {purity['prototypes']} prototypes > 0.5; PIP-Net's published "
                 "purity is on --split train)" if metric == "purity" and purity.get("value") is not None else "")
        typer.echo(f"{metric:<14} {fmt(metric)}{extra}")
    if results.get("evidence"):
        typer.echo(f"evidence       {', '.join(f'{run}/{v}' for v in results['evidence'].values())}")
    typer.echo(f"written to     {run}/eval-{split}.json")
