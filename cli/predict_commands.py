"""Commands that use a trained run outside the cache: predict (new images), export (one torch program)."""

from __future__ import annotations

from typing import List, Optional

import typer

from protocache.pipeline.config import field_docs
from protocache.pipeline.export import ExportConfig
from protocache.pipeline.predict import PredictConfig

from .app import app, option


@app.command()
def predict(
    run: str = typer.Argument(..., help=field_docs(PredictConfig)["run"]),
    inputs: List[str] = typer.Argument(..., help=field_docs(PredictConfig)["inputs"]),
    out: str = option(PredictConfig, "out"),
    top_k: int = option(PredictConfig, "top_k"),
    device: str = option(PredictConfig, "device"),
    batch_size: int = option(PredictConfig, "batch_size"),
    num_workers: Optional[int] = option(PredictConfig, "num_workers"),
    weights: Optional[str] = option(PredictConfig, "weights"),
    explain: bool = option(PredictConfig, "explain"),
    top_prototypes: int = option(PredictConfig, "top_prototypes"),
    root: Optional[str] = option(PredictConfig, "root"),
    progress: bool = option(PredictConfig, "progress"),
):
    """Classify new image files with a run (its store's backbone, rebuilt); writes OUT/predictions.parquet."""
    from protocache.pipeline.predict import format_predictions, run_predict

    result = run_predict(PredictConfig(run=run, inputs=tuple(inputs), out=out, top_k=top_k, device=device,
                                       batch_size=batch_size, num_workers=num_workers, weights=weights,
                                       explain=explain, top_prototypes=top_prototypes, root=root,
                                       progress=progress))
    typer.echo(format_predictions(result.table))
    typer.echo(f"wrote {result.predictions}: {result.images} images ({result.unreadable} unreadable) in "
               f"{result.seconds:.1f}s")
    if result.index:
        typer.echo(f"wrote {result.index}: why each image got its top class")


@app.command()
def export(
    run: str = typer.Argument(..., help=field_docs(ExportConfig)["run"]),
    out: str = option(ExportConfig, "out"),
    format: str = option(ExportConfig, "format"),
    device: str = option(ExportConfig, "device"),
    weights: Optional[str] = option(ExportConfig, "weights"),
):
    """Write the run (backbone + head) as one torch.export program (images -> logits) that torch alone loads."""
    from protocache.pipeline.export import export_run

    result = export_run(ExportConfig(run=run, out=out, format=format, device=device, weights=weights))
    if result.fallback_reason:
        typer.echo(f"note: saved as TorchScript instead of a torch.export program ({result.fallback_reason})")
    load = "torch.export.load(PATH).module()" if result.format == "torch.export" else "torch.jit.load(PATH)"
    typer.echo(f"wrote {result.path} ({result.format}; load with {load}) and {result.metadata_path} (class names, "
               f"preprocessing); loaded back: max |logit difference| {result.max_abs_difference:.3g}, "
               f"{result.seconds:.1f}s")
