"""The metrics, pinned on hand-made maps and keypoints; each answer is worked out by hand in a comment.

References: Huang et al. (hqhQAQ/EvalProtoPNet, util/eval_interpretability.py) for consistency and
stability, PIP-Net (M-Nauta/PIPNet, util/eval_cub_csv.py) for purity; drift is ours.
"""

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


def kp(*parts: tuple[float, float, int]) -> np.ndarray:
    return np.asarray(parts, dtype=np.float32)


# ----------------------------------------------------------------------------- Huang et al.: peaks and boxes


def test_bicubic_peak_differs_from_the_cell_centre():
    # A 7x7 map with 1 in cell (0, 0), 0 elsewhere, upsampled bicubically to 224 (align_corners=False, a = -0.75,
    # border samples replicated: torch's and cv2.INTER_CUBIC's rule). The map is separable: value(x, y) = v(x) v(y).
    # Pixel i samples source s = (i + 0.5) / 32 - 0.5. For i <= 15, s < 0 and the four taps are cells -2..1 ->
    # values 1, 1, 1, 0; with t = s + 1 the weights sum to 1, so v = 1 - w(2 - t) where the outer Keys weight
    # w(u) = a (u - 1)(u - 2)^2 gives v = 1 + 0.75 t^2 (1 - t), largest at t = 2/3, i.e. i + 0.5 = 32/6 = 5.33.
    # Pixel 5 (t = 0.6719): v = 1.1111; pixel 4 (t = 0.6406): 1.1106; pixel 6 (t = 0.7031): 1.1101; and for
    # i >= 16 (taps 1, 1, 0, 0) v < 1. So the peak is pixel (5, 5), centre (5.5, 5.5), value 1.1111^2 = 1.2345,
    # not the cell centre (16, 16).
    m = np.zeros((1, 7, 7), dtype=np.float32)
    m[0, 0, 0] = 1.0
    assert M.bicubic_peaks(m, SIZE).tolist() == [[5.5, 5.5]]
    # the same on a non-square input: x over 224 px, y over 112 (16-px rows): t = (i + 0.5)/16 + 0.5 -> i = 2
    assert M.bicubic_peaks(m, (112, 224)).tolist() == [[5.5, 2.5]]


def test_clipped_box_differs_from_a_shifted_box_at_the_border():
    # peak pixel (5, 5) (centre 5.5, 5.5); box 72 -> +-36 px, clipped: pixels x, y in [max(0, 5 - 36), 5 + 36]
    # = [0, 41], bounds included, parts compared by their pixel floor(x). A box shifted inside the image
    # (the old rule) would cover [0, 72] and also hold the parts at x = 42.0 and x = 60.
    peaks = np.array([[5.5, 5.5]])
    parts = kp((40.7, 20.2, 1), (41.9, 3, 1), (42.0, 3, 1), (60, 20, 1), (10, 10, 0), (20, 41.99, 1), (20, 42, 1))
    assert M.box_hits(peaks, parts[None], 72, SIZE).tolist() == [[True, True, False, False, False, True, False]]
    # far border: peak pixel 218 -> x in [182, min(224, 254)] = [182, 224]: 223.9 is in, 181.5 out (shifted: [152, 224])
    far = M.box_hits(np.array([[218.5, 100.5]]), kp((223.9, 100, 1), (181.5, 100, 1), (182.0, 100, 1))[None], 72, SIZE)
    assert far.tolist() == [[True, False, True]]


def test_consistency_divides_by_the_images_where_the_part_is_visible():
    # Rows = (image, prototype of its class), 2 parts. Class 0: 5 images, part 0 visible in all, part 1 only in
    # images 0 and 1; prototypes 0 and 1. Class 1: 2 images with no visible part; prototype 2.
    # prototype 0: part 0 in the box in 4 of 5 -> 0.8 >= 0.8: consistent.
    # prototype 1: part 0 in 1 of 5 (0.2); part 1 in both images where it is visible -> 2 / 2 = 1.0: consistent
    #   (over all 5 images it would be 0.4).
    # prototype 2: no part ever visible -> frequencies 0 / 1 (the reference's denominator): not consistent, and
    #   counted (the reference averages over every (class, prototype) pair).
    # consistency = 2 / 3; mean best frequency = (0.8 + 1.0 + 0) / 3 = 0.6.
    labels, protos, hits, visible = table_rows()
    out = M.consistency(labels, protos, hits, visible, 0.8)
    assert out == {"value": pytest.approx(2 / 3), "pairs": 3, "pairs_without_visible_parts": 1,
                   "mean_best_part_frequency": pytest.approx(0.6)}
    assert M.consistency(labels, protos, hits, visible, 0.81)["value"] == pytest.approx(1 / 3)  # only prototype 1


