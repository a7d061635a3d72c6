"""The benchmark of the cache stages: bench."""

from __future__ import annotations

from typing import Optional

import typer

from protocache.pipeline.bench_scale import ScaleBenchConfig
from protocache.stores.errors import ProtocacheError

from .app import app, echo_json, option


@app.command()
def bench(as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
          quick: bool = typer.Option(False, "--quick", help="Smaller inputs: minutes on a 2-core CPU."),
          only: Optional[str] = typer.Option(
              None, "--only", help="Run only these parts, comma-separated: extraction, extract-process, store, "
                                   "compression, kmeans, cache, ablation, memory, predict."),
          scale: Optional[int] = typer.Option(
              None, "--scale", help="Instead: the scale benchmark, a store of N images of drawn tokens streamed cold "
                                    "(images/s, MB/s against the disk's own rate, peak RSS, bytes on disk)."),
          tokens: Optional[str] = option(ScaleBenchConfig, "tokens", default=None),
          compression: Optional[str] = option(ScaleBenchConfig, "compression", default=None),
          batch_size: Optional[int] = option(ScaleBenchConfig, "batch_size", default=None),
          head: Optional[bool] = option(ScaleBenchConfig, "head", "--head/--no-head", default=None),
          dir: Optional[str] = option(ScaleBenchConfig, "dir", default=None)):
    """Measure every stage as a ratio side by side in one run (targets not met are shown as such)."""
    scale_options = {"tokens": tokens, "compression": compression, "batch_size": batch_size, "head": head, "dir": dir}
    given = {k: v for k, v in scale_options.items() if v is not None}
    if scale is not None:
        if only:
            raise ProtocacheError("bench: --only picks parts of the stage benchmark, not of --scale")
        from protocache.pipeline.bench_scale import bench_scale, format_scale_report

        if quick:
            raise ProtocacheError("bench: --quick and --scale are separate benchmarks; run one at a time")
        report = bench_scale(ScaleBenchConfig(scale=scale, **given))
        echo_json(report) if as_json else typer.echo(format_scale_report(report))
        return
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ProtocacheError(f"bench: {flags} belong to the scale benchmark; add --scale N (e.g. --scale 49920)")
    from protocache.pipeline.bench_stages import format_report, run_all

    parts = None if only is None else [p.strip() for p in only.split(",") if p.strip()]
    if parts == []:
        raise ProtocacheError("bench: --only names no part; e.g. --only extraction,predict")
    report = run_all(quick=quick, only=parts)
    if as_json:
        echo_json(report)
    else:
        typer.echo(format_report(report))
