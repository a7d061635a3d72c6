"""Evaluate a fitted head on its store: accuracy and interpretability metrics, one streaming pass per view.

Nothing here runs the backbone: logits and similarity maps come from the cache. Each head
gets exactly the arrays it declares (`head.inputs`), as in fit. Per batch the maps are reduced
to the evidence rows the metrics are computed from (see `metrics`): each prototype's running
top images for purity, and the bicubic peak of every (image, prototype of its class) pair on
the clean and noise views for consistency and stability. `evaluate_run` writes those rows to
RUN/eval-<split>/purity.parquet and consistency.parquet; the numbers are computed from exactly
those tables (plus the store's `parts_input`), so anyone can recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError
from protocache.stores.runs import WEIGHTS, read_run, write_json

from . import metrics as M
from .config import check_values
from .heads import Head
from .runs import check_run_store, load_run, open_run_store
from .runtime import resolve_device

EVIDENCE = ("purity", "consistency")  # RUN/eval-<split>/<name>.parquet


@dataclass
class EvaluateConfig:
    """What `protocache evaluate` measures on a fitted run, and how."""

    split: str = "test"
    """Split to evaluate (accuracy, consistency, stability, purity). PIP-Net's published purity ranks the
    training images: --split train gives the comparable number."""
    batch_size: int = 128
    """Images per batch."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    drift_split: str = "train"
    """Split whose top patches define prototype drift (drift follows each prototype's top training patches)."""
    compare_run: str | None = None
    """A second run (other seed) for cross-run prototype drift."""
    confusion_png: bool = True
    """Also draw the confusion matrix as RUN/confusion-<split>.png."""
    metric: M.MetricConfig = field(default_factory=M.MetricConfig)
    """Boxes, thresholds and top-k sizes of the interpretability metrics."""

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules), the metrics' sizes too, before any work."""
        check_values(self, "evaluate", flags=True)
        check_values(self.metric, "evaluate metric")


def _keypoints(store: FeatureStore) -> np.ndarray | None:
    """[N, K, 3] part keypoints in model-input pixels, or None when the store has none."""
    table = store.metadata()
    if "parts_input" not in table.column_names or not store.attrs.get("part_names"):
        return None
    k = len(store.attrs["part_names"])
    out = np.zeros((store.num_images, k, 3), dtype=np.float32)
    for i, parts in enumerate(table.column("parts_input").to_pylist()):
        if parts:
            out[i] = np.asarray(parts, dtype=np.float32)
    return out


def head_fields(head) -> tuple[str, ...]:
    """The store arrays a batch needs: the tokens (for the maps), the head's own inputs, label and row."""
    return tuple(dict.fromkeys(("tokens",) + tuple(head.inputs) + ("label", "row")))


def head_logits(head, batch: dict, tokens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """head(tokens, pooled=pooled) with exactly the inputs the head declares (`head.inputs`), as fit does."""
    pooled = (torch.from_numpy(np.ascontiguousarray(batch["pooled"])).float().to(device)
              if "pooled" in head.inputs else None)
    return head(tokens if "tokens" in head.inputs else None, pooled=pooled)


def _tokens(batch: dict, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch["tokens"])).float().to(device)


def metric_config(store: FeatureStore, cfg: M.MetricConfig) -> dict[str, Any]:
    """The geometry the metrics used, in the store's model-input pixels (recorded in the eval JSON)."""
    input_size = tuple(int(v) for v in store.attrs["input_size"][-2:])
    return {"input_size": list(input_size), "grid": [int(v) for v in store.layout.grid],
            "purity_patch": M.scaled_box(cfg.purity_patch, input_size, cfg), "purity_top_k": cfg.purity_top_k,
            "consistency_box": M.scaled_box(cfg.consistency_box, input_size, cfg),
            "threshold": cfg.consistency_threshold, "reference_size": cfg.reference_size,
            "noise_sigma_pixels": store.attrs.get("noise_sigma_pixels"), "drift_top_k": cfg.drift_top_k}


