"""Evaluate a fitted head on its store: accuracy and interpretability metrics, one streaming pass per view.

Nothing here runs the backbone: logits and similarity maps come from the cached tokens.
Memory stays bounded: per batch the similarity maps are reduced to peaks, parts-in-box
hits and running top-k patches, never kept for the whole split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError
from protocache.stores.runs import write_json

from . import metrics as M


@dataclass
class EvaluateConfig:
    split: str = "test"
    batch_size: int = 128
    device: str = "auto"
    drift_split: str = "train"  # drift follows each prototype's top training patches
    compare_run: str | None = None  # a second run (other seed) for cross-run drift
    confusion_png: bool = True
    metric: M.MetricConfig = field(default_factory=M.MetricConfig)


class _TopK:
    """Running top-k (value, row, cell) per prototype over a stream of similarity maps."""

    def __init__(self, num_prototypes: int, k: int):
        self.k = k
        self.values = np.full((num_prototypes, 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((num_prototypes, 0), dtype=np.int64)
        self.cells = np.zeros((num_prototypes, 0), dtype=np.int64)

    def update(self, sims: np.ndarray, rows: np.ndarray) -> None:
        b, p, t = sims.shape
        flat = np.moveaxis(sims, 1, 0).reshape(p, b * t)
        k = min(self.k, b * t)
        cand = np.argpartition(-flat, k - 1, axis=1)[:, :k]
        values = np.concatenate([self.values, np.take_along_axis(flat, cand, 1)], axis=1)
        rows_all = np.concatenate([self.rows, rows[cand // t]], axis=1)
        cells_all = np.concatenate([self.cells, cand % t], axis=1)
        # Highest value first; ties broken by (row, cell) so the result does not depend on batching.
        order = np.lexsort((cells_all, rows_all, -values), axis=1)[:, :self.k]
        self.values = np.take_along_axis(values, order, 1)
        self.rows = np.take_along_axis(rows_all, order, 1)
        self.cells = np.take_along_axis(cells_all, order, 1)

    def patch_sets(self) -> list[set[tuple[int, int]]]:
        return [set(zip(r.tolist(), c.tolist())) for r, c in zip(self.rows, self.cells)]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def _class_prototypes(head, num_classes: int) -> dict[int, list[int]]:
    return {c: [int(p) for p in head.class_prototypes(c)] for c in range(num_classes)}


def _sims(head, tokens: torch.Tensor) -> np.ndarray:
    """[B, P, T] similarity maps, row-major cells."""
    maps = head.similarity_map(tokens)
    return maps.reshape(maps.shape[0], maps.shape[1], -1).float().cpu().numpy()


def evaluate_run(run_dir: str | Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Evaluate RUN on cfg.split of its store; writes RUN/eval-<split>.json (and the confusion
    matrix as RUN/confusion-<split>.png) and returns the results."""
    from .fit import load_run

    cfg = cfg or EvaluateConfig()
    run_dir = Path(run_dir)
    head, config, _ = load_run(run_dir)
    store = FeatureStore.open(config["store"]["path"])
    results = {"run": str(run_dir), **evaluate_head(head, store, cfg)}
    if cfg.confusion_png:
        results["confusion_png"] = _confusion_png(np.asarray(results["confusion_matrix"]),
                                                  store.attrs.get("class_names", []),
                                                  run_dir / f"confusion-{cfg.split}.png")
    write_json(run_dir / f"eval-{cfg.split}.json", results)
    return results