def table_rows():
    visible0 = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=bool)
    hits_p0 = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 0]], dtype=bool)
    hits_p1 = np.array([[0, 1], [1, 1], [0, 0], [0, 0], [0, 0]], dtype=bool)
    labels = np.array([0] * 10 + [1] * 2)
    protos = np.array([0] * 5 + [1] * 5 + [2] * 2)
    hits = np.concatenate([hits_p0, hits_p1, np.zeros((2, 2), bool)])
    visible = np.concatenate([visible0, visible0, np.zeros((2, 2), bool)])
    return labels, protos, hits, visible


def test_stability_is_the_mean_over_pairs_of_the_share_of_unchanged_images():
    # The rows above; on the noise view prototype 0 loses its part in image 2 (4 of 5 unchanged: 0.8),
    # prototype 1 keeps all (1.0), prototype 2 hits nothing on either view (2 of 2 unchanged: 1.0).
    # stability = (0.8 + 1.0 + 1.0) / 3 = 0.9333 (a mean over the 12 rows would be 11 / 12 = 0.9167).
    labels, protos, hits, _ = table_rows()
    noisy = hits.copy()
    noisy[2] = False
    assert M.stability(labels, protos, hits, noisy) == {"value": pytest.approx(2.8 / 3), "pairs": 3}
    assert M.stability(labels, protos, hits, hits.copy()) == {"value": 1.0, "pairs": 3}


# ----------------------------------------------------------------------------- PIP-Net: top images, patches, purity


def test_top_images_not_top_patches_ranked_by_presence():
    # One prototype, 3 images. Image 0: presence 0.9, two cells at 1.0 (cell 3 = (r0, c3) and cell 8 = (r1, c1));
    # image 1: presence 0.8, peak cell 20 (0.7); image 2: presence 0.1 but the largest map value (2.0, cell 0).
    # Top-2 images by presence: images 0 and 1, one entry each. Image 0's peak: PIP-Net takes the max over rows
    # per column, then the first column holding the largest -> column 1 -> cell 8 (row-major arg-max: cell 3).
    # The old top-2 (image, cell) patches were (image 2, cell 0) and (image 0, cell 3).
    maps = np.zeros((3, 1, 7, 7), dtype=np.float32)
    maps[0, 0, 0, 3] = maps[0, 0, 1, 1] = 1.0
    maps[1, 0, 2, 6] = 0.7
    maps[2, 0, 0, 0] = 2.0
    cells = M.pipnet_peak_cells(maps)
    assert cells.tolist() == [[8], [20], [0]]
    top = M.TopImages(1, 2)
    top.update(np.array([[0.9]]), cells[:1], np.array([0]))  # streamed image by image
    top.update(np.array([[0.8], [0.1]]), cells[1:], np.array([1, 2]))
    assert top.rows.tolist() == [[0, 1]] and top.cells.tolist() == [[8, 20]]
    assert np.allclose(top.values, [[0.9, 0.8]])
    ties = M.TopImages(1, 2)  # equal presence: the earlier row first (pandas nlargest keep="first")
    ties.update(np.array([[0.5], [0.5], [0.5]]), np.array([[1], [2], [3]]), np.array([7, 4, 9]))
    assert ties.rows.tolist() == [[4, 7]]


def test_purity_patch_is_placed_as_pipnet_places_it():
    # 7x7 at 224: skip = round(192 / 6) = 32, cell j -> 32 j + 16 = the cell centre; the last -> 224 - 16 = 208
    assert M.pipnet_patch_centres(np.array([0, 10, 48]), GRID, SIZE, 32).tolist() == [[16, 16], [112, 48], [208, 208]]
    # 14x14 at 224: skip = round(192 / 13) = 15: cell (2, 5) -> (5 * 15 + 16, 2 * 15 + 16) = (91, 46); the last
    # column -> 208 (not 13 * 15 + 16 = 211)
    assert M.pipnet_patch_centres(np.array([2 * 14 + 5, 13]), (14, 14), SIZE, 32).tolist() == [[91, 46], [208, 16]]
    # 30 columns: skip = round(192 / 29) = 7; column 28 starts at 196 and would end at 228: PIP-Net ends it at the
    # border, [192, 224]; a part at x = 193 is in it (not in [196, 228])
    centre = M.pipnet_patch_centres(np.array([28]), (1, 30), SIZE, 32)
    assert centre.tolist() == [[212, 224 - 16]]
    assert M.patch_hits(centre, kp((193, 200, 1), (191.9, 200, 1))[None], 32, SIZE).tolist() == [[True, False]]
    # scaled: 448 px, patch 64, 14 columns: skip = round(384 / 13) = 30, column 1 -> 30 + 32 = 62
    assert M.pipnet_patch_centres(np.array([1]), (14, 14), (448, 448), 64).tolist() == [[62, 32]]