def _weights_identity(run_dir: Path) -> tuple[int, int, int] | None:
    """Which weights file RUN holds now (inode, size, mtime): a re-fit swaps in another."""
    try:
        st = (run_dir / WEIGHTS).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def evaluate_run(run_dir: str | Path, cfg: EvaluateConfig | None = None, head: Head | None = None) -> dict[str, Any]:
    """Evaluate RUN on cfg.split of its store; writes RUN/eval-<split>.json, the evidence rows under
    RUN/eval-<split>/ (and the confusion matrix as RUN/confusion-<split>.png) and returns the results.
    `head` is the run's head when the caller already holds it (e.g. right after fitting)."""
    cfg = cfg or EvaluateConfig()
    cfg.validate()
    run_dir = Path(run_dir)
    fitted = _weights_identity(run_dir)  # a re-fit swapped in meanwhile must not get this head's results
    if head is None:
        head, config, run_metrics = load_run(run_dir, device=cfg.device)
    else:
        config, run_metrics = read_run(run_dir)
    store = open_run_store(run_dir, config)  # refused if re-extracted since the fit; "val": the fit's rows
    results, evidence = _evaluate(head, store, cfg)
    if _weights_identity(run_dir) != fitted:
        raise ProtocacheError(f"{run_dir} was fitted again while it was being evaluated, so these results describe "
                              "the head it held before and were not written; evaluate it again")
    results = {"run": str(run_dir), **results}
    if "local_size_before_topk" in run_metrics:
        results["local_size_before_topk"] = run_metrics["local_size_before_topk"]
    folder = run_dir / f"eval-{cfg.split}"
    folder.mkdir(exist_ok=True)
    results["evidence"] = {}
    for name in EVIDENCE:
        path = folder / f"{name}.parquet"
        if evidence.get(name) is None:
            path.unlink(missing_ok=True)  # never leave rows of an earlier evaluation next to these results
            continue
        tmp = folder / f".{name}.parquet.tmp"
        pq.write_table(evidence[name], tmp)
        tmp.replace(path)
        results["evidence"][name] = str(path.relative_to(run_dir))
    if cfg.confusion_png:
        results["confusion_png"] = _confusion_png(np.asarray(results["confusion_matrix"]),
                                                  store.attrs.get("class_names", []),
                                                  run_dir / f"confusion-{cfg.split}.png")
    write_json(run_dir / f"eval-{cfg.split}.json", results)
    return results


