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
from protocache.stores.runs import read_run, write_json

from . import metrics as M
from .heads import Head
from .runs import load_run
from .runtime import resolve_device


@dataclass
class EvaluateConfig:
    """What `protocache evaluate` measures on a fitted run, and how."""

    split: str = "test"
    """Split to evaluate (accuracy, consistency, stability, purity)."""
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


def _sims(head, tokens: torch.Tensor) -> np.ndarray:
    """[B, P, T] similarity maps, row-major cells."""
    maps = head.similarity_map(tokens)
    return maps.reshape(maps.shape[0], maps.shape[1], -1).float().cpu().numpy()


def _tokens(batch: dict, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(batch["tokens"]).float().to(device)


def evaluate_run(run_dir: str | Path, cfg: EvaluateConfig | None = None, head: Head | None = None) -> dict[str, Any]:
    """Evaluate RUN on cfg.split of its store; writes RUN/eval-<split>.json (and the confusion
    matrix as RUN/confusion-<split>.png) and returns the results. `head` is the run's head
    when the caller already holds it (e.g. right after fitting); otherwise it is loaded."""
    cfg = cfg or EvaluateConfig()
    run_dir = Path(run_dir)
    if head is None:
        head, config, _ = load_run(run_dir, device=cfg.device)
    else:
        config, _ = read_run(run_dir)
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
    device = resolve_device(cfg.device)
    head = head.to(device).eval()
    class_names = store.attrs.get("class_names", [])
    num_classes = int(store.attrs.get("num_classes") or len(class_names))
    if cfg.split not in set(store.metadata().column("split").to_pylist()):
        raise ProtocacheError(f"{store.path} has no split {cfg.split!r}")
    input_size = tuple(store.attrs["input_size"][1:])
    grid = tuple(store.layout.grid)
    keypoints = _keypoints(store)
    mcfg = cfg.metric
    consistency_box = M.scaled_box(mcfg.consistency_box, input_size, mcfg)
    purity_box = M.scaled_box(mcfg.purity_box, input_size, mcfg)
    class_protos = {c: [int(p) for p in head.class_prototypes(c)] for c in range(num_classes)}

    # ---- one pass over the evaluated split: clean view (and the noise view for stability)
    has_noise = "noise" in store.views
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits = 0
    topk = M.TopK(mcfg.purity_top_k)
    parts = M.PartHitCounts(num_classes, class_protos)
    noise_iter = (store.iter_batches(cfg.split, cfg.batch_size, fields=("tokens",), view="noise")
                  if has_noise and keypoints is not None else None)
    for batch in store.iter_batches(cfg.split, cfg.batch_size, fields=("tokens", "label", "row")):
        tokens = _tokens(batch, device)
        labels, rows = batch["label"], batch["row"]
        logits = head(tokens).float().cpu()
        np.add.at(confusion, (labels, logits.argmax(1).numpy()), 1)
        k5 = min(5, logits.shape[1])
        top5_hits += int((logits.topk(k5, dim=1).indices.numpy() == labels[:, None]).any(1).sum())
        sims = _sims(head, tokens)
        topk.update(sims, rows)
        if keypoints is not None:
            hits = M.prototype_part_hits(sims.reshape(*sims.shape[:2], *grid), keypoints[rows], input_size,
                                         consistency_box)  # [B, P, K]
            noisy_hits = None
            if noise_iter is not None:
                nsims = _sims(head, _tokens(next(noise_iter), device))
                noisy_hits = M.prototype_part_hits(nsims.reshape(*nsims.shape[:2], *grid), keypoints[rows],
                                                   input_size, consistency_box)
            parts.update(hits, keypoints[rows, :, 2] > 0, labels, noisy_hits)

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
        "local_size": None if local_size is None else float(torch.as_tensor(local_size, dtype=torch.float32).mean()),
        "class_prototype_rule": head.class_prototype_rule,
        "metric_config": asdict(mcfg) | {"consistency_box_px": consistency_box, "purity_box_px": purity_box},
    }
    # ---- consistency, stability, purity
    if keypoints is None:
        reason = "the store has no part keypoints (parts_input); extract a dataset with parts, e.g. cub"
        for key in ("consistency", "stability", "purity"):
            results[key] = {"value": None, "reason": reason}
    else:
        results["consistency"] = parts.consistency(mcfg.consistency_threshold)
        results["stability"] = (parts.stability() if has_noise else
                                {"value": None, "reason": "the store has no noise view; re-extract with "
                                                          "--views clean,noise"})
        used = sorted({p for ps in class_protos.values() for p in ps})
        results["purity"] = M.purity(topk, keypoints, store.attrs["part_names"], grid, input_size, purity_box, used)
    results["drift"] = _drift(head, store, cfg, input_size, device)
    return results


def _patch_stream(head, store: FeatureStore, cfg: EvaluateConfig, view: str, device) -> M.PatchStream:
    """Top-k patches and per-image peaks of every prototype over one view of cfg.drift_split
    (an hflip view mirrored back into the clean image's cells)."""
    stream = M.PatchStream(cfg.metric.drift_top_k)
    for batch in store.iter_batches(cfg.drift_split, cfg.batch_size, fields=("tokens", "row"), view=view):
        sims = _sims(head, _tokens(batch, device))
        stream.update(M.mirror_maps(sims, tuple(store.layout.grid)) if view == "hflip" else sims, batch["row"])
    return stream


def _drift(head, store: FeatureStore, cfg: EvaluateConfig, input_size, device) -> dict:
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
        other = load_run(cfg.compare_run, device=str(device)).head
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
