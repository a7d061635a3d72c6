"""Interpretability metrics computed from similarity maps on the cached token grid.

Recipes:
- consistency and stability: Huang et al., "Evaluation and Improvement of Interpretability
  for Self-Explainable Part-Prototype Networks" (arXiv 2212.05946). A prototype's region in
  an image is a 72-px box (at 224-px input) around the peak of its activation map; a part
  "is in" the region when its visible keypoint falls inside the box. A prototype is
  *consistent* when one part is in its region in at least 80 % of the images (of its
  classes) where that part is visible. *Stability* is the share of images whose set of
  parts in the region stays the same under Gaussian noise (the store's `noise` view).
- purity: PIP-Net (Nauta et al. 2023): the 10 patches where a prototype is most present,
  32-px boxes; purity is the share of them that contain the prototype's most frequent part,
  with left/right parts merged.
- drift (ours): how much a prototype's evidence moves when the input is perturbed: the
  overlap of its top-k patches between two views and the shift of its peak on the same images.

The peak of a bilinearly upsampled map lies on a grid point, i.e. at the centre of the
arg-max token cell, so peaks are computed on the token grid without upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass
class MetricConfig:
    consistency_box: float = 72.0  # px at 224-px input; scaled with the input size
    consistency_threshold: float = 0.8
    purity_box: float = 32.0
    purity_top_k: int = 10
    drift_top_k: int = 10
    reference_size: int = 224


def cell_centers(grid: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """[T, 2] (x, y) pixel centres of the token cells, row-major."""
    gh, gw = grid
    h, w = input_size
    ys, xs = np.meshgrid((np.arange(gh) + 0.5) * h / gh, (np.arange(gw) + 0.5) * w / gw, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def peak_locations(sim_maps: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """sim_maps [N, P, H, W] -> [N, P, 2] (x, y) input pixels of each map's peak."""
    n, p, gh, gw = sim_maps.shape
    flat = sim_maps.reshape(n, p, gh * gw).argmax(-1)
    return cell_centers((gh, gw), input_size)[flat]


def box_around(centers: np.ndarray, size: float, input_size: tuple[int, int]) -> np.ndarray:
    """[..., 4] boxes (x0, y0, x1, y1) of side `size` centred at `centers`, shifted to stay inside the image."""
    h, w = input_size
    x0 = np.clip(centers[..., 0] - size / 2, 0, max(w - size, 0))
    y0 = np.clip(centers[..., 1] - size / 2, 0, max(h - size, 0))
    return np.stack([x0, y0, x0 + size, y0 + size], axis=-1)


def parts_in_boxes(boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """boxes [N, P, 4], keypoints [N, K, 3] (x, y, visible) -> [N, P, K] visible part inside box."""
    x, y, vis = (keypoints[:, None, :, i] for i in range(3))
    b = boxes[:, :, None, :]
    return (vis > 0) & (x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3])


def merge_left_right(part_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Merged part names and, for each original part, the index of its merged part."""
    merged: list[str] = []
    index = []
    for name in part_names:
        base = name.lower().replace("left ", "").replace("right ", "").replace("left_", "").replace("right_", "")
        if base not in merged:
            merged.append(base)
        index.append(merged.index(base))
    return merged, np.asarray(index, dtype=np.int64)


def merge_part_hits(hits: np.ndarray, merge_index: np.ndarray, num_merged: int) -> np.ndarray:
    """[..., K] bool -> [..., K'] bool: a merged part is hit when any of its sides is."""
    out = np.zeros(hits.shape[:-1] + (num_merged,), dtype=bool)
    for k, m in enumerate(merge_index):
        out[..., m] |= hits[..., k]
    return out


def _scaled(size: float, input_size: tuple[int, int], cfg: MetricConfig) -> float:
    return size * min(input_size) / cfg.reference_size


def prototype_part_hits(sim_maps: np.ndarray, keypoints: np.ndarray, input_size: tuple[int, int],
                        box: float) -> np.ndarray:
    """[N, P, K]: which visible parts fall in each prototype's peak box in each image."""
    boxes = box_around(peak_locations(sim_maps, input_size), box, input_size)
    return parts_in_boxes(boxes, keypoints)


def consistency(hits: np.ndarray, visible: np.ndarray, labels: np.ndarray,
                class_prototypes: Mapping[int, Sequence[int]], threshold: float = 0.8) -> dict:
    """Share of (class, prototype) pairs where one part is in the region in >= threshold of the
    class's images in which that part is visible (Huang et al.). hits [N, P, K], visible [N, K]."""
    scores, best = [], []
    for c, protos in class_prototypes.items():
        rows = np.flatnonzero(labels == c)
        if rows.size == 0:
            continue
        seen = visible[rows].sum(0)  # [K]
        for p in protos:
            inside = hits[rows, p].sum(0)  # [K]
            freq = np.divide(inside, seen, out=np.zeros(len(seen)), where=seen > 0)
            best.append(float(freq.max()))
            scores.append(float(freq.max() >= threshold))
    return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores),
            "mean_best_part_frequency": float(np.mean(best)) if best else None}


