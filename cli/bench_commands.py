"""The benchmark of the cache stages: bench."""

from __future__ import annotations

import typer

from .app import app, echo_json


@app.command()
def bench(as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
          quick: bool = typer.Option(False, "--quick", help="Smaller inputs: minutes on a 2-core CPU.")):
    """Measure every stage as a ratio side by side in one run (targets not met are shown as such)."""
    from protocache.pipeline.bench_stages import format_report, run_all

    report = run_all(quick=quick)
    if as_json:
        echo_json(report)
    else:
        typer.echo(format_report(report))
