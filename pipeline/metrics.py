"""Interpretability metrics: the one implementation of each, as streaming reducers over similarity maps.

Evaluate (and the explain report) feed batches of similarity maps on the cached token grid
into these reducers and read the results at the end; nothing keeps a whole split's maps.

Recipes:
- consistency and stability: Huang et al., "Evaluation and Improvement of Interpretability
  for Self-Explainable Part-Prototype Networks" (arXiv 2212.05946). A prototype's region in
  an image is a 72-px box (at 224-px input) around the peak of its activation map; a part
  "is in" the region when its visible keypoint falls inside the box. A prototype is
  *consistent* when one part is in its region in at least 80 % of the images (of its
  classes) where that part is visible. *Stability* is the share of images whose set of
  parts in the region stays the same under Gaussian noise (the store's `noise` view).
  Reducer: `PartHitCounts`.
- purity: PIP-Net (Nauta et al. 2023): the 10 patches where a prototype is most present,
  32-px boxes; purity is the share of them that contain the prototype's most frequent part,
  with left/right parts merged. Reducer: `TopK`, then `purity`.
- drift (ours): how much a prototype's evidence moves when the input is perturbed: the
  overlap of its top-k patches between two views and the shift of its peak on the same images.
  Reducer: `PatchStream` per view, then `view_drift`, `matched_overlap`, `drift_value`.

The peak of a bilinearly upsampled map lies on a grid point, i.e. at the centre of the
arg-max token cell, so peaks are computed on the token grid without upsampling.

Shapes: similarity maps are [B, P, T] with row-major cells (T = H * W) unless a function
says [N, P, H, W]; keypoints are [N, K, 3] (x, y, visible) in model-input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass
class MetricConfig:
    """Boxes, thresholds and top-k sizes of the interpretability metrics."""

    consistency_box: float = 72.0
    """Side in px (at `reference_size` input) of the box around a prototype's peak for consistency and stability."""
    consistency_threshold: float = 0.8
    """A (class, prototype) pair is consistent when one part is in its box in at least this share of the
    class's images where the part is visible."""
    purity_box: float = 32.0
    """Side in px (at `reference_size` input) of the patch around each top-k peak for purity."""
    purity_top_k: int = 10
    """Patches per prototype (its most similar ones on the evaluated split) that purity looks at."""
    drift_top_k: int = 10
    """Patches per prototype compared between views (or runs) for drift."""
    reference_size: int = 224
    """Input side the box sizes are given at; boxes scale with the store's (shorter) input side."""


def scaled_box(size: float, input_size: tuple[int, int], cfg: MetricConfig) -> float:
    """A box side given at cfg.reference_size input, in pixels of `input_size` (its shorter side)."""
    return size * min(input_size) / cfg.reference_size


# ----------------------------------------------------------------------------- geometry


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


def prototype_part_hits(sim_maps: np.ndarray, keypoints: np.ndarray, input_size: tuple[int, int],
                        box: float) -> np.ndarray:
    """sim_maps [N, P, H, W] -> [N, P, K]: which visible parts fall in each prototype's peak box in each image."""
    boxes = box_around(peak_locations(sim_maps, input_size), box, input_size)
    return parts_in_boxes(boxes, keypoints)


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


