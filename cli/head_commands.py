"""Commands that train and compare heads on a feature store: fit-head, heads, bench-heads."""

from __future__ import annotations

from typing import List, Optional

import typer

from .app import app, echo_json


@app.command("fit-head")
def fit_head_cmd(
    head: str = typer.Argument(..., help="Head name (see `protocache heads`)."),
    store: str = typer.Option(..., "--store", help="Path of a complete feature store."),
    out: str = typer.Option(..., "--out", help="Run folder to write (weights, config, metrics, log)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file: head config keys; fit options under `fit:`."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Head config key=value (a YAML scalar); repeatable."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (default auto)."),
    seed: Optional[int] = typer.Option(None, help="Seed of everything random (default 0)."),
    epochs: Optional[int] = typer.Option(None, help="Override the head's epochs."),
    threads: Optional[int] = typer.Option(None, help="Torch threads; pin for byte-identical CPU re-runs."),
    progress: bool = typer.Option(True, help="Show progress bars and log lines on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Train one head on a store and write RUN/ (refuses a run fitted on another store)."""
    from protocache.pipeline.fit import FitConfig, fit_head, parse_overrides, read_config_file

    head_cfg, fit_opts = read_config_file(config)
    head_cfg.update(parse_overrides(set_))
    given = {"device": device, "seed": seed, "epochs": epochs, "threads": threads}
    fit_opts.update({k: v for k, v in given.items() if v is not None})
    fit_opts["progress"] = progress
    result = fit_head(head, store, out, head_cfg, FitConfig(**fit_opts))
    m = result.metrics
    if as_json:
        echo_json({k: v for k, v in m.items() if k not in ("loss_curve", "prototype_sources")})
        return
    extra = f", local size {m['local_size']:.1f}" if m.get("local_size") is not None else ""
    typer.echo(f"{head}: test accuracy {100 * m['test_accuracy']:.2f}% (train {100 * m['train_accuracy']:.2f}%), "
               f"{m['prototype_count']} prototypes{extra}, {m['seconds']:.1f}s -> {result.run_dir}")


@app.command("heads")
def heads_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON with each head's config keys.")):
    """List the registered heads."""
    import dataclasses

    from protocache.pipeline.heads import head_class, list_heads

    if as_json:
        echo_json({n: {f.name: (None if f.default is dataclasses.MISSING else f.default)
                       for f in dataclasses.fields(head_class(n).config_class)} for n in list_heads()})
        return
    for name in list_heads():
        doc = (head_class(name).config_class.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<12} {doc}")


@app.command("bench-heads")
def bench_heads_cmd(
    store: str = typer.Option(..., "--store", help="Path of a complete feature store."),
    seed: int = typer.Option(0, help="Seed of every fit."),
    heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default: all registered)."),
    out: Optional[str] = typer.Option(None, help="Keep the runs under OUT/<head> (default: temporary)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    epochs: Optional[int] = typer.Option(None, help="Override every head's epochs (quick runs)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads."),
    progress: bool = typer.Option(False, help="Show progress bars and log lines on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of the table."),
):
    """Fit every head with its defaults on a store: test accuracy, gap to the probe, prototypes, seconds."""
    from protocache.pipeline.bench import BenchConfig, bench_heads, format_table

    names = tuple(h.strip() for h in heads.split(",") if h.strip()) if heads else None
    rows = bench_heads(BenchConfig(store=store, seed=seed, heads=names, out=out, device=device, epochs=epochs,
                                   threads=threads, progress=progress))
    if as_json:
        echo_json(rows)
        return
    typer.echo(format_table(rows))
