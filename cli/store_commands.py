"""Commands that build and inspect feature stores: extract, info, verify, datasets."""

from __future__ import annotations

from typing import Optional

import typer

from protocache.pipeline.config import field_default
from protocache.pipeline.extract import (ExtractConfig, parse_dataset_options, parse_views, run_extract,
                                         run_extract_distributed)
from protocache.stores.errors import ProtocacheError

from .app import app, echo_json, human_bytes, option


@app.command()
def extract(
    dataset: str = option(ExtractConfig, "dataset"),
    root: Optional[str] = option(ExtractConfig, "root"),
    backbone: str = option(ExtractConfig, "backbone"),
    weights: str = option(ExtractConfig, "weights"),
    out: Optional[str] = option(ExtractConfig, "out"),
    batch_size: int = option(ExtractConfig, "batch_size"),
    shard_size: Optional[int] = option(ExtractConfig, "shard_size"),
    chunk_size: int = option(ExtractConfig, "chunk_size"),
    device: str = option(ExtractConfig, "device"),
    precision: str = option(ExtractConfig, "precision"),
    limit: Optional[int] = option(ExtractConfig, "limit"),
    views: str = option(ExtractConfig, "views", default=",".join(field_default(ExtractConfig, "views"))),
    resize: str = option(ExtractConfig, "resize"),
    noise_sigma: float = option(ExtractConfig, "noise_sigma"),
    on_bad_image: str = option(ExtractConfig, "on_bad_image"),
    num_workers: Optional[int] = option(ExtractConfig, "num_workers"),
    threads: Optional[int] = option(ExtractConfig, "threads"),
    compression: str = option(ExtractConfig, "compression"),
    overwrite: bool = option(ExtractConfig, "overwrite"),
    repair: bool = option(ExtractConfig, "repair"),
    progress: bool = option(ExtractConfig, "progress"),
    dataset_option: list[str] = option(ExtractConfig, "dataset_options", "--dataset-option", default=[]),
    scheduler: Optional[str] = typer.Option(None, help="Run on an existing dask cluster (tcp://HOST:PORT)."),
    workers: Optional[int] = typer.Option(None, help="Run on a local dask cluster of N worker processes."),
):
    """Run the frozen backbone over a dataset and write the feature store (resumes a partial one)."""
    cfg = ExtractConfig(dataset=dataset, root=root, backbone=backbone, weights=weights, out=out,
                        batch_size=batch_size, shard_size=shard_size, chunk_size=chunk_size, device=device,
                        precision=precision, limit=limit, views=parse_views(views), resize=resize,
                        noise_sigma=noise_sigma, on_bad_image=on_bad_image, num_workers=num_workers, threads=threads,
                        compression=compression, overwrite=overwrite, repair=repair, progress=progress,
                        dataset_options=parse_dataset_options(dataset_option))
    if workers is not None and workers < 1:
        raise ProtocacheError(f"extract: --workers must be an integer >= 1, got {workers}; leave it out to extract "
                              "in this process")
    if scheduler or workers:
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
    from protocache.stores.layout import describe_compression

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
    typer.echo(f"compression    {describe_compression(report['compression'], report['compression_choice'])}")
    typer.echo(f"size on disk   {human_bytes(report['bytes_on_disk'])} for {human_bytes(report['raw_bytes'])} of "
               "float16 arrays" + (f" (stored / raw {report['stored_over_raw']:.3f})" if report['raw_bytes'] else ""))


@app.command()
def verify(store: str = typer.Argument(..., help="Path of a feature store.")):
    """Check every shard is present, every inner chunk passes its checksum, metadata rows == N, no NaN/Inf.

    Each problem is one `FAIL` line naming the shard and the inner chunk (its image rows); exit 1.
    """
    from protocache.stores import FeatureStore
    from protocache.stores.shards import repair_hint

    opened = FeatureStore.open(store)
    problems = opened.verify()
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}", err=True)
        typer.echo(f"To repair: {repair_hint(opened)}.", err=True)
        raise typer.Exit(1)
    if opened.layout.checksum is None:
        typer.echo("note: this store was written without per-chunk checksums (before they existed), so changed "
                   "bytes that still decode go unnoticed; re-extract it with --overwrite to add them.", err=True)
    typer.echo(f"OK {store}")


@app.command("datasets")
def datasets_cmd():
    """List the registered datasets."""
    from protocache.pipeline.datasets import list_datasets

    for name in list_datasets():
        typer.echo(name)