def mirror_maps(sims: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[B, P, T] maps of a horizontally flipped image -> the same maps in the unflipped image's cells."""
    b, p, _ = sims.shape
    return np.ascontiguousarray(sims.reshape(b, p, *grid)[..., ::-1].reshape(b, p, -1))


# ----------------------------------------------------------------------------- consistency, stability


class PartHitCounts:
    """Per-class counts behind consistency and stability (Huang et al.), fed batch by batch.

    For each (class, prototype) it counts, per part, the class's images where the part is in the
    prototype's peak box; per class the images where each part is visible; and, when a noisy view
    is given, the images whose set of parts in the box is unchanged under the noise.
    """

    def __init__(self, num_classes: int, class_prototypes: Mapping[int, Sequence[int]]):
        self.num_classes = num_classes
        self.class_prototypes = class_prototypes
        self.hits: np.ndarray | None = None  # [C, P, K]
        self.visible: np.ndarray | None = None  # [C, K]
        self.same: np.ndarray | None = None  # [C, P]
        self.images = np.zeros(num_classes, dtype=np.int64)  # [C]

    def update(self, hits: np.ndarray, visible: np.ndarray, labels: np.ndarray,
               noisy_hits: np.ndarray | None = None) -> None:
        """hits, noisy_hits [B, P, K] bool (see `prototype_part_hits`); visible [B, K] bool; labels [B]."""
        if self.hits is None:
            _, p, k = hits.shape
            self.hits = np.zeros((self.num_classes, p, k), dtype=np.int64)
            self.visible = np.zeros((self.num_classes, k), dtype=np.int64)
        np.add.at(self.hits, labels, hits.astype(np.int64))
        np.add.at(self.visible, labels, visible.astype(np.int64))
        np.add.at(self.images, labels, 1)
        if noisy_hits is not None:
            if self.same is None:
                self.same = np.zeros(self.hits.shape[:2], dtype=np.int64)
            np.add.at(self.same, labels, (hits == noisy_hits).all(-1).astype(np.int64))

    def consistency(self, threshold: float = 0.8) -> dict:
        """Share of (class, prototype) pairs where one part is in the region in >= threshold of the
        class's images in which that part is visible; classes with no visible part are skipped."""
        scores, best = [], []
        if self.hits is not None:
            for c, protos in self.class_prototypes.items():
                seen = self.visible[c]
                if seen.sum() == 0:
                    continue
                for p in protos:
                    freq = np.divide(self.hits[c, p], seen, out=np.zeros(len(seen)), where=seen > 0)
                    best.append(float(freq.max()))
                    scores.append(float(freq.max() >= threshold))
        return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores),
                "mean_best_part_frequency": float(np.mean(best)) if best else None}

    def stability(self) -> dict:
        """Mean over (class, prototype) pairs of the share of the class's images whose parts-in-region
        set is unchanged under noise (needs `noisy_hits` in every update)."""
        scores = []
        if self.same is not None:
            scores = [self.same[c, p] / self.images[c] for c, ps in self.class_prototypes.items()
                      if self.images[c] for p in ps]
        return {"value": float(np.mean(scores)) if scores else None, "pairs": len(scores)}


# ----------------------------------------------------------------------------- top-k patches, purity


