"""Damaged run folders and stores, odd files and bad addresses, as a hostile user hands them over: each
ends in one `error:` line (exit 2) or the right result, and nothing already written is changed."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fit_helpers import quick_fit
from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import ProtocacheError
from test_cli_errors import assert_one_error, digest, run_cli


@pytest.fixture(scope="module")
def linear_run(store_path, tmp_path_factory) -> Path:
    return Path(quick_fit("linear", store_path, tmp_path_factory.mktemp("damaged") / "run").run_dir)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGE = {
    "weights cut short": (lambda r: os.truncate(r / run_files.WEIGHTS, 1000), r"weights\.safetensors is damaged"),
    "weights empty": (lambda r: os.truncate(r / run_files.WEIGHTS, 0), r"weights\.safetensors is damaged"),
    "config not JSON": (lambda r: (r / run_files.CONFIG).write_text("{garbage"),
                        r"config\.json is damaged \(JSONDecodeError"),
    "config key gone": (lambda r: _edit_json(r / run_files.CONFIG, lambda d: d.pop("head_config")),
                        r"config\.json is damaged \(missing or malformed: head_config\)"),
    "store info gone": (lambda r: _edit_json(r / run_files.CONFIG, lambda d: d["store"].pop("info")),
                        r"missing or malformed: store\.info"),
    "newer format": (lambda r: _edit_json(r / run_files.CONFIG, lambda d: d.update(format=9)),
                     r"has run format 9; this protocache reads format 1"),
    "metrics not JSON": (lambda r: (r / run_files.METRICS).write_text("nope"), r"metrics\.json is damaged"),
    "val rows cut short": (lambda r: os.truncate(r / "val_rows.npy", 50), r"val_rows\.npy is damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_file_is_one_line_naming_it(linear_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    harm, message = DAMAGE[damage]
    harm(run)
    before = digest(run)
    for command in (["evaluate", run], ["predict", run, tmp_path / "none.png", "--out", tmp_path / "p"]):
        (tmp_path / "none.png").write_bytes(b"")
        code, _, err = run_cli(command, capsys)
        if damage == "val rows cut short" and command[0] == "predict":
            continue  # predict needs no validation rows
        assert_one_error(code, err, message + r".*refit the run|format 9")
    assert digest(run) == before


def test_run_files_share_one_mode(linear_run):
    """safetensors creates its file owner-only; the weights get the mode of every other run file."""
    modes = {name: stat.S_IMODE((linear_run / name).stat().st_mode) for name in run_files.RUN_FILES}
    assert len(set(modes.values())) == 1, modes


def test_damaged_store_descriptions_are_one_line(store_path, tmp_path, capsys):
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(store_path, target)
        return target

    broken = copy("a.zarr")
    (broken / "zarr.json").write_text("{")
    assert_one_error(*run_cli(["info", broken], capsys)[::2], r"zarr\.json is damaged .* restore that file")
    for name, edit, message in (
            ("b.zarr", lambda a: a.update(protocache="str"), r"a str where the 'protocache' mapping belongs"),
            ("c.zarr", lambda a: a["protocache"].pop("fingerprint"), r"no 'fingerprint' mapping"),
            ("d.zarr", lambda a: a["protocache"]["layout"].update(num_images=-1), r"impossible numbers \(num_images\)"),
            ("e.zarr", lambda a: a["protocache"]["layout"].update(compression="zstd:99"),
             r"a layout that does not parse")):
        store = copy(name)
        _edit_json(store / "zarr.json", lambda d: edit(d["attributes"]))
        assert_one_error(*run_cli(["info", store], capsys)[::2], message)
    no_array = copy("f.zarr")
    (no_array / "pooled" / "zarr.json").unlink()
    assert_one_error(*run_cli(["verify", no_array], capsys)[::2], r"the array pooled \(pooled/zarr\.json\) is missing")
    # one array folder of a sound store: named as such, never "delete it"
    code, _, err = run_cli(["info", Path(store_path) / "tokens"], capsys)
    assert_one_error(code, err, r"is one array of a Zarr store, not a protocache store; pass the store's own folder")
    assert "delete" not in err


def test_a_damaged_metadata_part_names_the_shard_and_the_repair(store_path, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(store_path, store)
    os.truncate(store / "meta" / "part-00001.parquet", 30)
    code, _, err = run_cli(["fit-head", "linear", "--store", store, "--out", tmp_path / "run"], capsys)
    assert_one_error(code, err, r"shard 1: metadata \(rows 16\.\.31\): unreadable .* --repair")
    assert not (tmp_path / "run").exists()


def test_a_missing_shard_is_named_with_its_own_rows(store_path, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(store_path, store)
    for part in store.rglob("c/2/*"):  # every array file of shard 2 (rows 32..47)
        if part.is_file():
            part.unlink()
    with pytest.raises(ProtocacheError, match=r"shard 2 \(rows 32\.\.47\) is not written"):
        FeatureStore.open(store).read("pooled", 0, 120)


def test_an_unknown_drift_split_is_one_line(linear_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    code, _, err = run_cli(["evaluate", run, "--drift-split", "bogus"], capsys)
    assert_one_error(code, err, r"has no split 'bogus' \(--drift-split\); it has test, train")


def test_a_run_on_another_store_is_named_as_such(linear_run, store_path, tmp_path):
    from protocache.pipeline.runs import check_run_store

    other = tmp_path / "other.zarr"
    shutil.copytree(store_path, other)
    _edit_json(other / "zarr.json", lambda d: d["attributes"]["protocache"]["fingerprint"].update(dataset="other"))
    config, _ = run_files.read_run(linear_run)
    with pytest.raises(ProtocacheError, match=r"was fitted on another store \(.*s\.zarr\), not on .*other\.zarr "
                                              r"\(fingerprint fields that differ: dataset"):
        check_run_store(linear_run, config, FeatureStore.open(other))


def test_export_replaces_only_what_export_wrote(linear_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    before = digest(run)
    (tmp_path / "notes.txt").write_text("keep me")
    for out in (run / run_files.CONFIG, run / "config", tmp_path / "notes.txt"):  # the file, or its OUT.json
        code, _, err = run_cli(["export", run, "--out", out], capsys)
        assert_one_error(code, err, r"exists and was not written by `protocache export`, so it is not replaced")
    assert_one_error(*run_cli(["export", run, "--out", f"{tmp_path / 'nd'}/"], capsys)[::2],
                     r"is a folder; name the program file")
    assert digest(run) == before and (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "nd").exists()


def test_predict_lists_a_fifo_and_a_non_utf8_name_as_rows(linear_run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (12, 12), (200, 30, 30)).save(folder / "good.png")
    odd = os.fsencode(folder) + b"/bad\xff\xfename.png"
    with open(odd, "wb") as fh:
        fh.write((folder / "good.png").read_bytes())
    os.mkfifo(folder / "pipe.png")  # reading it would block for ever
    code, _, _ = run_cli(["predict", linear_run, folder, "--out", tmp_path / "p", "--no-progress"], capsys)
    assert code == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "p" / "predictions.parquet").to_pylist()}
    assert set(rows) == {"bad\\xff\\xfename.png", "good.png", "pipe.png"}
    assert rows["bad\\xff\\xfename.png"]["ok"] and rows["good.png"]["ok"]
    assert rows["bad\\xff\\xfename.png"]["top_k_classes"] == rows["good.png"]["top_k_classes"]  # same pixels
    assert not rows["pipe.png"]["ok"] and "is not a regular file" in rows["pipe.png"]["reason"]


def test_ablate_trains_a_damaged_point_again(store_path, tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("head: linear\ngrid:\n  lr: [0.1, 0.01]\nfit:\n  epochs: 1\n  threads: 1\n")
    args = ["ablate", "--store", store_path, "--grid", tmp_path / "g.yaml", "--out", tmp_path / "sweep",
            "--no-progress"]
    assert run_cli(args, capsys)[0] == 0
    first = {p: (tmp_path / "sweep" / p / run_files.WEIGHTS).read_bytes() for p in ("linear-lr=0.1-seed=0",
                                                                                  "linear-lr=0.01-seed=0")}
    os.truncate(tmp_path / "sweep" / "linear-lr=0.1-seed=0" / run_files.WEIGHTS, 10)
    (tmp_path / "sweep" / "linear-lr=0.01-seed=0" / run_files.METRICS).write_text("{}")
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "2 trained" in out and "a damaged run" in err, (out, err)
    for point, weights in first.items():  # trained again, to the same weights (one thread, same seed)
        assert (tmp_path / "sweep" / point / run_files.WEIGHTS).read_bytes() == weights
    results = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert len(results) == 2 and all(r["test_accuracy"] is not None for r in results)


def test_a_bad_scheduler_address_fails_before_the_store_is_made(tmp_path, capsys):
    args = ["extract", "--dataset", "digits", "--backbone", "test_efficientnet", "--weights", "random", "--limit", "16",
            "--out", tmp_path / "s.zarr", "--no-progress", "--scheduler", "bogus"]
    assert_one_error(*run_cli(args, capsys)[::2], r"bad --scheduler 'bogus' \(missing port number")
    assert not (tmp_path / "s.zarr").exists()


def test_a_val_fraction_that_leaves_nothing_to_train_on(store_path, tmp_path, capsys):
    code, _, err = run_cli(["fit-head", "linear", "--store", store_path, "--out", tmp_path / "run",
                            "--val-fraction", "0.99"], capsys)
    assert_one_error(code, err, r"val_fraction 0\.99 of \d+ train images leaves none to train on")
    assert not (tmp_path / "run").exists()


def test_a_shard_size_past_the_dataset_is_cut_to_it(tmp_path):
    from protocache.pipeline.extract import ExtractConfig, run_extract

    run_extract(ExtractConfig(dataset="digits", backbone="test_efficientnet", weights="random", limit=20,
                              shard_size=1 << 40, chunk_size=8, out=str(tmp_path / "s.zarr"), progress=False,
                              num_workers=0, threads=1))
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.layout.shard_size == 24 and store.is_complete  # 20 images in whole chunks of 8
    assert np.asarray(store.read("pooled", 0, 20)).shape[0] == 20


def test_sigterm_removes_the_staging_folder_and_keeps_the_previous_output(linear_run, tmp_path):
    """A job scheduler's SIGTERM unwinds like Ctrl-C: exit 143, one line, the previous predictions whole."""
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    command = [sys.executable, "-m", "protocache.cli.main", "predict", str(linear_run), str(folder),
               "--out", str(tmp_path / "p"), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    before = digest(tmp_path / "p")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / ".p.partial"
    deadline = time.monotonic() + 120
    while not staging.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staging.exists(), "predict ended before it could be stopped"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143 and err.strip().splitlines() == ["terminated"], err
    assert not staging.exists() and digest(tmp_path / "p") == before


def test_a_dataset_file_name_that_is_not_utf8_is_one_line_before_the_store(tmp_path, capsys):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "tree" / name / f"{i}.png")
    with open(os.fsencode(tmp_path / "tree" / "cat") + b"/caf\xe9.png", "wb") as fh:  # latin-1 bytes
        fh.write((tmp_path / "tree" / "cat" / "0.png").read_bytes())
    code, _, err = run_cli(["extract", "--dataset", "folder", "--root", tmp_path / "tree", "--backbone",
                            "test_efficientnet", "--weights", "random", "--out", tmp_path / "s.zarr", "--no-progress"],
                           capsys)
    assert_one_error(code, err, r"1 image path\(s\) under .* are not valid UTF-8, e\.g\. .*cat/caf\\xe9\.png; rename")
    assert not (tmp_path / "s.zarr").exists()