def evaluate_head(head, store: FeatureStore, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Accuracy and interpretability metrics of a head on one split of a store (nothing written)."""
    return _evaluate(head, store, cfg or EvaluateConfig())[0]


@torch.inference_mode()
def _evaluate(head, store: FeatureStore, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, pa.Table | None]]:
    """(results, evidence tables {"purity", "consistency"}; None where the metric has no rows)."""
    device = resolve_device(cfg.device)
    head = head.to(device).eval()
    class_names = store.attrs.get("class_names", [])
    num_classes = int(store.attrs.get("num_classes") or len(class_names))
    store.require_split(cfg.split, "--split")
    store.require_split(cfg.drift_split, "--drift-split")
    mconf = metric_config(store, cfg.metric)
    input_size = tuple(mconf["input_size"])
    keypoints = _keypoints(store)
    class_protos = {c: [int(p) for p in head.class_prototypes(c)] for c in range(num_classes)}
    used = sorted({p for ps in class_protos.values() for p in ps})

    # ---- one pass over the evaluated split: clean view (and the noise view for stability)
    has_noise = "noise" in store.views
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits = 0
    top = M.TopImages(int(head.prototype_count), cfg.metric.purity_top_k)
    pairs = _PeakRows(class_protos, input_size) if keypoints is not None else None
    noise_iter = (store.iter_batches(cfg.split, cfg.batch_size, fields=("tokens", "row"), view="noise")
                  if has_noise and pairs is not None else None)
    for batch in store.iter_batches(cfg.split, cfg.batch_size, fields=head_fields(head)):
        tokens = _tokens(batch, device)
        labels, rows = np.asarray(batch["label"], dtype=np.int64), np.asarray(batch["row"], dtype=np.int64)
        logits = head_logits(head, batch, tokens, device).float().cpu()
        np.add.at(confusion, (labels, logits.argmax(1).numpy()), 1)
        k5 = min(5, logits.shape[1])
        top5_hits += int((logits.topk(k5, dim=1).indices.numpy() == labels[:, None]).any(1).sum())
        maps = head.similarity_map(tokens).float()
        top.update(head.presence(tokens).float().cpu().numpy(), M.pipnet_peak_cells(maps), rows)
        if pairs is not None:
            noise_maps = None
            if noise_iter is not None:
                noisy = next(noise_iter)
                if not np.array_equal(noisy["row"], rows):
                    raise ProtocacheError(f"{store.path}: the noise view's batches do not match the clean view's")
                noise_maps = head.similarity_map(_tokens(noisy, device)).float()
            pairs.update(maps, labels, rows, noise_maps)

    n = int(confusion.sum())
    if n == 0:
        raise ProtocacheError(f"split {cfg.split!r} of {store.path} has no usable images")
    per_class = np.divide(confusion.diagonal(), confusion.sum(1), out=np.full(num_classes, np.nan),
                          where=confusion.sum(1) > 0)
    local_size = head.local_size()
    results: dict[str, Any] = {
        "split": cfg.split,
        "num_images": n,
        "top1": float(confusion.diagonal().sum() / n),
        "top5": float(top5_hits / n),
        "per_class_accuracy": {class_names[c] if c < len(class_names) else str(c):
                               (None if np.isnan(v) else float(v)) for c, v in enumerate(per_class)},
        "confusion_matrix": confusion.tolist(),
        "prototype_count": int(head.prototype_count),
        "prototypes_used": len(used),
        "local_size": None if local_size is None else float(torch.as_tensor(local_size).float().mean()),
        "class_prototype_rule": head.class_prototype_rule,
        "class_prototype_k": head.class_prototype_k,
        "metric_config": mconf,
    }
    image_ids = np.asarray([str(i) for i in store.metadata().column("image_id").to_pylist()], dtype=object)
    evidence = {"purity": purity_table(top, used, image_ids, store.layout.grid, input_size, mconf["purity_patch"]),
                "consistency": pairs.table(image_ids, has_noise) if pairs is not None else None}

    # ---- consistency, stability, purity: from the evidence rows and the store's parts
    if keypoints is None:
        reason = "the store has no part keypoints (parts_input); extract a dataset with parts, e.g. cub"
        for key in ("consistency", "stability", "purity"):
            results[key] = {"value": None, "reason": reason}
    else:
        row_of = {i: r for r, i in enumerate(image_ids.tolist())}
        results.update(metrics_from_evidence(evidence, keypoints, row_of, store.attrs["part_names"], mconf))
        results["purity"] = {**results["purity"], "split": cfg.split, "top_k": cfg.metric.purity_top_k}
        if not has_noise:
            results["stability"] = {"value": None, "reason": "the store has no noise view; re-extract with "
                                                             "--views clean,noise"}
    results["drift"] = _drift(head, store, cfg, input_size, device)
    return results, evidence


class _PeakRows:
    """The bicubic peak of every (image, prototype of the image's class), on the clean and noise views."""

    def __init__(self, class_protos: dict[int, list[int]], input_size: tuple[int, int]):
        self.class_protos, self.input_size = class_protos, input_size
        self.rows: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.protos: list[np.ndarray] = []
        self.peaks: list[np.ndarray] = []
        self.noise_peaks: list[np.ndarray] = []

    def update(self, maps: torch.Tensor, labels: np.ndarray, rows: np.ndarray, noise_maps: torch.Tensor | None):
        """maps, noise_maps [B, P, H, W]; labels, rows [B]."""
        b_idx = [b for b, c in enumerate(labels.tolist()) for _ in self.class_protos.get(c, [])]
        p_idx = [p for c in labels.tolist() for p in self.class_protos.get(c, [])]
        if not b_idx:
            return
        bi, pi = torch.as_tensor(b_idx, device=maps.device), torch.as_tensor(p_idx, device=maps.device)
        self.rows.append(rows[b_idx])
        self.labels.append(labels[b_idx])
        self.protos.append(np.asarray(p_idx, dtype=np.int64))
        self.peaks.append(M.bicubic_peaks(maps[bi, pi], self.input_size))
        if noise_maps is not None:
            self.noise_peaks.append(M.bicubic_peaks(noise_maps[bi, pi], self.input_size))

    def table(self, image_ids: np.ndarray, has_noise: bool) -> pa.Table:
        cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
        rows, peaks = cat(self.rows, (0,)).astype(np.int64), cat(self.peaks, (0, 2))
        noise = cat(self.noise_peaks, (0, 2)) if has_noise else None
        return pa.table({
            "image_id": pa.array(image_ids[rows].tolist(), type=pa.string()),
            "label": pa.array(cat(self.labels, (0,)).astype(np.int64)),
            "prototype": pa.array(cat(self.protos, (0,)).astype(np.int64)),
            "peak_x": pa.array(peaks[:, 0]), "peak_y": pa.array(peaks[:, 1]),
            "noise_peak_x": pa.array(noise[:, 0] if noise is not None else [None] * len(rows), type=pa.float64()),
            "noise_peak_y": pa.array(noise[:, 1] if noise is not None else [None] * len(rows), type=pa.float64()),
        })


def purity_table(top: M.TopImages, prototypes: list[int], image_ids: np.ndarray, grid, input_size,
                 patch: float) -> pa.Table:
    """One row per (prototype some class uses, rank of one of its top images): the rows purity scores."""
    protos = np.asarray(prototypes, dtype=np.int64)
    k = top.rows.shape[1]
    centres = M.pipnet_patch_centres(top.cells[protos], tuple(grid), input_size, patch).reshape(-1, 2)
    return pa.table({
        "prototype": pa.array(np.repeat(protos, k)),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int64), len(protos))),
        "image_id": pa.array(image_ids[top.rows[protos].reshape(-1)].tolist(), type=pa.string()),
        "presence": pa.array(top.values[protos].reshape(-1).astype(np.float64)),
        "peak_x": pa.array(centres[:, 0]), "peak_y": pa.array(centres[:, 1]),
    })


