"""Commands that train and compare heads on a feature store: fit-head, heads, bench-heads."""

from __future__ import annotations

from typing import List, Optional

import typer

from protocache.pipeline.bench import BenchConfig
from protocache.pipeline.fit import FitConfig

from .app import app, echo_json, option


@app.command("fit-head")
def fit_head_cmd(
    head: str = typer.Argument(..., help="Head name (see `protocache heads`)."),
    store: str = typer.Option(..., "--store", help="Path of a complete feature store."),
    out: str = typer.Option(..., "--out", help="Run folder to write (weights, config, metrics, log)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file: head config keys; fit options under `fit:`."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Head config key=value (a YAML scalar); repeatable."),
    # unset unless given, so a config file's `fit:` values win over the dataclass defaults
    device: Optional[str] = option(FitConfig, "device", default=None),
    seed: Optional[int] = option(FitConfig, "seed", default=None),
    val_fraction: Optional[float] = option(FitConfig, "val_fraction", default=None),
    epochs: Optional[int] = option(FitConfig, "epochs"),
    threads: Optional[int] = option(FitConfig, "threads"),
    progress: bool = option(FitConfig, "progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Train one head on a store and write RUN/ (refuses a run fitted on another store)."""
    from protocache.pipeline.config import parse_overrides, read_config_file
    from protocache.pipeline.fit import fit_head

    head_cfg, fit_opts = read_config_file(config, FitConfig)
    head_cfg.update(parse_overrides(set_))
    given = {"device": device, "seed": seed, "val_fraction": val_fraction, "epochs": epochs, "threads": threads}
    fit_opts.update({k: v for k, v in given.items() if v is not None})
    fit_opts["progress"] = progress
    # fit_head checks the fit options (a config file's `fit:` included) and the head config before any work
    result = fit_head(head, store, out, head_cfg, FitConfig(**fit_opts))
    m = result.metrics
    if as_json:
        echo_json({k: v for k, v in m.items() if k not in ("loss_curve", "prototype_sources")})
        return
    extra = f", local size {m['local_size']:.1f}" if m.get("local_size") is not None else ""
    val = "n/a" if m.get("val_accuracy") is None else f"{100 * m['val_accuracy']:.2f}%"
    typer.echo(f"{head}: test accuracy {100 * m['test_accuracy']:.2f}% (val {val}, train {100 * m['train_accuracy']:.2f}%), "
               f"{m['prototype_count']} prototypes{extra}, {m['seconds']:.1f}s -> {result.run_dir}")


@app.command("heads")
def heads_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON with each head's config keys.")):
    """List the registered heads (with --json: every config key's default, type and help)."""
    from protocache.pipeline.config import describe_fields
    from protocache.pipeline.heads import head_class, list_heads

    if as_json:
        echo_json({n: describe_fields(head_class(n).config_class) for n in list_heads()})
        return
    for name in list_heads():
        doc = (head_class(name).config_class.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<12} {doc}")


@app.command("bench-heads")
def bench_heads_cmd(
    store: str = typer.Option(..., "--store", help="Path of a complete feature store."),
    seed: int = option(BenchConfig, "seed"),
    heads: Optional[str] = option(BenchConfig, "heads", help="Comma-separated heads (default: all registered)."),
    out: Optional[str] = option(BenchConfig, "out"),
    device: str = option(BenchConfig, "device"),
    epochs: Optional[int] = option(BenchConfig, "epochs"),
    val_fraction: float = option(BenchConfig, "val_fraction"),
    threads: Optional[int] = option(BenchConfig, "threads"),
    progress: bool = option(BenchConfig, "progress"),
    fit_progress: bool = option(BenchConfig, "fit_progress"),
    candidates: Optional[str] = option(BenchConfig, "candidates"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of the table."),
):
    """Fit every head with its defaults on a store: val and test accuracy, gap to the probe, prototypes, seconds."""
    from protocache.pipeline.bench import bench_heads, format_table

    names = tuple(h.strip() for h in heads.split(",") if h.strip()) if heads else None
    rows = bench_heads(BenchConfig(store=store, seed=seed, heads=names, out=out, device=device, epochs=epochs,
                                   val_fraction=val_fraction, threads=threads, progress=progress,
                                   fit_progress=fit_progress, candidates=candidates))
    if as_json:
        echo_json(rows)
        return
    typer.echo(format_table(rows))
