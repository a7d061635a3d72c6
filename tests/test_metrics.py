"""Interpretability metrics pinned on hand-made activation maps and keypoints with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from protocache.pipeline import metrics as M

SIZE = (224, 224)
GRID = (7, 7)  # 32-px cells
PARTS = ["head", "tail", "left eye", "right eye"]


def cell_of(x, y):
    return int(y // 32) * 7 + int(x // 32)


def one_hot_maps(cells_per_image: np.ndarray) -> np.ndarray:
    """[N, P] cell index -> [N, P, 7, 7] maps with a single peak."""
    n, p = cells_per_image.shape
    maps = np.random.default_rng(0).uniform(0, 0.1, size=(n, p, 49))
    maps[np.arange(n)[:, None], np.arange(p)[None], cells_per_image] = 1.0
    return maps.reshape(n, p, *GRID)


def random_keypoints(n, rng):
    xy = rng.uniform(0, 224, size=(n, len(PARTS), 2))
    return np.concatenate([xy, np.ones((n, len(PARTS), 1))], axis=-1)


def test_peak_is_the_centre_of_the_argmax_cell():
    maps = one_hot_maps(np.array([[0, 48, 10]]))
    assert M.peak_locations(maps, SIZE)[0].tolist() == [[16, 16], [208, 208], [112, 48]]


def test_box_stays_inside_the_image():
    assert M.box_around(np.array([10.0, 220.0]), 72, SIZE).tolist() == [0, 152, 72, 224]


def test_prototype_always_on_the_head_is_consistent_and_a_random_one_is_at_chance():
    rng = np.random.default_rng(1)
    n = 400
    kp = random_keypoints(n, rng)
    head_cells = [cell_of(*kp[i, 0, :2]) for i in range(n)]
    rand_cells = rng.integers(0, 49, size=n)
    maps = one_hot_maps(np.stack([head_cells, rand_cells], axis=1))
    hits = M.prototype_part_hits(maps, kp, SIZE, 72)
    labels = np.zeros(n, dtype=int)
    on_head = M.consistency(hits, kp[..., 2] > 0, labels, {0: [0]})
    at_random = M.consistency(hits, kp[..., 2] > 0, labels, {0: [1]})
    assert on_head["value"] == 1.0 and on_head["mean_best_part_frequency"] == 1.0
    assert at_random["value"] == 0.0
    # chance: a 72-px box covers about (72/224)^2 of the image (more near borders, where boxes shift in)
    assert 0.07 < at_random["mean_best_part_frequency"] < 0.2


def test_invisible_parts_do_not_count_against_consistency():
    rng = np.random.default_rng(2)
    kp = random_keypoints(50, rng)
    kp[:25, 0, 2] = 0  # head hidden in half the images, prototype lands elsewhere there
    cells = [cell_of(*kp[i, 0, :2]) if i >= 25 else 0 for i in range(50)]
    kp[:25, 0, :2] = 200  # far from cell 0
    hits = M.prototype_part_hits(one_hot_maps(np.array(cells)[:, None]), kp, SIZE, 72)
    assert M.consistency(hits, kp[..., 2] > 0, np.zeros(50, int), {0: [0]})["value"] == 1.0


def test_stability_counts_images_whose_parts_stay_the_same():
    rng = np.random.default_rng(3)
    kp = random_keypoints(20, rng)
    cells = np.array([[cell_of(*kp[i, 0, :2])] for i in range(20)])
    clean = M.prototype_part_hits(one_hot_maps(cells), kp, SIZE, 72)
    assert M.stability(clean, clean, np.zeros(20, int), {0: [0]})["value"] == 1.0
    moved = cells.copy()
    moved[:10] = [[cell_of(*((kp[i, 0, :2] + 112) % 224))] for i in range(10)]
    noisy = M.prototype_part_hits(one_hot_maps(moved), kp, SIZE, 72)
    value = M.stability(clean, noisy, np.zeros(20, int), {0: [0]})["value"]
    assert value == pytest.approx(np.mean((clean == noisy).all(-1)))
    assert 0.4 <= value <= 0.6


def test_purity_of_known_top_patches():
    n = 10
    kp = np.zeros((n, 4, 3))
    kp[:, 0] = [16, 16, 1]   # head in the top-left cell
    kp[:, 1] = [208, 208, 1]  # tail in the bottom-right cell
    kp[:, 2] = [112, 16, 1]  # left eye
    kp[:, 3] = [16, 112, 1]  # right eye
    cells = np.zeros((n, 3), dtype=int)
    cells[:, 1] = [0, 48] * 5  # half head, half tail
    cells[:, 2] = [3, 21] * 5  # left eye, right eye: merged into one "eye" part
    maps = one_hot_maps(cells)
    result = M.purity(maps, kp, PARTS, SIZE, box=32, top_k=10)
    assert result["per_prototype"] == [1.0, 0.5, 1.0]
    assert result["merged_parts"] == ["head", "tail", "eye"]


def test_drift_of_identical_and_mirrored_views():
    rng = np.random.default_rng(4)
    maps = rng.uniform(size=(30, 5, 7, 7))
    same = M.drift(maps, maps.copy(), SIZE)
    assert same["topk_overlap"] == 1.0 and same["peak_shift"] == 0.0
    mirrored = M.drift(maps, maps[..., ::-1].copy(), SIZE, mirror_b=True)
    assert mirrored["topk_overlap"] == 1.0 and mirrored["peak_shift"] == 0.0
    unrelated = M.drift(maps, rng.uniform(size=maps.shape), SIZE)
    assert unrelated["topk_overlap"] < 0.2 and unrelated["peak_shift"] > 0.2