def metrics_from_evidence(evidence: dict[str, pa.Table | None], keypoints: np.ndarray, row_of: dict[str, int],
                          part_names, mconf: dict[str, Any]) -> dict[str, dict]:
    """Purity, consistency and stability from the evidence tables and the parts ([N, K, 3] by store row)."""
    input_size = tuple(mconf["input_size"])
    out: dict[str, dict] = {}
    t = evidence["purity"]
    kp = keypoints[[row_of[i] for i in t.column("image_id").to_pylist()]].reshape(-1, len(part_names), 3)
    centres = np.stack([t.column("peak_x").to_numpy(), t.column("peak_y").to_numpy()], axis=1)
    out["purity"] = M.purity(t.column("prototype").to_numpy(), centres, kp, part_names, mconf["purity_patch"],
                             input_size)
    t = evidence["consistency"]
    kp = keypoints[[row_of[i] for i in t.column("image_id").to_pylist()]].reshape(-1, len(part_names), 3)
    labels, protos = t.column("label").to_numpy(), t.column("prototype").to_numpy()
    peaks = np.stack([t.column("peak_x").to_numpy(), t.column("peak_y").to_numpy()], axis=1)
    hits = M.box_hits(peaks, kp, mconf["consistency_box"], input_size)
    out["consistency"] = M.consistency(labels, protos, hits, kp[..., 2] > 0, mconf["threshold"])
    if t.column("noise_peak_x").null_count == 0:
        noisy = np.stack([t.column("noise_peak_x").to_numpy(), t.column("noise_peak_y").to_numpy()], axis=1)
        out["stability"] = M.stability(labels, protos, hits, M.box_hits(noisy, kp, mconf["consistency_box"],
                                                                       input_size))
    return out


