"""Predict stage: a trained run on new image files, outside the cache.

`protocache predict RUN INPUT... --out DIR` rebuilds the run's backbone from its store
fingerprint (`model.load_model`, which refuses weights of another SHA-256), decodes the
images in DataLoader worker processes as extract does (the one decode rule, `to_rgb`, then
the store's resize rule and normalisation), runs backbone + head in batches and writes
`DIR/predictions.parquet`, one row per input file in order:

    path                  the file
    ok, reason            False and why, for a file that cannot be decoded (never a crash)
    top_k_classes         class indices, most probable first
    top_k_names           their class names
    top_k_probabilities   softmax probabilities
    top_logit             the logit of the top class

INPUT is any mix of files (taken as given) and folders (searched recursively for image files
by extension; hidden folders and the output folder are skipped). DIR is written in a hidden
sibling and swapped in whole (stores/owned.py), so a failed re-run leaves the previous
predictions; DIR must be missing, empty or an earlier predict output (`predict.json`).
`--explain` also writes `DIR/index.html` and `DIR/img/` (explain/predict_page.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from protocache.stores.errors import ProtocacheError

from .config import check_values, check_writable

PREDICT_MARKER = "predict.json"  # marks a folder as a predict output, ours to replace
PREDICTIONS = "predictions.parquet"


@dataclass
class PredictConfig:
    """A trained run on new image files: top-k classes per image into OUT/predictions.parquet."""

    run: str = ""
    """A run folder written by `protocache fit-head`."""
    inputs: tuple[str, ...] = ()
    """Image files and/or folders (searched recursively for image files)."""
    out: str = "predictions"
    """Output folder: OUT/predictions.parquet and OUT/predict.json (replaced whole on a re-run)."""
    top_k: int = 5
    """Classes kept per image, most probable first (at most the run's number of classes)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    batch_size: int = 32
    """Images per forward pass."""
    num_workers: int | None = None
    """Decode worker processes (default, as extract: none with the forward on a CPU, where each batch is decoded
    between forward passes on as many threads as the forward has; cores - 1, at most 16, on CUDA)."""
    weights: str | None = None
    """Backbone weights (a checkpoint path) where the run's store was extracted from a local file;
    their SHA-256 must equal the store's (default: the weights source the store recorded)."""
    explain: bool = False
    """Also write OUT/index.html: for each image, the top class's most contributing prototypes, where each
    fires in it, their training patches (from the run's store and its dataset) and contributions."""
    top_prototypes: int = 5
    """With --explain: prototypes shown per image (largest |contribution| to the top class's logit)."""
    root: str | None = None
    """With --explain: the dataset folder of the run's store, if it moved since extraction."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules), a run, inputs and a writable --out."""
        check_values(self, "predict", flags=True)
        if not self.run:
            raise ProtocacheError("predict: name a run folder (written by `protocache fit-head`)")
        if not self.inputs:
            raise ProtocacheError("predict: name at least one image file or folder to predict")
        check_writable(self.out, "--out")


@dataclass
class PredictResult:
    out: str
    """The output folder."""
    predictions: str
    """Path of predictions.parquet."""
    images: int
    unreadable: int
    seconds: float
    images_per_second: float
    table: Any = None
    """The predictions as a pyarrow Table."""
    index: str | None = None
    """Path of the --explain page (OUT/index.html); None without --explain."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def list_inputs(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """Files as given and image files found under folders (recursively, sorted), each once, in order."""
    from .datasets._common import IMAGE_EXTENSIONS, image_files

    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            if exclude is not None and (exclude == path.resolve() or exclude in path.resolve().parents):
                raise ProtocacheError(f"predict: --out {exclude} {'is' if exclude == path.resolve() else 'holds'} "
                                      f"the input folder {item}; write the predictions to a folder of their own")
            files = image_files(path, recursive=True)
            if exclude is not None:  # an output folder inside an input folder is not input
                files = [f for f in files if exclude not in f.resolve().parents]
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise ProtocacheError(f"predict: input {item} does not exist; pass image files or folders of images")
    first: dict[Path, Path] = {}
    for f in found:  # each file once, where it is first named
        first.setdefault(f.resolve(), f)
    unique = list(first.values())
    if not unique:
        raise ProtocacheError(f"predict: no image files in {', '.join(map(str, inputs))} (searched recursively for "
                              f"{', '.join('.' + e for e in sorted(IMAGE_EXTENSIONS))}); pass image files or folders")
    return unique


class _ImageItems(torch.utils.data.Dataset):
    """Item i (a path or PIL image) decoded and resized to uint8 [H, W, 3] model-input pixels, normalised
    batch-wise later as extract does (`transforms.BatchNormalizer`: the values of the per-image transform);
    a file that fails is (zeros, False, reason)."""

    def __init__(self, items: Sequence[Any], transform, input_size: tuple[int, int]):
        self.items, self.transform, self.input_size = items, transform, input_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from .model import decode_image

        try:
            return index, self.transform.pixels_uint8(decode_image(self.items[index])), True, ""
        except Exception as exc:  # noqa: BLE001 - any decode failure is that file's row, never a crash
            reason = f"{type(exc).__name__}: {exc}"
            return index, torch.zeros(*self.input_size, 3, dtype=torch.uint8), False, reason[:500]


def _table(paths: list[str | None], ok: np.ndarray, reasons: list[str], classes: np.ndarray, probs: np.ndarray,
           top_logit: np.ndarray, class_names: Sequence[str]):
    import pyarrow as pa

    n = len(paths)
    idx = [classes[i].tolist() if ok[i] else [] for i in range(n)]
    return pa.table({
        "path": pa.array(paths, pa.string()),
        "ok": pa.array(ok.tolist(), pa.bool_()),
        "reason": pa.array(reasons, pa.string()),
        "top_k_classes": pa.array(idx, pa.list_(pa.int32())),
        "top_k_names": pa.array([[class_names[c] for c in row] for row in idx], pa.list_(pa.string())),
        "top_k_probabilities": pa.array([probs[i].tolist() if ok[i] else [] for i in range(n)], pa.list_(pa.float32())),
        "top_logit": pa.array([float(top_logit[i]) if ok[i] else None for i in range(n)], pa.float32()),
    })


@torch.inference_mode()
def predict_items(model, items: Sequence[Any], top_k: int = 5, batch_size: int = 32, num_workers: int | None = None,
                  progress: bool = False):
    """Top-k predictions of `model` (a ProtoModel) for image files and/or PIL images -> a pyarrow Table.

    Decoding is planned as extract plans it (`extract_loop.decode_plan`): None decodes each batch on threads
    between forward passes on a CPU and in worker processes on CUDA; N asks for N worker processes."""
    from torch.utils.data import default_collate
    from tqdm.auto import tqdm

    from .extract_loop import decoded_batches
    from .transforms import BatchNormalizer

    check_values(PredictConfig(top_k=top_k, batch_size=batch_size, num_workers=num_workers), "predict", flags=True)
    n, k = len(items), min(int(top_k), model.num_classes)
    source = _ImageItems(items, model.preprocess, model.input_size)
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    loader = decoded_batches(source, batches, num_workers, model.device, collate=default_collate)
    normalize = BatchNormalizer(model.preprocess.mean, model.preprocess.std, model.device, model.channels_last)
    ok = np.zeros(n, dtype=bool)
    reasons = [""] * n
    classes = np.zeros((n, k), dtype=np.int64)
    probs = np.zeros((n, k), dtype=np.float32)
    top_logit = np.zeros(n, dtype=np.float32)
    with tqdm(total=n, unit="img", desc="predict", disable=not progress, mininterval=1.0, file=sys.stderr) as bar:
        for index, images, good, why in loader:
            index, good = index.numpy(), good.numpy().astype(bool)
            for i, g, r in zip(index, good, why):
                ok[i], reasons[i] = g, r
            if good.any():
                rows = index[good]
                logits = model(normalize(images[torch.from_numpy(good)])).float()
                p, c = torch.softmax(logits, dim=1).topk(k, dim=1)
                classes[rows], probs[rows] = c.cpu().numpy(), p.cpu().numpy()
                top_logit[rows] = logits.gather(1, c[:, :1])[:, 0].cpu().numpy()
            bar.update(len(index))
    from .datasets._common import printable_path

    paths = [printable_path(item) if isinstance(item, (str, Path)) else None for item in items]
    return _table(paths, ok, reasons, classes, probs, top_logit, model.class_names)


def _prepare_out(out: Path) -> Path:
    """An empty staging sibling for OUT, which must be missing, empty or an earlier predict output."""
    from protocache.stores import owned

    owned.restore_interrupted(out)
    if out.exists() and not out.is_dir():
        raise ProtocacheError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / PREDICT_MARKER).is_file():
        owned.refuse_foreign_folder(out, "predict output folder")
    return owned.fresh_staging(out)


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every image of cfg.inputs with the run and write OUT/predictions.parquet."""
    import pyarrow.parquet as pq

    from protocache.stores import owned

    from .model import load_model

    started = time.perf_counter()
    cfg.validate()
    out = Path(cfg.out).expanduser()
    files = list_inputs(cfg.inputs, exclude=out.resolve())
    staging = _prepare_out(out)
    try:
        model = load_model(cfg.run, device=cfg.device, weights=cfg.weights)
        page = None
        if cfg.explain:  # the run's store and training scan first: a missing store fails before any image is read
            from .explain.predict_page import PredictPage

            page = PredictPage(model, cfg.top_prototypes, cfg.batch_size, cfg.root)
        t0 = time.perf_counter()
        table = predict_items(model, files, cfg.top_k, cfg.batch_size, cfg.num_workers, cfg.progress)
        seconds = time.perf_counter() - t0
        bad = int(len(files) - sum(table.column("ok").to_pylist()))
        pq.write_table(table, staging / PREDICTIONS)
        explained = page.write(table, staging, files) if page is not None else None
        summary = {"run": str(model.run_dir.resolve()), "head": model.run_config["head"],
                   "backbone": model.fingerprint["backbone"], "weights_sha256": model.weights_sha256,
                   "precision": model.precision, "device": str(model.device), "images": len(files),
                   "unreadable": bad, "seconds": seconds, "explain": explained, "config": asdict(cfg)}
        (staging / PREDICT_MARKER).write_text(json.dumps(summary, indent=2, default=str))
        owned.replace_dir(staging, out)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return PredictResult(str(out), str(out / PREDICTIONS), len(files), bad, time.perf_counter() - started,
                         len(files) / max(seconds, 1e-9), table, str(out / explained["index"]) if explained else None)


def format_predictions(table, limit: int = 20) -> str:
    """A short text table: path, top class and its probability (or why a file was unreadable)."""
    rows = table.to_pylist()
    shown = rows[:limit]
    given = [os.path.abspath(r["path"]) for r in shown if r["path"] is not None]
    common = os.path.commonpath(given) if given else ""
    base = common if common and not all(p == common for p in given) else os.path.dirname(common)
    names = [os.path.relpath(os.path.abspath(r["path"]), base) if base and r["path"] is not None
             else str(r["path"]) for r in shown]
    width = min(60, max([len(n) for n in names] + [4]))
    lines = ([f"(paths under {base})"] if base else []) + [f"{'path':<{width}}  {'prediction':<20} {'prob':>6}"]
    for r, path in zip(shown, names):
        path = path if len(path) <= width else "..." + path[-(width - 3):]
        if r["ok"]:
            lines.append(f"{path:<{width}}  {r['top_k_names'][0]:<20.20} {r['top_k_probabilities'][0]:>6.3f}")
        else:
            lines.append(f"{path:<{width}}  unreadable: {r['reason'][:80]}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)
