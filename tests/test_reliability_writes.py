"""Writes are owned and atomic, reuse is checked by fingerprint (issue 11, items 1 and 2), and
kills: SIGKILL during fit-head, explain and ablate, then the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from protocache.cli.main import main
from protocache.stores import owned
from protocache.stores import runs as run_files

TINY = ["--dataset", "digits", "--backbone", "test_efficientnet", "--limit", "32", "--shard-size", "16",
        "--batch-size", "16", "--num-workers", "0", "--threads", "1", "--no-progress"]
FIT = ["--threads", "1", "--device", "cpu", "--no-progress"]
QUICK_PQ = ["--set", "codebook_size=24", "--set", "codebook_epochs=1", "--set", "prune_to=20", "--set", "prune_rounds=2",
            "--set", "epochs=2", "--set", "finetune_epochs=1", "--set", "kmeans_iters=5"]


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting bad input: exit 2 and one line `error: ...` on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def extract_tiny(out: Path, weights: str = "random", *extra: str) -> None:
    main(["extract", *TINY, "--weights", weights, "--out", str(out), *extra])


def other_weights(tmp_path: Path) -> Path:
    """test_efficientnet weights other than `--weights random`'s (seed 1 instead of 0), as a file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "other-weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. owned writes


def test_extract_overwrite_replaces_only_a_store_of_ours(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "notes.txt").write_text("three years of work")
    (thesis / "figures" / "f1.png").write_bytes(b"\x89PNG")
    before = tree(thesis)
    err = cli_error(["extract", *TINY, "--weights", "random", "--out", str(thesis), "--overwrite"], capsys)
    assert "not a protocache feature store" in err and "figures/, notes.txt" in err and "nothing was deleted" in err
    assert tree(thesis) == before
    a_file = tmp_path / "file.zarr"
    a_file.write_text("x")
    assert "is a file" in cli_error(["extract", *TINY, "--weights", "random", "--out", str(a_file), "--overwrite"],
                                    capsys)
    assert a_file.read_text() == "x"
    # a store of ours that also holds a file of the user's: refused, both intact
    store = tmp_path / "s.zarr"
    extract_tiny(store)
    (store / "mine.txt").write_text("keep")
    err = cli_error(["extract", *TINY, "--weights", "random", "--out", str(store), "--overwrite", "--limit", "16"],
                    capsys)
    assert "also holds files that are not its own (mine.txt)" in err
    assert (store / "mine.txt").read_text() == "keep" and (store / "zarr.json").exists()
    (store / "mine.txt").unlink()
    extract_tiny(store, "random", "--overwrite", "--limit", "16")  # only ours: replaced
    from protocache.stores import FeatureStore

    assert FeatureStore.open(store).num_images == 16


def test_out_equal_to_inside_or_holding_root_is_refused_before_anything(tmp_path, capsys):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        (data / cls / "x.png").write_bytes(b"not even an image: nothing may be read")
    before = tree(data)
    base = ["extract", "--dataset", "folder", "--root", str(data), "--backbone", "test_efficientnet",
            "--weights", "random", "--no-progress"]
    assert "is the dataset folder" in cli_error(base + ["--out", str(data), "--overwrite"], capsys)
    assert "inside the dataset folder" in cli_error(base + ["--out", str(data / "cache" / "s.zarr")], capsys)
    assert "holds the dataset folder" in cli_error(base + ["--out", str(tmp_path), "--overwrite"], capsys)
    assert tree(data) == before and not (data / "cache").exists()


def test_a_refit_leaves_nothing_of_the_previous_run(store_path, tmp_path, capsys):
    run = tmp_path / "run"
    main(["fit-head", "linear", "--store", str(store_path), "--out", str(run), "--epochs", "2", *FIT])
    main(["evaluate", str(run), "--device", "cpu"])
    assert (run / "eval-test.json").exists() and (run / "confusion-test.png").exists()
    main(["fit-head", "linear", "--store", str(store_path), "--out", str(run), "--epochs", "2", "--seed", "1", *FIT])
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted(run_files.RUN_FILES + ("val_rows.npy",))  # no eval-* of the old weights
    assert not list(tmp_path.glob(".run*"))  # no staging left behind


def test_a_failed_refit_keeps_the_previous_run_and_the_retry_works(store_path, tmp_path, capsys, monkeypatch):
    from protocache.pipeline.heads.linear import LinearProbe
    from protocache.pipeline.runs import load_run
    from protocache.stores.errors import ProtocacheError

    run = tmp_path / "run"
    args = ["fit-head", "linear", "--store", str(store_path), "--out", str(run), "--epochs", "2", *FIT]
    main(args)
    before = tree(run)

    def broken_fit(self, ctx, stage="probe"):
        raise ProtocacheError("the fit broke half-way")

    monkeypatch.setattr(LinearProbe, "fit", broken_fit)
    assert "half-way" in cli_error(args + ["--seed", "1"], capsys)
    assert tree(run) == before and load_run(run).metrics["head"] == "linear"  # whole and loadable
    monkeypatch.undo()
    main(args + ["--seed", "1"])
    assert tree(run)[run_files.WEIGHTS] != before[run_files.WEIGHTS]
    assert not list(tmp_path.glob(".run*"))