def _patch_stream(head, store: FeatureStore, cfg: EvaluateConfig, view: str, device) -> M.PatchStream:
    """Top-k patches and per-image peaks of every prototype over one view of cfg.drift_split
    (an hflip view mirrored back into the clean image's cells)."""
    stream = M.PatchStream(cfg.metric.drift_top_k)
    for batch in store.iter_batches(cfg.drift_split, cfg.batch_size, fields=("tokens", "row"), view=view):
        maps = head.similarity_map(_tokens(batch, device))
        sims = maps.reshape(maps.shape[0], maps.shape[1], -1).float().cpu().numpy()
        stream.update(M.mirror_maps(sims, tuple(store.layout.grid)) if view == "hflip" else sims, batch["row"])
    return stream


def _drift(head, store: FeatureStore, cfg: EvaluateConfig, input_size, device) -> dict:
    """Drift (ours; see `metrics.view_drift`): 1 - the mean share of each prototype's top-k training
    patches that survive the noise / hflip views and, with --compare, a second run."""
    views = [v for v in ("noise", "hflip") if v in store.views]
    if not views and not cfg.compare_run:
        return {"value": None, "reason": "the store has only the clean view and no --compare run; re-extract "
                                         "with --views clean,noise (or hflip), or pass a second run"}
    out: dict[str, Any] = {"split": cfg.drift_split, "top_k": cfg.metric.drift_top_k}
    clean = _patch_stream(head, store, cfg, "clean", device)
    for view in views:
        out[view] = M.view_drift(clean, _patch_stream(head, store, cfg, view, device), tuple(store.layout.grid),
                                 input_size)
    survivals = [out[v]["topk_overlap"] for v in views]
    if cfg.compare_run:
        other_run = load_run(cfg.compare_run, device=str(device))
        check_run_store(cfg.compare_run, other_run.config, store)  # the second run is fitted on this store too
        other = other_run.head
        matched = M.matched_overlap(clean.topk, _patch_stream(other, store, cfg, "clean", device).topk)
        out["other_run"] = {"run": str(cfg.compare_run), **matched}
        survivals.append(matched["matched_topk_overlap"])
    out["value"] = M.drift_value(survivals)
    return out


def _confusion_png(confusion: np.ndarray, class_names, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    c = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(min(2 + 0.4 * c, 20), min(2 + 0.4 * c, 20)))
    ax.imshow(confusion, cmap="Blues")
    if c <= 30:
        names = [str(n) for n in class_names] or [str(i) for i in range(c)]
        ax.set_xticks(range(c), names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


@torch.no_grad()
def shuffle_prototypes(head, seed: int = 0):
    """A copy of `head` whose prototypes lose their meaning: each prototype vector's channels
    are permuted (norms and the last layer stay), the baseline that interpretability metrics
    of a trained head are compared with."""
    import copy

    shuffled = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(seed)
    for name in ("codes", "prototypes", "rotation"):  # ProtoQuant, ProtoPool, InfoDisent
        tensor = getattr(shuffled, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.ndim == 2:
            for i in range(tensor.shape[0]):
                tensor[i] = tensor[i, torch.randperm(tensor.shape[1], generator=gen)]
            return shuffled
    raise ProtocacheError(f"{type(head).__name__} has no prototype vectors to shuffle")