def test_purity_counts_only_top_images_where_the_part_is_visible():
    # One prototype, 10 top images, patches at (16, 16) -> [0, 32]^2. Left eye visible in images 0-4, right eye
    # in images 5-9; the visible eye is in the patch in images 0, 1, 2, 5, 6, 7 -> merged "eye": 6 of 10 = 0.6.
    # The beak is visible only in images 8 and 9 and in the patch in both: 2 / 2 = 1.0 -> purity 1.0 (beak).
    # A second prototype whose top images show no visible part has purity 0.
    names = ["left eye", "right eye", "beak"]
    parts = np.zeros((10, 3, 3), dtype=np.float32)
    for i in range(10):
        eye = (10, 10) if i in (0, 1, 2, 5, 6, 7) else (100, 100)
        parts[i, 0 if i < 5 else 1] = [*eye, 1]
        parts[i, 2] = [20, 20, 1 if i >= 8 else 0]
    centres = np.full((10, 2), 16.0)
    per = M.purity_per_prototype(np.zeros(10), centres, parts, names, 32, SIZE)
    assert per == {0: (1.0, "beak")}
    parts_no_beak = parts.copy()
    parts_no_beak[:, 2, 2] = 0
    assert M.purity_per_prototype(np.zeros(10), centres, parts_no_beak, names, 32, SIZE) == {0: (0.6, "eye")}
    blind = np.zeros((10, 3, 3), dtype=np.float32)
    both = M.purity(np.repeat([0, 1], 10), np.tile(centres, (2, 1)), np.concatenate([parts, blind]), names, 32, SIZE)
    assert both == {"value": 0.5, "prototypes": 2, "part_related": 1, "merged_parts": ["eye", "beak"]}


def test_a_prototype_locked_on_one_part_has_purity_one():
    # 12 images; the prototype peaks in cell (2, 2) in every image (patch [64, 96]^2) where the beak sits at
    # (85, 70); presence falls with the image index, so its top 10 images are 0-9. The beak is visible in images
    # 0, 3, 6, 9 (and 10, 11, outside the top 10); the tail (200, 200) is visible everywhere, never in the patch.
    # Purity = max(beak 4 / 4, tail 0 / 10) = 1.0. The old score (patches holding the part / 10) was 0.40.
    n = 12
    maps = np.zeros((n, 1, 7, 7), dtype=np.float32)
    maps[:, 0, 2, 2] = 1.0
    parts = np.zeros((n, 2, 3), dtype=np.float32)
    parts[:, 0] = [85, 70, 0]
    parts[[0, 3, 6, 9, 10, 11], 0, 2] = 1
    parts[:, 1] = [200, 200, 1]
    top = M.TopImages(1, 10)
    presence = np.linspace(1, 0, n)[:, None]
    for lo in range(0, n, 5):
        top.update(presence[lo:lo + 5], M.pipnet_peak_cells(maps[lo:lo + 5]), np.arange(lo, min(lo + 5, n)))
    assert top.rows.tolist() == [list(range(10))]
    centres = M.pipnet_patch_centres(top.cells[0], GRID, SIZE, 32)
    assert centres[0].tolist() == [80, 80]
    result = M.purity(np.zeros(10), centres, parts[top.rows[0]], ["beak", "tail"], 32, SIZE)
    assert result["value"] == 1.0 and result["part_related"] == 1


def test_left_and_right_parts_merge():
    names, index = M.merge_left_right(["head", "left eye", "right eye", "left_wing", "right_wing", "Left Leg"])
    assert names == ["head", "eye", "wing", "leg"] and index.tolist() == [0, 1, 1, 2, 2, 3]
    hits = np.array([[False, True, False, False, False, False],
                     [False, False, False, False, True, True]])
    assert M.merge_part_hits(hits, index, len(names)).tolist() == [[False, True, False, False],
                                                                   [False, False, True, True]]


# ----------------------------------------------------------------------------- drift (ours)


def stream(flat: np.ndarray, k: int, batch: int = 2) -> M.PatchStream:
    s = M.PatchStream(k)
    for i in range(0, len(flat), batch):
        s.update(flat[i:i + batch], np.arange(i, min(i + batch, len(flat))))
    return s


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
    assert M.drift_value([0.5, 1.0]) == 0.25


def test_drift_of_a_mirrored_view_mirrored_back_is_zero():
    rng = np.random.default_rng(4)
    maps = rng.uniform(size=(6, 3, 49)).astype(np.float32)
    hflip = grid_maps(maps)[..., ::-1].reshape(6, 3, 49)
    assert M.mirror_maps(np.arange(6, dtype=np.float32).reshape(1, 1, 6), (2, 3)).tolist() == [[[2, 1, 0, 5, 4, 3]]]
    assert M.view_drift(stream(maps, 5), stream(M.mirror_maps(hflip, GRID), 5), GRID, SIZE) == \
        {"topk_overlap": 1.0, "peak_shift": 0.0}


def test_prototypes_of_two_runs_are_matched_by_shared_patches():
    rng = np.random.default_rng(5)
    maps = rng.uniform(size=(6, 4, 49)).astype(np.float32)
    other = maps[:, [2, 0, 3, 1]]  # the same prototypes, in another order
    assert M.matched_overlap(stream(maps, 5).topk, stream(other, 5).topk) == \
        {"matched_topk_overlap": 1.0, "matched_pairs": 4}