@torch.inference_mode()
def evaluate_head(head, store: FeatureStore, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Accuracy and interpretability metrics of a head on one split of a store (nothing written)."""
    cfg = cfg or EvaluateConfig()
    device = _device(cfg.device)
    head = head.to(device).eval()
    num_classes = int(store.attrs.get("num_classes") or len(store.attrs.get("class_names", [])))
    if cfg.split not in set(store.metadata().column("split").to_pylist()):
        raise ProtocacheError(f"{store.path} has no split {cfg.split!r}")
    input_size = tuple(store.attrs["input_size"][1:])
    grid = tuple(store.layout.grid)
    keypoints = _keypoints(store)
    mcfg = cfg.metric
    consistency_box = M._scaled(mcfg.consistency_box, input_size, mcfg)
    purity_box = M._scaled(mcfg.purity_box, input_size, mcfg)
    class_protos = _class_prototypes(head, num_classes)
    num_p = int(head.prototype_count)

    # ---- pass over the evaluated split, clean view (and noise view for stability)
    has_noise = "noise" in store.views
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits = 0
    hits_sum = vis_sum = same_sum = None
    topk = None
    clean_iter = store.iter_batches(cfg.split, cfg.batch_size, fields=("tokens", "label", "row"))
    noise_iter = (store.iter_batches(cfg.split, cfg.batch_size, fields=("tokens",), view="noise")
                  if has_noise and keypoints is not None else None)
    for batch in clean_iter:
        tokens = torch.from_numpy(batch["tokens"]).float().to(device)
        labels, rows = batch["label"], batch["row"]
        logits = head(tokens).float().cpu()
        pred = logits.argmax(1).numpy()
        np.add.at(confusion, (labels, pred), 1)
        k5 = min(5, logits.shape[1])
        top5_hits += int((logits.topk(k5, dim=1).indices.numpy() == labels[:, None]).any(1).sum())
        sims = _sims(head, tokens)
        total_p = sims.shape[1]
        if topk is None:
            topk = _TopK(total_p, mcfg.purity_top_k)
        topk.update(sims, rows)
        if keypoints is not None:
            maps = sims.reshape(sims.shape[0], total_p, *grid)
            hits = M.prototype_part_hits(maps, keypoints[rows], input_size, consistency_box)  # [B, P, K]
            if hits_sum is None:
                hits_sum = np.zeros((num_classes, total_p, hits.shape[2]), dtype=np.int64)
                vis_sum = np.zeros((num_classes, hits.shape[2]), dtype=np.int64)
                same_sum = np.zeros((num_classes, total_p), dtype=np.int64)
            np.add.at(hits_sum, labels, hits.astype(np.int64))
            np.add.at(vis_sum, labels, (keypoints[rows, :, 2] > 0).astype(np.int64))
            if noise_iter is not None:
                noisy = torch.from_numpy(next(noise_iter)["tokens"]).float().to(device)
                nmaps = _sims(head, noisy).reshape(maps.shape)
                nhits = M.prototype_part_hits(nmaps, keypoints[rows], input_size, consistency_box)
                np.add.at(same_sum, labels, (hits == nhits).all(-1).astype(np.int64))

    n = int(confusion.sum())
    if n == 0:
        raise ProtocacheError(f"split {cfg.split!r} of {store.path} has no usable images")
    per_class = np.divide(confusion.diagonal(), confusion.sum(1), out=np.full(num_classes, np.nan),
                          where=confusion.sum(1) > 0)
    images_per_class = np.bincount(store.labels()[store.split_rows(cfg.split)], minlength=num_classes)
    results: dict[str, Any] = {
        "split": cfg.split,
        "num_images": n,
        "top1": float(confusion.diagonal().sum() / n),
        "top5": float(top5_hits / n),
        "per_class_accuracy": {store.attrs["class_names"][c] if c < len(store.attrs.get("class_names", [])) else str(c):
                               (None if np.isnan(v) else float(v)) for c, v in enumerate(per_class)},
        "confusion_matrix": confusion.tolist(),
        "prototype_count": num_p,
        "local_size": _local_size(head, num_classes),
        "class_prototype_rule": getattr(head, "class_prototype_rule", "head.class_prototypes(c)"),
        "metric_config": asdict(mcfg) | {"consistency_box_px": consistency_box, "purity_box_px": purity_box},
    }
    # ---- consistency, stability, purity
    if keypoints is None:
        reason = "the store has no part keypoints (parts_input); extract a dataset with parts, e.g. cub"
        results["consistency"] = {"value": None, "reason": reason}
        results["stability"] = {"value": None, "reason": reason}
        results["purity"] = {"value": None, "reason": reason}
    else:
        results["consistency"] = _consistency_from_sums(hits_sum, vis_sum, class_protos, mcfg.consistency_threshold)
        if has_noise:
            results["stability"] = _stability_from_sums(same_sum, images_per_class, class_protos)
        else:
            results["stability"] = {"value": None, "reason": "the store has no noise view; re-extract with "
                                                             "--views clean,noise"}
        used = sorted({p for ps in class_protos.values() for p in ps})
        results["purity"] = _purity_from_topk(topk, keypoints, store, input_size, purity_box, used)
    # ---- drift
    results["drift"] = _drift(head, store, cfg, input_size, device)
    return results


def _local_size(head, num_classes: int) -> float | None:
    """Mean number of prototypes per class with last-layer weight > 0.1 (where the head has that notion)."""
    if hasattr(head, "local_size"):
        value = head.local_size() if callable(head.local_size) else head.local_size
        if value is None:
            return None
        return float(torch.as_tensor(value, dtype=torch.float32).mean())
    return None


def _consistency_from_sums(hits_sum, vis_sum, class_protos, threshold) -> dict:
    scores, best = [], []
    for c, protos in class_protos.items():
        seen = vis_sum[c]
        if seen.sum() == 0:
            continue
        for p in protos:
            freq = np.divide(hits_sum[c, p], seen, out=np.zeros(len(seen)), where=seen > 0)
            best.append(float(freq.max()))
            scores.append(float(freq.max() >= threshold))
    return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores),
            "mean_best_part_frequency": float(np.mean(best)) if best else None}


def _stability_from_sums(same_sum, images_per_class, class_protos) -> dict:
    scores = [same_sum[c, p] / images_per_class[c] for c, ps in class_protos.items() if images_per_class[c]
              for p in ps]
    return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores)}


def _purity_from_topk(topk: _TopK, keypoints, store, input_size, box, prototypes) -> dict:
    merged, merge_index = M.merge_left_right(store.attrs["part_names"])
    centers = M.cell_centers(tuple(store.layout.grid), input_size)
    scores = []
    for p in prototypes:
        boxes = M.box_around(centers[topk.cells[p]], box, input_size)
        hits = M.parts_in_boxes(boxes[:, None, :], keypoints[topk.rows[p]])[:, 0, :]
        merged_hits = M.merge_part_hits(hits, merge_index, len(merged))
        scores.append(float(merged_hits.sum(0).max() / max(len(boxes), 1)))
    return {"value": float(np.mean(scores)) if scores else None, "prototypes": len(scores),
            "top_k": topk.k, "merged_parts": merged}


def _stream_topk_and_peaks(head, store, split, view, batch_size, device, k, mirror=False):
    """Top-k patches per prototype and per-image peaks over one view of a split."""
    topk, peaks = None, []
    for batch in store.iter_batches(split, batch_size, fields=("tokens", "row"), view=view):
        tokens = torch.from_numpy(batch["tokens"]).float().to(device)
        sims = _sims(head, tokens)
        if mirror:  # compare in the clean image's coordinates
            b, p, _ = sims.shape
            sims = sims.reshape(b, p, *store.layout.grid)[..., ::-1].reshape(b, p, -1)
        if topk is None:
            topk = _TopK(sims.shape[1], k)
        topk.update(np.ascontiguousarray(sims), batch["row"])
        peaks.append(sims.argmax(-1))
    return topk, (np.concatenate(peaks) if peaks else None)


def _drift(head, store, cfg: EvaluateConfig, input_size, device) -> dict:
    views = [v for v in ("noise", "hflip") if v in store.views]
    k = cfg.metric.drift_top_k
    out: dict[str, Any] = {"split": cfg.drift_split, "top_k": k}
    if not views and not cfg.compare_run:
        return {"value": None, "reason": "the store has only the clean view and no --compare run; re-extract "
                                         "with --views clean,noise (or hflip), or pass a second run"}
    clean_topk, clean_peaks = _stream_topk_and_peaks(head, store, cfg.drift_split, "clean", cfg.batch_size,
                                                     device, k)
    centers = M.cell_centers(tuple(store.layout.grid), input_size)
    diag = float(np.hypot(*input_size))
    for view in views:
        topk, peaks = _stream_topk_and_peaks(head, store, cfg.drift_split, view, cfg.batch_size, device, k,
                                             mirror=(view == "hflip"))
        overlap = [len(a & b) / k for a, b in zip(clean_topk.patch_sets(), topk.patch_sets())]
        shift = np.linalg.norm(centers[clean_peaks] - centers[peaks], axis=-1).mean(0) / diag
        out[view] = {"topk_overlap": float(np.mean(overlap)), "peak_shift": float(shift.mean())}
    if cfg.compare_run:
        from scipy.optimize import linear_sum_assignment

        from .fit import load_run

        other, _, _ = load_run(cfg.compare_run)
        other = other.to(device).eval()
        other_topk, _ = _stream_topk_and_peaks(other, store, cfg.drift_split, "clean", cfg.batch_size, device, k)
        a_sets, b_sets = clean_topk.patch_sets(), other_topk.patch_sets()
        overlap = np.array([[len(a & b) / k for b in b_sets] for a in a_sets])
        ri, ci = linear_sum_assignment(-overlap)  # match prototypes across runs by shared evidence
        out["other_run"] = {"run": str(cfg.compare_run), "matched_topk_overlap": float(overlap[ri, ci].mean()),
                            "matched_pairs": int(len(ri))}
    # One headline number: how much of a prototype's top-k evidence survives the perturbation.
    survivals = [out[v]["topk_overlap"] for v in views]
    if "other_run" in out:
        survivals.append(out["other_run"]["matched_topk_overlap"])
    out["value"] = float(1.0 - np.mean(survivals))
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
