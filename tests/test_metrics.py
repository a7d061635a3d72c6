"""The metric reducers evaluate runs, pinned on hand-made maps and keypoints with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from protocache.pipeline import metrics as M

SIZE = (224, 224)
GRID = (7, 7)  # 32-px cells: cell (r, c) = index 7r + c, centre (32c + 16, 32r + 16)
DIAG = float(np.hypot(224, 224))


def peaked(cells: list[list[int]], low: float = 0.0) -> np.ndarray:
    """[B][P] peak cell -> [B, P, 49] flat maps: 1 at the peak, `low` elsewhere."""
    cells = np.asarray(cells)
    maps = np.full(cells.shape + (49,), low, dtype=np.float32)
    b, p = np.indices(cells.shape)
    maps[b, p, cells] = 1.0
    return maps


def grid_maps(flat: np.ndarray) -> np.ndarray:
    return flat.reshape(*flat.shape[:2], *GRID)


# ----------------------------------------------------------------------------- geometry


def test_peak_is_the_centre_of_the_argmax_cell():
    maps = grid_maps(peaked([[0, 48, 10]]))
    assert M.peak_locations(maps, SIZE)[0].tolist() == [[16, 16], [208, 208], [112, 48]]
    assert M.cell_centers((2, 4), (100, 200)).tolist() == [[25, 25], [75, 25], [125, 25], [175, 25],
                                                            [25, 75], [75, 75], [125, 75], [175, 75]]


def test_box_at_the_border_shifts_inside_the_image():
    assert M.box_around(np.array([10.0, 220.0]), 72, SIZE).tolist() == [0, 152, 72, 224]
    assert M.box_around(np.array([112.0, 112.0]), 72, SIZE).tolist() == [76, 76, 148, 148]
    cfg = M.MetricConfig()
    assert M.scaled_box(72, (448, 448), cfg) == 144 and M.scaled_box(32, (112, 160), cfg) == 16


def test_a_visible_part_in_the_peak_box_is_a_hit():
    # parts: on the box edge (inside), just outside, inside but not visible
    kp = np.array([[[72, 72, 1], [73, 10, 1], [10, 10, 0]]], dtype=np.float32)
    boxes = np.array([[[0, 0, 72, 72]]], dtype=np.float32)
    assert M.parts_in_boxes(boxes, kp).tolist() == [[[True, False, False]]]
    # a map peaking in cell 0 (centre 16, 16): its 72-px box is clipped to [0, 0, 72, 72]
    hits = M.prototype_part_hits(grid_maps(peaked([[0, 48]])), kp, SIZE, 72)
    assert hits.tolist() == [[[True, False, False], [False, False, False]]]


def test_left_and_right_parts_merge():
    names, index = M.merge_left_right(["head", "left eye", "right eye", "left_wing", "right_wing", "Left Leg"])
    assert names == ["head", "eye", "wing", "leg"] and index.tolist() == [0, 1, 1, 2, 2, 3]
    hits = np.array([[False, True, False, False, False, False],
                     [False, False, False, False, True, True]])
    assert M.merge_part_hits(hits, index, len(names)).tolist() == [[False, True, False, False],
                                                                   [False, False, True, True]]


def test_mirror_maps_flips_each_row_of_cells():
    sims = np.arange(2 * 3, dtype=np.float32).reshape(1, 1, 6)  # grid 2 x 3: [[0 1 2], [3 4 5]]
    assert M.mirror_maps(sims, (2, 3)).tolist() == [[[2, 1, 0, 5, 4, 3]]]


# ----------------------------------------------------------------------------- consistency, stability


def test_consistency_threshold_counts_only_images_where_the_part_is_visible():
    # class 0: 5 images, 2 parts; prototype 0 has part 0 in its box in 4 of 5 images (0.8: consistent);
    # prototype 1 has part 0 in 3 of 5 (0.6) and part 1 in 1 of the 2 images where part 1 is visible (0.5).
    # Class 1 has no images: skipped.
    visible = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=bool)
    hits = np.zeros((5, 2, 2), dtype=bool)
    hits[:4, 0, 0] = True
    hits[:3, 1, 0] = True
    hits[1, 1, 1] = True
    labels = np.zeros(5, dtype=np.int64)
    counts = M.PartHitCounts(2, {0: [0, 1], 1: [0]})
    counts.update(hits[:3], visible[:3], labels[:3])  # streamed in two batches
    counts.update(hits[3:], visible[3:], labels[3:])
    assert counts.consistency(0.8) == {"value": 0.5, "pairs": 2, "mean_best_part_frequency": pytest.approx(0.7)}
    assert counts.consistency(0.5)["value"] == 1.0
    assert counts.consistency(0.81)["value"] == 0.0
    assert counts.stability() == {"value": None, "pairs": 0}  # no noisy view given


def test_stability_under_identical_and_changed_maps():
    # heads at the centre of cell 0, tails at the centre of cell 48; prototype 0 peaks on the head
    kp = np.zeros((6, 2, 3), dtype=np.float32)
    kp[:, 0] = [16, 16, 1]
    kp[:, 1] = [208, 208, 1]
    labels = np.array([0, 0, 0, 0, 1, 1])
    clean = grid_maps(peaked([[0]] * 6))
    hits = M.prototype_part_hits(clean, kp, SIZE, 72)
    same = M.PartHitCounts(2, {0: [0], 1: [0]})
    same.update(hits, kp[..., 2] > 0, labels, noisy_hits=hits.copy())
    assert same.stability() == {"value": 1.0, "pairs": 2}
    # under noise the peak moves to the tail in one image of class 0 and to an empty cell in both of class 1
    noisy = grid_maps(peaked([[48], [0], [0], [0], [24], [24]]))
    changed = M.PartHitCounts(2, {0: [0], 1: [0]})
    changed.update(hits, kp[..., 2] > 0, labels, noisy_hits=M.prototype_part_hits(noisy, kp, SIZE, 72))
    assert changed.stability() == {"value": pytest.approx((3 / 4 + 0 / 2) / 2), "pairs": 2}


# ----------------------------------------------------------------------------- top-k, purity


def test_topk_keeps_the_highest_patches_ties_ordered_by_row_then_cell():
    # rows 10 and 11, two prototypes, three cells; the three 5s tie and are ordered by (row, cell)
    sims = np.array([[[2, 5, 5], [0, -1, 1]],
                     [[5, 1, 0], [3, -2, 2]]], dtype=np.float32)
    rows = np.array([10, 11])
    expected = [[(5, 10, 1), (5, 10, 2), (5, 11, 0), (2, 10, 0)],
                [(3, 11, 0), (2, 11, 2), (1, 10, 2), (0, 10, 0)]]
    whole, one_by_one = M.TopK(4), M.TopK(4)
    whole.update(sims, rows)
    for i in range(2):
        one_by_one.update(sims[i:i + 1], rows[i:i + 1])
    for topk in (whole, one_by_one):
        assert [list(zip(v.tolist(), r.tolist(), c.tolist())) for v, r, c in zip(topk.values, topk.rows, topk.cells)] \
            == expected
    assert whole.patch_sets()[1] == {(11, 0), (11, 2), (10, 2), (10, 0)}
    # distinct values: any batching gives the same result
    big = np.random.default_rng(0).permutation(9 * 3 * 5).reshape(9, 3, 5).astype(np.float32)
    a, b = M.TopK(6), M.TopK(6)
    a.update(big, np.arange(9))
    for i in range(0, 9, 4):
        b.update(big[i:i + 4], np.arange(i, min(i + 4, 9)))
    assert all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("values", "rows", "cells"))


def test_purity_of_known_top_patches():
    kp = np.zeros((10, 4, 3), dtype=np.float32)
    kp[:, 0] = [16, 16, 1]    # head: cell 0
    kp[:, 1] = [208, 208, 1]  # tail: cell 48
    kp[:, 2] = [112, 16, 1]   # left eye: cell 3
    kp[:, 3] = [16, 112, 1]   # right eye: cell 21
    names = ["head", "tail", "left eye", "right eye"]
    # prototype 0 always on the head; 1 half head, half tail; 2 left eye / right eye (one merged part)
    cells = [[0, [0, 48][i % 2], [3, 21][i % 2]] for i in range(10)]
    topk = M.TopK(10)
    topk.update(peaked(cells, low=0.1)[:6], np.arange(6))
    topk.update(peaked(cells, low=0.1)[6:], np.arange(6, 10))
    purity = [M.purity(topk, kp, names, GRID, SIZE, 32, [p])["value"] for p in range(3)]
    assert purity == [1.0, 0.5, 1.0]
    both = M.purity(topk, kp, names, GRID, SIZE, 32, [0, 1])
    assert both == {"value": 0.75, "prototypes": 2, "top_k": 10, "merged_parts": ["head", "tail", "eye"]}


# ----------------------------------------------------------------------------- drift


def stream(flat: np.ndarray, k: int, batch: int = 2) -> M.PatchStream:
    s = M.PatchStream(k)
    for i in range(0, len(flat), batch):
        s.update(flat[i:i + batch], np.arange(i, min(i + batch, len(flat))))
    return s


def test_drift_overlap_and_peak_shift():
    # one prototype, k = 2: the clean view's top patches are (0, cell 0) and (1, cell 8);
    # in the other view image 1 peaks one cell to the right (cell 9): half the patches survive,
    # the peak moves 0 px in image 0 and 32 px in image 1
    clean = peaked([[0], [8]], low=0.1)
    moved = peaked([[0], [9]], low=0.1)
    assert M.view_drift(stream(clean, 2), stream(clean.copy(), 2), GRID, SIZE) == \
        {"topk_overlap": 1.0, "peak_shift": 0.0}
    drift = M.view_drift(stream(clean, 2), stream(moved, 2), GRID, SIZE)
    assert drift == {"topk_overlap": 0.5, "peak_shift": pytest.approx(16 / DIAG)}
    assert M.topk_overlap(stream(clean, 2).topk, stream(moved, 2).topk) == [0.5]
    assert M.drift_value([0.5, 1.0]) == 0.25


def test_drift_of_a_mirrored_view_mirrored_back_is_zero():
    rng = np.random.default_rng(4)
    maps = rng.uniform(size=(6, 3, 49)).astype(np.float32)
    hflip = grid_maps(maps)[..., ::-1].reshape(6, 3, 49)
    assert M.view_drift(stream(maps, 5), stream(M.mirror_maps(hflip, GRID), 5), GRID, SIZE) == \
        {"topk_overlap": 1.0, "peak_shift": 0.0}
    unmirrored = M.view_drift(stream(maps, 5), stream(np.ascontiguousarray(hflip), 5), GRID, SIZE)
    assert unmirrored["topk_overlap"] < 1.0 and unmirrored["peak_shift"] > 0.0


def test_prototypes_of_two_runs_are_matched_by_shared_patches():
    rng = np.random.default_rng(5)
    maps = rng.uniform(size=(6, 4, 49)).astype(np.float32)
    other = maps[:, [2, 0, 3, 1]]  # the same prototypes, in another order
    assert M.matched_overlap(stream(maps, 5).topk, stream(other, 5).topk) == \
        {"matched_topk_overlap": 1.0, "matched_pairs": 4}
    half = M.TopK(2)
    half.update(peaked([[0, 5], [9, 9]], low=0.1), np.arange(2))  # prototype 0: (0,0),(1,9); 1: (0,5),(1,9)
    ref = M.TopK(2)
    ref.update(peaked([[0], [9]], low=0.1), np.arange(2))  # (0,0),(1,9)
    assert M.matched_overlap(ref, half) == {"matched_topk_overlap": 1.0, "matched_pairs": 1}
    assert M.matched_overlap(half, ref) == {"matched_topk_overlap": 1.0, "matched_pairs": 1}