def stability(hits_clean: np.ndarray, hits_noisy: np.ndarray, labels: np.ndarray,
              class_prototypes: Mapping[int, Sequence[int]]) -> dict:
    """Mean over (class, prototype) pairs of the share of the class's images whose parts-in-region
    set is unchanged under noise (Huang et al.)."""
    same = (hits_clean == hits_noisy).all(-1)  # [N, P]
    scores = []
    for c, protos in class_prototypes.items():
        rows = np.flatnonzero(labels == c)
        if rows.size:
            scores.extend(float(same[rows, p].mean()) for p in protos)
    return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores)}


def top_patches(sim_maps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prototype, the k (image, cell) patches with the highest similarity: ([P, k] image, [P, k] cell)."""
    n, p, gh, gw = sim_maps.shape
    flat = np.moveaxis(sim_maps.reshape(n, p, gh * gw), 1, 0).reshape(p, n * gh * gw)
    k = min(k, flat.shape[1])
    # Stable order: highest value first, ties by (image, cell) so the result is reproducible.
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return order // (gh * gw), order % (gh * gw)


def purity(sim_maps: np.ndarray, keypoints: np.ndarray, part_names: Sequence[str],
           input_size: tuple[int, int], box: float, top_k: int = 10,
           prototypes: Sequence[int] | None = None) -> dict:
    """PIP-Net purity: share of a prototype's top-k patches containing its most frequent (merged) part."""
    gh, gw = sim_maps.shape[2:]
    merged, merge_index = merge_left_right(part_names)
    images, cells = top_patches(sim_maps, top_k)
    centers = cell_centers((gh, gw), input_size)
    protos = range(sim_maps.shape[1]) if prototypes is None else prototypes
    scores = []
    for p in protos:
        boxes = box_around(centers[cells[p]], box, input_size)  # [k, 4]
        hits = parts_in_boxes(boxes[:, None, :], keypoints[images[p]])[:, 0, :]  # [k, K]
        merged_hits = merge_part_hits(hits, merge_index, len(merged))
        scores.append(float(merged_hits.sum(0).max() / len(boxes)) if len(boxes) else 0.0)
    return {"value": float(np.mean(scores)) if scores else None, "per_prototype": scores,
            "merged_parts": merged}


def drift(sim_a: np.ndarray, sim_b: np.ndarray, input_size: tuple[int, int], top_k: int = 10,
          mirror_b: bool = False, prototypes: Sequence[int] | None = None) -> dict:
    """How a prototype's evidence moves between two views of the same images.

    top-k overlap: |top-k patches in A ∩ in B| / k (1 = the same patches). peak shift: mean
    pixel distance between the peaks on the same image, as a fraction of the image diagonal.
    With mirror_b (B is the hflip view), B's maps are mirrored back before comparing.
    """
    if mirror_b:
        sim_b = sim_b[..., ::-1]
    protos = list(range(sim_a.shape[1])) if prototypes is None else list(prototypes)
    ia, ca = top_patches(sim_a[:, protos], top_k)
    ib, cb = top_patches(sim_b[:, protos], top_k)
    overlap = [len(set(zip(ia[j], ca[j])) & set(zip(ib[j], cb[j]))) / ia.shape[1] for j in range(len(protos))]
    pa = peak_locations(sim_a[:, protos], input_size)
    pb = peak_locations(sim_b[:, protos], input_size)
    diag = float(np.hypot(*input_size))
    shift = np.linalg.norm(pa - pb, axis=-1).mean(0) / diag  # [P]
    return {"topk_overlap": float(np.mean(overlap)), "peak_shift": float(shift.mean()),
            "per_prototype_overlap": overlap, "per_prototype_shift": shift.tolist()}
