"""Commands that build and inspect feature stores: extract, info, verify, datasets."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, echo_json, human_bytes


@app.command()
def extract(
    dataset: str = typer.Option("digits", help="Dataset name (see `protocache datasets`)."),
    root: Optional[str] = typer.Option(None, help="Dataset folder, for datasets read from disk."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="timm model name."),
    weights: str = typer.Option("auto", help="auto | shipped | hub | random | PATH to a checkpoint."),
    out: Optional[str] = typer.Option(None, help="Store path (default cache/<dataset>_<backbone>.zarr)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    shard_size: Optional[int] = typer.Option(None, help="Images per shard (default: ~150 MB of tokens)."),
    chunk_size: int = typer.Option(8, help="Images per inner Zarr chunk."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware is fast at it) | fp32 | bf16."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    views: str = typer.Option("clean", help="Comma-separated views to cache: clean,hflip,noise."),
    noise_sigma: float = typer.Option(0.2, help="Std of the noise view in normalised image space."),
    on_bad_image: str = typer.Option("error", help="error (stop with the path) | skip (record ok=false)."),
    num_workers: Optional[int] = typer.Option(None, help="Decode worker processes."),
    threads: Optional[int] = typer.Option(None, help="Torch threads; pin for byte-identical re-runs."),
    compressor: Optional[str] = typer.Option(None, help="none | zstd[:level] for the arrays."),
    overwrite: bool = typer.Option(False, help="Delete an existing store at --out first."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    dataset_option: list[str] = typer.Option([], "--dataset-option",
                                             help="KEY=VALUE passed to the dataset (repeatable), e.g. crop=false."),
    scheduler: Optional[str] = typer.Option(None, help="Run on an existing dask cluster (tcp://HOST:PORT)."),
    workers: Optional[int] = typer.Option(None, help="Run on a local dask cluster of N worker processes."),
):
    """Run the frozen backbone over a dataset and write the feature store (resumes a partial one)."""
    from protocache.pipeline.extract import ExtractConfig, parse_dataset_options, parse_views, run_extract

    cfg = ExtractConfig(dataset=dataset, root=root, backbone=backbone, weights=weights, out=out,
                        batch_size=batch_size, shard_size=shard_size, chunk_size=chunk_size, device=device,
                        precision=precision, limit=limit, views=parse_views(views), noise_sigma=noise_sigma,
                        on_bad_image=on_bad_image, num_workers=num_workers, threads=threads,
                        compressor=compressor, overwrite=overwrite, progress=progress,
                        dataset_options=parse_dataset_options(dataset_option))
    if scheduler or workers:
        from protocache.pipeline.extract import run_extract_distributed

        result = run_extract_distributed(cfg, scheduler=scheduler, workers=workers)
    else:
        result = run_extract(cfg)
    if not result.nothing_to_do:
        typer.echo(f"wrote {result.shards_written_now} shard(s), {result.images_written_now} images "
                   f"in {result.seconds:.1f}s ({result.images_per_second:.1f} images/s) to {result.store_path}")
    if result.bad_images:
        typer.echo(f"{len(result.bad_images)} image(s) could not be read and are marked ok=false: "
                   + ", ".join(result.bad_images[:5]) + (" ..." if len(result.bad_images) > 5 else ""))


@app.command()
def info(store: str = typer.Argument(..., help="Path of a feature store."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Shape, shards, views, fingerprint and size of a store."""
    from protocache.stores import FeatureStore

    report = FeatureStore.open(store).info()
    if as_json:
        echo_json(report)
        return
    fp = report["fingerprint"]
    typer.echo(f"store          {report['path']}")
    typer.echo(f"images         {report['num_images']}  (tokens {report['num_images']} x {report['num_tokens']} "
               f"x {report['dim']}, grid {report['grid'][0]}x{report['grid'][1]})")
    typer.echo(f"shards         {report['shards_written']} / {report['shards_total']} written "
               f"({report['shard_size']} images each){'' if report['complete'] else '  INCOMPLETE'}")
    typer.echo(f"views          {', '.join(report['views'])}")
    typer.echo(f"logits         {report['num_logits'] or 'none'}")
    typer.echo(f"dataset        {fp['dataset']} (manifest {fp['manifest_sha256'][:12]})")
    typer.echo(f"backbone       {fp['backbone']}  weights {fp['weights_source']} (sha256 {fp['weights_sha256'][:12]})")
    typer.echo(f"precision      {fp['precision']} compute, {fp['dtype']} on disk")
    typer.echo(f"size on disk   {human_bytes(report['bytes_on_disk'])}")


@app.command()
def verify(store: str = typer.Argument(..., help="Path of a feature store.")):
    """Check every shard is present and readable, metadata rows == N, and no NaN/Inf in tokens."""
    from protocache.stores import FeatureStore

    problems = FeatureStore.open(store).verify()
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {store}")


@app.command("datasets")
def datasets_cmd():
    """List the registered datasets."""
    from protocache.pipeline.datasets import list_datasets

    for name in list_datasets():
        typer.echo(name)
