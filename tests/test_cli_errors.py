"""Every bad number is one `error:` line with exit 2, before any work: each case of issue 11 through the real
CLI (in-process `protocache.cli.main.main`), checking the code, the message, and that nothing was written or
damaged. Also the progress lines of `ablate` and `bench-heads`."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest

from protocache.cli.main import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `protocache ARGS`; an unhandled exception (a traceback) fails the test."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes): equal before and after = untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(store_path, tmp_path_factory) -> Path:
    """A finished linear run on the small store (one epoch)."""
    from protocache.pipeline.fit import FitConfig, fit_head

    out = tmp_path_factory.mktemp("cli_errors") / "run"
    fit_head("linear", store_path, out, {"epochs": 1}, FitConfig(progress=False, threads=1, val_fraction=0))
    return out


# ----------------------------------------------------------------------------- extract

EXTRACT = ["extract", "--dataset", "digits", "--backbone", "test_efficientnet", "--weights", "random", "--limit", "120",
           "--num-workers", "0", "--no-progress"]


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", r"^error: extract: --batch-size must be an integer >= 1, got 0; e\.g\. --batch-size 64"),
    ("--batch-size", "-4", r"--batch-size must be an integer >= 1, got -4"),  # was "wrote 1 shard", nothing written
    ("--chunk-size", "0", r"--chunk-size must be an integer >= 1, got 0; e\.g\. --chunk-size 8 \(the default\)"),
    ("--shard-size", "-16", r"--shard-size must be an integer >= 1, got -16; leave --shard-size out for the default"),
    ("--shard-size", "0", r"--shard-size must be an integer >= 1, got 0"),  # was: the default shard size
    ("--shard-size", "12", r"--shard-size 12 must be a multiple of --chunk-size 8, e\.g\. --shard-size 16"),
    ("--num-workers", "-1", r"--num-workers must be an integer >= 0, got -1"),
    ("--limit", "-1", r"--limit must be an integer >= 1, got -1"),  # was: every image but the last
    ("--threads", "0", r"--threads must be an integer >= 1, got 0"),
    ("--workers", "0", r"--workers must be an integer >= 1, got 0"),
])
def test_extract_numbers(store_path, tmp_path, capsys, flag, value, message):
    before = digest(store_path)
    for out in (store_path, tmp_path / "new.zarr"):  # an existing store is left alone, a new one never begun
        code, _, err = run_cli(EXTRACT + ["--out", out, flag, value], capsys)
        assert_one_error(code, err, message)
    assert digest(store_path) == before and not (tmp_path / "new.zarr").exists()


def test_extract_pickle_renamed_safetensors(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(pickle.dumps({"conv_stem.weight": [1.0, 2.0]}))
    code, _, err = run_cli(EXTRACT + ["--out", tmp_path / "s.zarr", "--weights", weights], capsys)
    assert_one_error(code, err, r"cannot read .*model\.safetensors as safetensors .*pass a real \.safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ----------------------------------------------------------------------------- fit-head, evaluate, explain


@pytest.mark.parametrize("args, message", [
    (["--set", "lr=-1"], r"^error: head 'linear' config key 'lr' must be a number >= 0, got -1\.0; e\.g\. lr=0\.001"),
    (["--set", "batch_size=0"], r"head 'linear' config key 'batch_size' must be an integer >= 1, got 0"),
    (["--set", "lr=.nan"], r"'lr' must be a number >= 0, got nan"),
    (["--epochs", "0"], r"fit option 'epochs' must be an integer >= 1, got 0"),
    (["--val-fraction", "1"], r"^error: val_fraction must be in \[0, 1\), got 1\.0; e\.g\. --val-fraction 0\.1"),
])
def test_fit_head_numbers_leave_the_previous_run_whole(store_path, run_dir, capsys, args, message):
    before = digest(run_dir)
    code, _, err = run_cli(["fit-head", "linear", "--store", store_path, "--out", run_dir, "--no-progress", *args],
                           capsys)
    assert_one_error(code, err, message)
    assert digest(run_dir) == before


def test_evaluate_batch_size(run_dir, capsys):
    before = digest(run_dir)
    code, _, err = run_cli(["evaluate", run_dir, "--batch-size", "0"], capsys)
    assert_one_error(code, err, r"evaluate: --batch-size must be an integer >= 1, got 0")
    assert digest(run_dir) == before  # no eval-test.json


def test_explain_numbers_and_unwritable_folder(run_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["explain", run_dir, "--out", tmp_path / "r", "--patches", "0"], capsys)
    assert_one_error(code, err, r"explain: --patches must be an integer >= 1, got 0")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["explain", run_dir, "--out", tmp_path / "file" / "report"], capsys)
    assert_one_error(code, err, r"--out .*/file/report: .*/file is a file, not a folder; choose another --out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # permission bits do not bind root: let the check see what any other user sees
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    try:
        code, _, err = run_cli(["explain", run_dir, "--out", locked / "report"], capsys)
    finally:
        locked.chmod(0o755)
    assert_one_error(code, err, r"--out .*/locked/report: cannot write in .*/locked .*choose a folder you can write to")
    assert list(locked.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"]


# ----------------------------------------------------------------------------- ablate grids


@pytest.mark.parametrize("grid, message", [
    ("head: linear\nseeds: 3\n",
     r"`seeds:` must be a non-empty list of integers in \[0, 2\*\*63\), got 3; e\.g\. `seeds: \[3\]`"),
    ("head: linear\nseeds: zero\n", r"`seeds:` must be a non-empty list of integers in \[0, 2\*\*63\), got 'zero'"),
    ("head: linear\nfit:\n  epoch: 2\n", r"unknown config key\(s\) 'epoch' for `fit:` .*did you mean 'epochs'"),
    ("head: linear\nfit:\n  epochs: zero\n", r"`fit:` \(grid file .*\) option 'epochs' expects int, got 'zero'"),
    ("head: linear\nfit:\n  val_fraction: 2\n", r"option 'val_fraction' must be a number in \[0, 1\), got 2\.0"),
    ("head: linear\ngrid:\n  lr: [0.1, -1]\n", r"config key 'lr' must be a number >= 0, got -1\.0"),
    ("head: linear\nseeds: [99999999999999999999]\n", r"`seeds:` must be .* in \[0, 2\*\*63\)"),
    ("head: linear\nconfigs: 5\n", r"`configs` is a list of config mappings, not 5"),
    # one run folder per point: a repeated value or seed would train one point twice and count it twice
    ("head: linear\ngrid:\n  lr: [0.1, 0.1]\n", r"point linear-lr=0\.1-seed=0 comes 2 times; list each value"),
    ("head: linear\nseeds: [0, 0]\n", r"point linear-seed=0 comes 2 times"),
    ("head: linear\ngrid:\n  lr: [\n", r"is not valid YAML at line 4, column 1: expected the node content"),
    # only known once resolved against the store: still refused before the first fit
    ("head: protopool\ngrid:\n  slots_per_class: [2, 50]\n  num_prototypes: [20]\n",
     r"grid point protopool-num_prototypes=20-slots_per_class=50-seed=0: .*slots_per_class 50 > num_prototypes 20"),
])
def test_ablate_grid_is_checked_whole_before_any_fit(store_path, tmp_path, capsys, grid, message):
    (tmp_path / "g.yaml").write_text(grid)
    code, _, err = run_cli(["ablate", "--store", store_path, "--grid", tmp_path / "g.yaml",
                            "--out", tmp_path / "sweep"], capsys)
    assert_one_error(code, err, message)
    assert not (tmp_path / "sweep").exists()


def test_grid_file_that_is_not_utf8_or_a_file(store_path, tmp_path, capsys):
    (tmp_path / "g.yaml").write_bytes(b"\x00\xff\xfe")
    base = ["ablate", "--store", store_path, "--out", tmp_path / "sweep", "--grid"]
    assert_one_error(*run_cli(base + [tmp_path / "g.yaml"], capsys)[::2], r"g\.yaml is not UTF-8 text")
    assert_one_error(*run_cli(base + [tmp_path], capsys)[::2], r"grid file .* is a folder; name the YAML file")
    assert not (tmp_path / "sweep").exists()


def test_ablate_seed_and_thread_options(store_path, tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("head: linear\n")
    base = ["ablate", "--store", store_path, "--grid", tmp_path / "g.yaml", "--out", tmp_path / "sweep"]
    assert_one_error(*run_cli(base + ["--seeds=-1"], capsys)[::2], r"--seeds must be .* got \[-1\]; e\.g\. --seeds 7")
    assert_one_error(*run_cli(base + ["--threads", "0"], capsys)[::2], r"ablate: --threads must be an integer >= 1")
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------- progress


def test_ablate_progress_lines(store_path, tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("head: linear\ngrid:\n  lr: [0.1, 0.01]\n  epochs: [1]\n"
                                     "fit:\n  val_fraction: 0\n  threads: 1\n")
    args = ["ablate", "--store", store_path, "--grid", tmp_path / "g.yaml"]
    code, out, err = run_cli(args + ["--out", tmp_path / "sweep"], capsys)
    assert code == 0 and "2 points: 2 trained in 1 read pass(es)" in out
    lines = [line for line in err.splitlines() if line.startswith("ablate: ")]
    assert lines[0] == "ablate: read pass 1/1: 2 point(s), seed 0: linear epochs=1 lr=0.1; linear epochs=1 lr=0.01"
    for i, line in enumerate(lines[1:], 1):  # one line per finished point: done/total, its config, an ETA
        assert re.match(rf"ablate: \[{i}/2\] linear epochs=1 lr=0\.0?1 seed=0: test \d\.\d{{3}} in [\d.]+s; "
                        r"elapsed \d+s, ETA \d+s$", line), line
    assert len(lines) == 3
    code, _, err = run_cli(args + ["--out", tmp_path / "quiet", "--no-progress"], capsys)
    assert code == 0 and "ablate: " not in err


def test_bench_heads_prints_a_line_per_head(store_path, capsys):
    code, out, err = run_cli(["bench-heads", "--store", store_path, "--heads", "linear", "--epochs", "1",
                              "--val-fraction", "0", "--threads", "1"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("head ")
    assert re.search(r"^bench-heads: \[1/1\] linear: val n/a, test \d+\.\d\d%, \d+ prototypes, [\d.]+s; \d+s so far$",
                     err, re.M), err


def test_file_system_refusals_are_one_line():
    """The CLI's safety net for writes the checks could not foresee (a read-only disk, a full one)."""
    import errno

    from protocache.cli.main import os_error_line

    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/runs/x")) == (
        "cannot write or read /runs/x: permission denied; choose a path you can write to (or free space) and run "
        "the command again")
    assert "no space left" in os_error_line(OSError(errno.ENOSPC, "No space left on device", "/runs/x"))
    assert os_error_line(OSError(errno.EIO, "I/O error", "/runs/x")) is None  # not the user's to fix: a traceback
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied")) is None  # no path to name