class TopK:
    """Running top-k (value, row, cell) per prototype over a stream of similarity maps.

    Highest value first, equal values in (row, cell) order. Sized by the first batch.
    Caveat: each batch first keeps its own k best (argpartition), so when values tie at a
    batch's k-th place, which of the tied patches survive can depend on the batch size;
    with distinct values the result does not depend on the batching.
    """

    def __init__(self, k: int):
        self.k = k
        self.values = np.full((0, 0), -np.inf, dtype=np.float32)  # [P, <=k]
        self.rows = np.zeros((0, 0), dtype=np.int64)
        self.cells = np.zeros((0, 0), dtype=np.int64)

    def update(self, sims: np.ndarray, rows: np.ndarray) -> None:
        """sims [B, P, T]; rows [B] the store rows of the batch's images."""
        b, p, t = sims.shape
        if self.values.shape[0] != p:
            self.values = np.full((p, 0), -np.inf, dtype=np.float32)
            self.rows = np.zeros((p, 0), dtype=np.int64)
            self.cells = np.zeros((p, 0), dtype=np.int64)
        flat = np.moveaxis(sims, 1, 0).reshape(p, b * t)
        k = min(self.k, b * t)
        cand = np.argpartition(-flat, k - 1, axis=1)[:, :k]
        values = np.concatenate([self.values, np.take_along_axis(flat, cand, 1)], axis=1)
        rows_all = np.concatenate([self.rows, rows[cand // t]], axis=1)
        cells_all = np.concatenate([self.cells, cand % t], axis=1)
        order = np.lexsort((cells_all, rows_all, -values), axis=1)[:, :self.k]
        self.values = np.take_along_axis(values, order, 1)
        self.rows = np.take_along_axis(rows_all, order, 1)
        self.cells = np.take_along_axis(cells_all, order, 1)

    def patch_sets(self) -> list[set[tuple[int, int]]]:
        """Per prototype, its top-k patches as a set of (row, cell)."""
        return [set(zip(r.tolist(), c.tolist())) for r, c in zip(self.rows, self.cells)]


def purity(topk: TopK, keypoints: np.ndarray, part_names: Sequence[str], grid: tuple[int, int],
           input_size: tuple[int, int], box: float, prototypes: Sequence[int]) -> dict:
    """PIP-Net purity: per prototype, the share of its top-k patches (boxes of side `box` around
    their cells) that contain its most frequent part, left/right merged; the mean over `prototypes`.
    keypoints [N, K, 3] indexed by the store rows `topk` recorded."""
    merged, merge_index = merge_left_right(part_names)
    centers = cell_centers(grid, input_size)
    scores = []
    for p in prototypes:
        boxes = box_around(centers[topk.cells[p]], box, input_size)
        hits = parts_in_boxes(boxes[:, None, :], keypoints[topk.rows[p]])[:, 0, :]
        merged_hits = merge_part_hits(hits, merge_index, len(merged))
        scores.append(float(merged_hits.sum(0).max() / max(len(boxes), 1)))
    return {"value": float(np.mean(scores)) if scores else None, "prototypes": len(scores),
            "top_k": topk.k, "merged_parts": merged}


# ----------------------------------------------------------------------------- drift


class PatchStream:
    """Top-k patches per prototype and each image's peak cell per prototype, over one view of a split."""

    def __init__(self, k: int):
        self.topk = TopK(k)
        self._peaks: list[np.ndarray] = []

    def update(self, sims: np.ndarray, rows: np.ndarray) -> None:
        """sims [B, P, T] (mirror an hflip view back first, see `mirror_maps`); rows [B]."""
        self.topk.update(sims, rows)
        self._peaks.append(sims.argmax(-1))

    @property
    def peaks(self) -> np.ndarray:
        """[N, P] arg-max cell of each image's map, in stream order."""
        return np.concatenate(self._peaks)


def topk_overlap(a: TopK, b: TopK) -> list[float]:
    """Per prototype, |a's top-k patches ∩ b's| / k (1 = the same patches)."""
    return [len(x & y) / a.k for x, y in zip(a.patch_sets(), b.patch_sets())]


def view_drift(clean: PatchStream, view: PatchStream, grid: tuple[int, int], input_size: tuple[int, int]) -> dict:
    """Drift between two views of the same images: mean top-k overlap over prototypes, and the mean
    peak shift (pixel distance between the peaks on the same image, over the image diagonal)."""
    centers = cell_centers(grid, input_size)
    diag = float(np.hypot(*input_size))
    overlap = topk_overlap(clean.topk, view.topk)
    shift = np.linalg.norm(centers[clean.peaks] - centers[view.peaks], axis=-1).mean(0) / diag  # [P]
    return {"topk_overlap": float(np.mean(overlap)), "peak_shift": float(shift.mean())}


def matched_overlap(a: TopK, b: TopK) -> dict:
    """Prototypes of two runs matched one-to-one by shared top-k patches (Hungarian); their mean overlap."""
    from scipy.optimize import linear_sum_assignment

    a_sets, b_sets = a.patch_sets(), b.patch_sets()
    overlap = np.array([[len(x & y) / a.k for y in b_sets] for x in a_sets])
    ri, ci = linear_sum_assignment(-overlap)
    return {"matched_topk_overlap": float(overlap[ri, ci].mean()), "matched_pairs": int(len(ri))}


def drift_value(overlaps: Sequence[float]) -> float:
    """The headline drift: how much of a prototype's top-k evidence does not survive, 1 - mean overlap."""
    return float(1.0 - np.mean(overlaps))
