"""Interpretability metrics: one implementation each, computed from evidence rows.

Evaluate streams a split once and keeps, per batch, only the evidence a metric is computed
from (and writes it to Parquet): the peak of each (image, prototype of the image's class)
for consistency and stability, and each prototype's top images for purity. The functions
here turn those rows into the numbers; a reader can recompute them from the Parquet files.

Coordinates are continuous model-input pixels (pixel i spans [i, i + 1)); keypoints are
[..., K, 3] (x, y, visible) as the store's ``parts_input``; maps are [..., H, W] on the
token grid, cells row-major.

- **consistency, stability**: Huang et al., arXiv 2212.05946, code hqhQAQ/EvalProtoPNet
  (``util/eval_interpretability.py``). A prototype's map on an image is upsampled bicubically
  to the input size (``align_corners=False``, what ``cv2.resize(INTER_CUBIC)`` does); its peak is
  the arg-max pixel (first in row-major order). The region is the box of ±36 px (at 224 px)
  around it, clipped at the border, compared in whole pixels: a visible part is in the region
  when its pixel (``floor``) lies within the clipped bounds, bounds included. Per
  (class, prototype of that class) pair over the class's images of the split: a part's
  frequency is (images with the part in the region) / (images where it is visible, 1 if none);
  the pair is consistent when one part reaches the threshold (0.8); consistency = the share of
  consistent pairs. Stability of a pair = the share of the class's images whose set of parts
  in the region is the same on the noise view; stability = the mean over pairs. Parts are
  not merged. `bicubic_peaks`, `box_hits`, `consistency`, `stability`.
- **purity**: PIP-Net, Nauta et al. 2023, code M-Nauta/PIPNet (``util/eval_cub_csv.py``,
  ``get_topk_cub`` + ``eval_prototypes_cub_parts_csv``). Per prototype the 10 images with the
  highest presence; in each, the arg-max cell of its map (ties: first column, then first row,
  as ``torch.max`` over rows then columns); the 32-px patch (at 224 px) of that cell as PIP-Net
  places it: cell j starts at ``j * skip``, ``skip = round((W - 32) / (grid_w - 1))``, and a
  patch that would cross the border (and the last cell's) ends at the border. Per part,
  left/right merged, over the top images where the part is visible: the share with the part in
  the patch (bounds included); purity = the best part's share (0 when no part is visible).
  Reported: the mean over the prototypes some class uses and how many exceed 0.5.
  `TopImages`, `pipnet_peak_cells`, `pipnet_patch_centres`, `patch_hits`, `purity`.
- **drift** (ours, no published protocol): see `view_drift`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MetricConfig:
    """Boxes, thresholds and top-k sizes of the interpretability metrics."""

    consistency_box: float = 72.0
    """Side in px (at `reference_size` input) of the box around a prototype's peak (consistency, stability)."""
    consistency_threshold: float = 0.8
    """A (class, prototype) pair is consistent when one part is in its box in at least this share of the
    class's images where the part is visible."""
    purity_patch: float = 32.0
    """Side in px (at `reference_size` input) of the patch of each top image's peak cell (purity)."""
    purity_top_k: int = 10
    """Images per prototype (highest presence on the evaluated split) that purity looks at."""
    drift_top_k: int = 10
    """Patches per prototype compared between views (or runs) for drift."""
    reference_size: int = 224
    """Input side the box sizes are given at; boxes scale with the store's (shorter) input side."""


def scaled_box(size: float, input_size: tuple[int, int], cfg: MetricConfig) -> float:
    """A box side given at cfg.reference_size input, in pixels of `input_size` (its shorter side)."""
    return size * min(input_size) / cfg.reference_size


# ----------------------------------------------------------------------------- parts


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
    """[..., K] bool -> [..., K'] bool: a merged part is hit (or visible) when any of its sides is."""
    out = np.zeros(hits.shape[:-1] + (num_merged,), dtype=bool)
    for k, m in enumerate(merge_index):
        out[..., m] |= hits[..., k]
    return out


# ----------------------------------------------------------------------------- consistency, stability


def bicubic_peaks(maps: torch.Tensor | np.ndarray, input_size: tuple[int, int], chunk: int = 256) -> np.ndarray:
    """maps [M, H, W] -> [M, 2] (x, y): centre of the arg-max pixel of each map upsampled bicubically
    (align_corners=False) to input_size = (height, width); ties: the first pixel in row-major order."""
    t = torch.as_tensor(maps).float()
    h, w = int(input_size[0]), int(input_size[1])
    out = np.empty((t.shape[0], 2), dtype=np.float64)
    for lo in range(0, t.shape[0], chunk):
        up = F.interpolate(t[lo:lo + chunk, None], size=(h, w), mode="bicubic", align_corners=False)
        idx = up.flatten(1).argmax(1).cpu().numpy()
        out[lo:lo + chunk, 0] = idx % w + 0.5
        out[lo:lo + chunk, 1] = idx // w + 0.5
    return out