def test_a_run_folder_of_someone_else_is_refused_with_what_it_holds(store_path, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text('{"mine": true}')  # a config.json, but not a run of ours
    err = cli_error(["fit-head", "linear", "--store", str(store_path), "--out", str(busy), *FIT], capsys)
    assert "is not a run folder (it holds config.json)" in err
    assert (busy / "config.json").read_text() == '{"mine": true}' and len(list(tmp_path.iterdir())) == 1


def test_replace_dir_swaps_whole_folders_and_recovers_a_cut_swap(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = owned.fresh_staging(final)
    assert staging == tmp_path / ".out.partial" and not any(staging.iterdir())
    (staging / "new.txt").write_text("new")
    owned.replace_dir(staging, final)  # atomic exchange where the system has one
    assert tree(final) == {"new.txt": b"new"} and not staging.exists()
    monkeypatch.setattr(owned, "_exchange", lambda a, b: False)  # two renames instead
    staging = owned.fresh_staging(final)
    (staging / "newer.txt").write_text("newer")
    owned.replace_dir(staging, final)
    assert tree(final) == {"newer.txt": b"newer"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a kill between the two renames: the previous folder is parked as .out.old and comes back
    (tmp_path / "out").rename(tmp_path / ".out.old")
    owned.restore_interrupted(final)
    assert tree(final) == {"newer.txt": b"newer"} and not (tmp_path / ".out.old").exists()
    assert owned.describe_contents(["a", "b/", "c", "d", "e", ".hidden"]) == "a, b/, c, d and 1 more"


# ----------------------------------------------------------------------------- 2. reuse by fingerprint


def test_evaluate_and_explain_refuse_a_run_whose_store_was_re_extracted(tmp_path, capsys):
    store, run = tmp_path / "s.zarr", tmp_path / "run"
    extract_tiny(store)
    main(["fit-head", "linear", "--store", str(store), "--out", str(run), "--epochs", "2", *FIT])
    main(["evaluate", str(run), "--device", "cpu"])
    evaluated = tree(run)
    extract_tiny(store, str(other_weights(tmp_path)), "--overwrite")  # same path, other backbone weights
    err = cli_error(["evaluate", str(run), "--device", "cpu"], capsys)
    assert "re-extracted" in err and "weights_sha256: at fit time" in err and "weights_source" in err
    assert tree(run) == evaluated  # eval-test.json and the rest untouched
    err = cli_error(["explain", str(run), "--out", str(tmp_path / "report"), "--device", "cpu"], capsys)
    assert "weights_sha256" in err and not (tmp_path / "report").exists()


def write_grid(path: Path, fit: str = "threads: 1") -> Path:
    path.write_text(f"head: linear\ngrid:\n  epochs: [2]\n  lr: [0.001, 0.002]\nseeds: [0]\nfit:\n  {fit}\n")
    return path


def test_ablate_retrains_points_of_another_store_or_fit_options(tmp_path, capsys):
    store, sweep = tmp_path / "s.zarr", tmp_path / "sweep"
    extract_tiny(store)
    grid = write_grid(tmp_path / "g.yaml")
    args = ["ablate", "--store", str(store), "--grid", str(grid), "--out", str(sweep)]
    main(args)
    assert "2 points: 2 trained" in capsys.readouterr().out and (sweep / owned.SWEEP_MARKER).exists()
    main(args)
    assert "0 trained in 0 read pass(es), 2 already finished" in capsys.readouterr().out
    results = (sweep / "results.parquet").read_bytes()
    # other fit options: strict refuses (nothing trained, nothing rewritten), the default re-trains
    write_grid(grid, "threads: 1\n  val_fraction: 0.25")
    err = cli_error(args + ["--resume", "strict"], capsys)
    assert "2 point(s)" in err and "val_fraction: 0.1 then, 0.25 now" in err
    assert (sweep / "results.parquet").read_bytes() == results
    main(args)
    captured = capsys.readouterr()
    assert "2 points: 2 trained" in captured.out and "trained again" in captured.err
    # the store re-extracted in place with other weights: its runs are stale too
    extract_tiny(store, str(other_weights(tmp_path)), "--overwrite")
    err = cli_error(args + ["--resume", "strict"], capsys)
    assert "re-extracted" in err and "weights_sha256" in err
    main(args)
    assert "2 points: 2 trained" in capsys.readouterr().out
    for row in pq.read_table(sweep / "results.parquet").to_pylist():
        config = json.loads((Path(row["run_dir"]) / run_files.CONFIG).read_text())
        assert config["store"]["fingerprint"]["weights_source"] == "file:other-weights.safetensors"
    assert "--resume must be one of retrain, strict" in cli_error(args + ["--resume", "maybe"], capsys)


def test_ablate_refuses_a_folder_that_is_not_a_sweep(store_path, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("keep")
    err = cli_error(["ablate", "--store", str(store_path), "--grid", str(write_grid(tmp_path / "g.yaml")),
                     "--out", str(out)], capsys)
    assert "is not a sweep folder (it holds paper.tex)" in err
    assert tree(out) == {"paper.tex": b"keep"}


# ----------------------------------------------------------------------------- 3. kills


def cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "protocache.cli.main", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fails if it ended first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_during_a_refit_keeps_the_previous_run_and_the_rerun_is_identical(store_path, tmp_path):
    from protocache.pipeline.runs import load_run

    base = ["fit-head", "linear", "--store", str(store_path), *FIT]
    main(base + ["--out", str(tmp_path / "reference"), "--epochs", "200", "--seed", "1"])
    run = tmp_path / "run"
    main(base + ["--out", str(run), "--epochs", "2"])
    previous = tree(run)
    again = base + ["--out", str(run), "--epochs", "200", "--seed", "1"]
    proc = cli_process(*again)
    log = tmp_path / ".run.partial" / run_files.LOG
    kill_when(proc, lambda: log.exists() and "validation" in log.read_text())  # training has begun
    assert tree(run) == previous and load_run(run).config["fit"]["seed"] == 0  # the previous run, whole
    main(again)  # the same command again
    assert tree(run)[run_files.WEIGHTS] == tree(tmp_path / "reference")[run_files.WEIGHTS]
    assert not list(tmp_path.glob(".run*"))


@pytest.mark.slow
def test_sigkill_during_explain_keeps_the_previous_report_and_the_rerun_is_identical(store_path, tmp_path):
    run = tmp_path / "run"
    main(["fit-head", "protoquant", "--store", str(store_path), "--out", str(run), *FIT, *QUICK_PQ])
    base = ["explain", str(run), "--device", "cpu"]
    report = ["--images", "6", "--patches", "3", "--max-prototypes", "10"]
    main(base + ["--out", str(tmp_path / "reference"), *report])
    out = tmp_path / "report"
    main(base + ["--out", str(out), "--images", "1", "--patches", "1", "--max-prototypes", "2"])
    previous = tree(out)
    proc = cli_process(*base, "--out", str(out), *report)
    img = tmp_path / ".report.partial" / "img"
    kill_when(proc, lambda: img.exists() and len(list(img.iterdir())) >= 5)  # pictures half drawn
    assert tree(out) == previous
    main(base + ["--out", str(out), *report])  # the same command again

    def files(folder: Path) -> dict[str, bytes]:  # report.json names its own folder
        return {k: v.replace(str(folder).encode(), b"OUT") for k, v in tree(folder).items()}

    assert files(out) == files(tmp_path / "reference")
    assert not list(tmp_path.glob(".report*"))


@pytest.mark.slow
def test_sigkill_during_ablate_then_resume_gives_the_same_sweep(store_path, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("head: linear\ngrid:\n  epochs: [60]\n  lr: [0.001, 0.002]\nseeds: [0, 1]\nfit:\n  threads: 1\n")
    args = ["ablate", "--store", str(store_path), "--grid", str(grid), "--device", "cpu"]
    main(args + ["--out", str(tmp_path / "reference")])
    sweep = tmp_path / "sweep"
    proc = cli_process(*args, "--out", str(sweep))
    kill_when(proc, lambda: sweep.exists() and any(owned.is_run_folder(p) for p in sweep.iterdir()))
    assert not (sweep / "results.parquet").exists()  # killed mid-sweep
    main(args + ["--out", str(sweep)])  # the same command again

    def rows(folder: Path) -> list[dict]:
        # what, not where, how long or in which read pass (a resumed sweep skips the points already done)
        drop = ("run_dir", "fit_seconds", "bytes_read_per_head", "train_loops")
        return [{k: v for k, v in r.items() if k not in drop and not k.startswith("group_")}
                for r in pq.read_table(folder / "results.parquet").to_pylist()]

    assert rows(sweep) == rows(tmp_path / "reference") and len(rows(sweep)) == 4
    assert not [p for p in sweep.iterdir() if p.name.startswith(".") and p.is_dir()]  # no staging left
    for row in rows(sweep):
        assert (sweep / row["run"] / run_files.WEIGHTS).read_bytes() == \
            (tmp_path / "reference" / row["run"] / run_files.WEIGHTS).read_bytes()