def test_a_second_fit_into_a_folder_being_written_is_refused(store_path, tmp_path):
    from protocache.pipeline.fit import FitConfig, fit_head

    out = tmp_path / "run"
    staging = run_files.begin_run(out)  # a fit of this folder in progress (it holds the staging lock)
    (staging / "log.txt").write_text("training...\n")
    try:
        with pytest.raises(ProtocacheError, match=r"another fit is writing .*run right now"):
            fit_head("linear", store_path, out, {"epochs": 1}, FitConfig(progress=False, threads=1))
        assert (staging / "log.txt").read_text() == "training...\n"  # its work is untouched
    finally:
        run_files.end_run(out)
    fit_head("linear", store_path, out, {"epochs": 1}, FitConfig(progress=False, threads=1))  # a leftover: replaced
    assert run_files.read_run(out)[0]["head"] == "linear" and not staging.exists()


def test_evaluate_writes_nothing_when_the_run_was_refitted_meanwhile(linear_run, tmp_path, monkeypatch):
    from protocache.pipeline import evaluate as E

    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    real = E._evaluate

    def refit_meanwhile(head, store, cfg):  # a re-fit swaps in other weights while the metrics are computed
        out = real(head, store, cfg)
        data = (run / run_files.WEIGHTS).read_bytes()
        (run / run_files.WEIGHTS).unlink()
        (run / run_files.WEIGHTS).write_bytes(data)
        return out

    monkeypatch.setattr(E, "_evaluate", refit_meanwhile)
    with pytest.raises(ProtocacheError, match=r"was fitted again while it was being evaluated"):
        E.evaluate_run(run)
    assert not (run / "eval-test.json").exists() and not (run / "eval-test").exists()


def test_a_scheduler_without_workers_is_one_line(tmp_path, capsys, monkeypatch):
    import socket
    import subprocess
    import sys
    import time

    from protocache.pipeline import runtime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        monkeypatch.setattr(runtime, "WAIT_FOR_WORKERS_S", 2)
        args = ["extract", "--dataset", "digits", "--backbone", "test_efficientnet", "--weights", "random",
                "--limit", "16", "--out", tmp_path / "s.zarr", "--no-progress", "--scheduler",
                f"tcp://127.0.0.1:{port}"]
        assert_one_error(*run_cli(args, capsys)[::2], r"has no workers \(waited 2 s\); start some with `dask worker")
        assert not (tmp_path / "s.zarr").exists()
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)