def box_hits(peaks: np.ndarray, keypoints: np.ndarray, box: float, input_size: tuple[int, int]) -> np.ndarray:
    """peaks [R, 2], keypoints [R, K, 3] -> [R, K]: visible parts in the clipped box of side `box` around
    each peak, compared in whole pixels as the reference does (part pixel floor(x) within
    [max(0, floor(peak) - box/2), min(size, floor(peak) + box/2)], bounds included)."""
    h, w = input_size
    half = box / 2.0
    px, py = np.floor(peaks[:, 0])[:, None], np.floor(peaks[:, 1])[:, None]
    kx, ky = np.floor(keypoints[..., 0]), np.floor(keypoints[..., 1])
    inside_x = (kx >= np.maximum(0, px - half)) & (kx <= np.minimum(w, px + half))
    inside_y = (ky >= np.maximum(0, py - half)) & (ky <= np.minimum(h, py + half))
    return (keypoints[..., 2] > 0) & inside_x & inside_y


def _pairs(labels: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (class, prototype) pairs [Q, 2] and each row's pair index [R]."""
    keys = np.stack([np.asarray(labels, dtype=np.int64), np.asarray(prototypes, dtype=np.int64)], axis=1)
    if not len(keys):
        return keys.reshape(0, 2), np.zeros(0, dtype=np.int64)
    pairs, inverse = np.unique(keys, axis=0, return_inverse=True)
    return pairs, inverse.reshape(-1)


def consistency(labels: np.ndarray, prototypes: np.ndarray, hits: np.ndarray, visible: np.ndarray,
                threshold: float = 0.8) -> dict:
    """Rows = (image, prototype of its class): labels, prototypes [R], hits, visible [R, K] bool.
    The share of (class, prototype) pairs with one part in the box in >= threshold of the class's
    images where it is visible (the reference divides by 1 where a part is never visible)."""
    pairs, inverse = _pairs(labels, prototypes)
    k = hits.shape[-1] if hits.ndim == 2 else 0
    hit_sum = np.zeros((len(pairs), k))
    seen = np.zeros((len(pairs), k))
    np.add.at(hit_sum, inverse, hits)
    np.add.at(seen, inverse, visible)
    freq = hit_sum / np.maximum(seen, 1)
    best = freq.max(1) if k else np.zeros(len(pairs))
    return {"value": float((best >= threshold).mean()) if len(pairs) else None, "pairs": int(len(pairs)),
            "pairs_without_visible_parts": int((seen.sum(1) == 0).sum()),
            "mean_best_part_frequency": float(best.mean()) if len(pairs) else None}


def stability(labels: np.ndarray, prototypes: np.ndarray, hits: np.ndarray, noisy_hits: np.ndarray) -> dict:
    """Rows as in `consistency`: per (class, prototype) pair the share of the class's images whose set
    of parts in the box is unchanged on the noise view; the mean over pairs."""
    pairs, inverse = _pairs(labels, prototypes)
    same = np.zeros(len(pairs))
    count = np.zeros(len(pairs))
    np.add.at(same, inverse, (hits == noisy_hits).all(-1))
    np.add.at(count, inverse, 1)
    return {"value": float((same / count).mean()) if len(pairs) else None, "pairs": int(len(pairs))}


# ----------------------------------------------------------------------------- purity


class TopImages:
    """Per prototype, the k images with the highest value (presence), with the cell of each image's peak.

    Highest first, equal values by ascending row (pandas ``nlargest(keep="first")`` over the
    split in row order, as PIP-Net ranks), so the result does not depend on the batching.
    """

    def __init__(self, num_prototypes: int, k: int):
        self.k = k
        self.values = np.zeros((num_prototypes, 0), dtype=np.float32)
        self.rows = np.zeros((num_prototypes, 0), dtype=np.int64)
        self.cells = np.zeros((num_prototypes, 0), dtype=np.int64)

    def update(self, values: np.ndarray, cells: np.ndarray, rows: np.ndarray) -> None:
        """values, cells [B, P] (presence and peak cell of each image); rows [B] the store rows."""
        vals = np.concatenate([self.values, np.asarray(values, dtype=np.float32).T], axis=1)
        cells = np.concatenate([self.cells, np.asarray(cells, dtype=np.int64).T], axis=1)
        rows_all = np.concatenate([self.rows, np.broadcast_to(np.asarray(rows, dtype=np.int64)[None, :],
                                                              (vals.shape[0], len(rows)))], axis=1)
        order = np.lexsort((rows_all, -vals), axis=1)[:, :self.k]
        self.values = np.take_along_axis(vals, order, 1)
        self.rows = np.take_along_axis(rows_all, order, 1)
        self.cells = np.take_along_axis(cells, order, 1)


def pipnet_peak_cells(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """[..., H, W] -> [...] row-major index of the arg-max cell; ties: the first column, then the first row
    (PIP-Net takes the max over rows per column, then the first column holding the largest)."""
    t = torch.as_tensor(maps)
    h, w = t.shape[-2:]
    k = t.transpose(-1, -2).flatten(-2).argmax(-1).cpu().numpy()  # column-major order
    return (k % h) * w + k // h


def pipnet_patch_centres(cells: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int],
                         patch: float) -> np.ndarray:
    """[...] cells -> [..., 2] (x, y) centre PIP-Net gives the patch of each cell before moving it inside:
    cell j -> j * skip + patch / 2, the last cell -> size - patch / 2, skip = round((size - patch) / (grid - 1))."""
    cells = np.asarray(cells, dtype=np.int64)
    out = []
    for index, n, size in ((cells % grid[1], grid[1], input_size[1]), (cells // grid[1], grid[0], input_size[0])):
        skip = round((size - patch) / (n - 1)) if n > 1 else 0
        out.append(np.where(index == n - 1, size - patch / 2.0, index * skip + patch / 2.0))
    return np.stack(out, axis=-1)


def patch_hits(centres: np.ndarray, keypoints: np.ndarray, patch: float, input_size: tuple[int, int]) -> np.ndarray:
    """centres [R, 2], keypoints [R, K, 3] -> [R, K]: visible parts inside the patch of side `patch` centred
    at each centre and moved inside the image (PIP-Net's placement), bounds included."""
    h, w = input_size
    x0 = np.clip(centres[:, 0] - patch / 2.0, 0, max(w - patch, 0))[:, None]
    y0 = np.clip(centres[:, 1] - patch / 2.0, 0, max(h - patch, 0))[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]
    return (keypoints[..., 2] > 0) & (x >= x0) & (x <= x0 + patch) & (y >= y0) & (y <= y0 + patch)


def purity_per_prototype(prototypes: np.ndarray, centres: np.ndarray, keypoints: np.ndarray,
                         part_names: Sequence[str], patch: float, input_size: tuple[int, int]
                         ) -> dict[int, tuple[float, str | None]]:
    """Rows = (prototype, one of its top images): prototypes [R], centres [R, 2], keypoints [R, K, 3].
    prototype -> (purity, its best merged part or None when no part is visible in its top images)."""
    merged, index = merge_left_right(part_names)
    visible = merge_part_hits(keypoints[..., 2] > 0, index, len(merged))
    hits = merge_part_hits(patch_hits(centres, keypoints, patch, input_size), index, len(merged))
    out: dict[int, tuple[float, str | None]] = {}
    prototypes = np.asarray(prototypes, dtype=np.int64)
    for p in np.unique(prototypes).tolist():
        sel = prototypes == p
        seen, hit = visible[sel].sum(0), hits[sel].sum(0)
        share = np.where(seen > 0, hit / np.maximum(seen, 1), -1.0)
        if (seen == 0).all():
            out[p] = (0.0, None)
            continue
        best = int(np.lexsort((np.arange(len(share)), -hit, -share))[0])  # highest share, then most hits
        out[p] = (float(share[best]), merged[best])
    return out


def purity(prototypes: np.ndarray, centres: np.ndarray, keypoints: np.ndarray, part_names: Sequence[str],
           patch: float, input_size: tuple[int, int]) -> dict:
    """PIP-Net purity from the top-image rows (see `purity_per_prototype`): the mean over the prototypes
    present in the rows, and how many have purity > 0.5."""
    per = purity_per_prototype(prototypes, centres, keypoints, part_names, patch, input_size)
    scores = np.array([v for v, _ in per.values()])
    return {"value": float(scores.mean()) if len(scores) else None, "prototypes": len(scores),
            "part_related": int((scores > 0.5).sum()), "merged_parts": merge_left_right(part_names)[0]}


# ----------------------------------------------------------------------------- drift (ours)


def cell_centers(grid: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """[T, 2] (x, y) pixel centres of the token cells, row-major."""
    gh, gw = grid
    h, w = input_size
    ys, xs = np.meshgrid((np.arange(gh) + 0.5) * h / gh, (np.arange(gw) + 0.5) * w / gw, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def mirror_maps(sims: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[B, P, T] maps of a horizontally flipped image -> the same maps in the unflipped image's cells."""
    b, p, _ = sims.shape
    return np.ascontiguousarray(sims.reshape(b, p, *grid)[..., ::-1].reshape(b, p, -1))


class TopK:
    """Running top-k (value, row, cell) per prototype over a stream of similarity maps [B, P, T].

    Highest value first, equal values in (row, cell) order. Each batch first keeps its own k
    best (argpartition), so with values tied at a batch's k-th place which tied patches survive
    can depend on the batch size; with distinct values the result does not.
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
    """Drift (ours, not a published protocol) between two views of the same images.

    Each prototype's top-k (image, cell) patches by similarity on the drift split (k = 10),
    once on the clean view and once on the other view (hflip maps mirrored back first):
    ``topk_overlap`` = the mean over all prototypes of the share of the clean top-k patches that
    are also in the other view's; ``peak_shift`` = the mean over prototypes and images of the
    distance between the centres of the arg-max cells on the two views, over the image diagonal.
    """
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
    """The headline drift: how much of a prototype's top-k evidence does not survive, 1 - mean overlap
    (over the views and the compared run)."""
    return float(1.0 - np.mean(overlaps))
