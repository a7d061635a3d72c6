"""The training scan kept in the run folder (what `predict --explain` and `explain` show as each prototype's
training patches): reused while its inputs are unchanged, scanned again when one changes, and a file that
cannot be read or written only costs a new scan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fit_helpers import quick_fit
from protocache.pipeline.explain.evidence import kept_scan_training, scan_training
from protocache.pipeline.runs import load_run, open_run_store
from protocache.stores.keyed_arrays import load_keyed, save_keyed

CPU = torch.device("cpu")


def test_keyed_arrays_round_trip_and_refusals(tmp_path):
    path = tmp_path / "a.npz"
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.asarray(7)}
    assert save_keyed(path, {"k": 1, "s": "train"}, arrays)
    got = load_keyed(path, {"s": "train", "k": 1})  # key order does not matter
    assert set(got) == {"x", "n"} and np.array_equal(got["x"], arrays["x"]) and int(got["n"]) == 7
    assert load_keyed(path, {"k": 2, "s": "train"}) is None  # another key
    assert load_keyed(tmp_path / "missing.npz", {"k": 1}) is None
    path.write_bytes(path.read_bytes()[:40])  # cut short
    assert load_keyed(path, {"k": 1, "s": "train"}) is None
    (tmp_path / "file").write_text("x")
    assert save_keyed(tmp_path / "file" / "a.npz", {"k": 1}, arrays) is False  # no folder to write into
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


@pytest.fixture(scope="module")
def run(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept_scan") / "pq"
    quick_fit("protoquant", store_path, out)
    return out


def test_the_scan_is_kept_reused_and_redone_when_an_input_changes(run):
    head = load_run(run).head
    store = open_run_store(run)
    fresh = scan_training(head, store, "train", 3, 16, CPU)
    top, importance, n = kept_scan_training(head, store, "train", 3, 16, CPU, run)
    kept = run / "scan-train-k3.npz"
    assert kept.is_file()
    assert np.array_equal(top.rows, fresh[0].rows) and np.array_equal(top.cells, fresh[0].cells)
    assert np.array_equal(top.values, fresh[0].values) and np.array_equal(importance, fresh[1]) and n == fresh[2]

    # the second call reads the kept file: rows planted in it under the same key come back
    with np.load(kept) as data:
        key_text = str(data["__key__"])
        planted = {name: data[name] for name in data.files if name != "__key__"}
    planted["rows"] = planted["rows"][::-1].copy()
    save_keyed(kept, json.loads(key_text), planted)
    again = kept_scan_training(head, store, "train", 3, 16, CPU, run)[0]
    assert np.array_equal(again.rows, planted["rows"]) and not np.array_equal(again.rows, fresh[0].rows)

    # a file edited under its key so that it holds rows the split does not have (or another shape): scanned again
    for name, bad in (("rows", np.full_like(planted["rows"], 999_999)), ("cells", planted["cells"][:, :1])):
        save_keyed(kept, json.loads(key_text), {**planted, name: bad})
        again = kept_scan_training(head, store, "train", 3, 16, CPU, run)[0]
        assert np.array_equal(again.rows, fresh[0].rows) and np.array_equal(again.cells, fresh[0].cells), name

    # other weights (a head with one code changed): another key, so a new scan, and the file is replaced
    with torch.no_grad():
        next(head.parameters()).add_(1.0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run / "weights.safetensors"))
    redone = kept_scan_training(head, store, "train", 3, 16, CPU, run)
    rescanned = scan_training(head, store, "train", 3, 16, CPU)
    assert np.array_equal(redone[0].rows, rescanned[0].rows) and np.array_equal(redone[1], rescanned[1])

    # another k or split: a file of its own
    kept_scan_training(head, store, "test", 2, 16, CPU, run)
    assert (run / "scan-test-k2.npz").is_file()
