"""ablate: grid parsing, one read pass per group with the same weights as lone fits, resume, choice by val."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from protocache.pipeline.ablate import AblateConfig, AblatePoint, group_points, rank_by_val, read_grid, run_ablate
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.stores import ProtocacheError
from protocache.stores import runs


SHORT = {"codebook_epochs": 1, "prune_rounds": 1, "epochs": 2, "finetune_epochs": 1, "kmeans_iters": 5}



def write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_grid_file_and_groups(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "head: protoquant\ngrid:\n  codebook_size: [16, 24]\n  tau: [0.1, 0.2]\n"
                                           "configs:\n  - {codebook_size: 8, epochs: 3}\nseeds: [0, 1, 2]\n")
    points, fit = read_grid(grid)
    assert len(points) == (4 + 1) * 3 and fit == {}
    assert {p.seed for p in points} == {0, 1, 2}
    # same seed and schedule -> one group; the explicit config with other epochs trains apart
    sizes = sorted(len(g) for g in group_points(points))
    assert sizes == [1, 1, 1, 4, 4, 4]
    assert len(read_grid(grid, seeds=[7])[0]) == 5
    bad = write_grid(tmp_path / "b.yaml", "head: protoquant\ngrid:\n  codebook_sise: [16]\n")
    with pytest.raises(ProtocacheError, match="codebook_sise"):
        read_grid(bad)
    with pytest.raises(ProtocacheError, match="unknown head"):
        read_grid(write_grid(tmp_path / "h.yaml", "head: protonet\n"))


def test_one_read_pass_gives_each_head_its_lone_weights_and_resumes(store_path, tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", "head: protoquant\ngrid:\n  codebook_size: [16, 24]\n  tau: [0.1, 0.2]\n"
                                           f"configs: []\nseeds: [3]\nfit:\n  threads: 1\n  shards_in_memory: 1\n")
    grid.write_text(grid.read_text().replace("configs: []\n", ""))
    text = grid.read_text().replace("grid:\n", "grid:\n" + "".join(f"  {k}: [{v}]\n" for k, v in SHORT.items()))
    grid.write_text(text)
    summary = run_ablate(AblateConfig(store=str(store_path), grid_file=str(grid), out=str(tmp_path / "sweep")))
    assert summary == {**summary, "points": 4, "trained": 4, "skipped": 0, "groups": 1}
    table = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert len(table) == 4 and (tmp_path / "sweep" / "summary.png").stat().st_size > 1000
    for row in table:
        assert 0 <= row["test_accuracy"] <= 1 and row["config.codebook_size"] in (16, 24)
        assert 0 <= row["val_accuracy"] <= 1 and row["val_rank"] in (1, 2, 3, 4)
        # trained alone with the same seed and config: the very same bytes
        config = {k[len("config."):]: v for k, v in row.items() if k.startswith("config.")}
        alone = fit_head("protoquant", store_path, tmp_path / "alone" / row["run"], config,
                         FitConfig(seed=3, progress=False, threads=1, shards_in_memory=1))
        assert (Path(alone.run_dir) / runs.WEIGHTS).read_bytes() == \
            (tmp_path / "sweep" / row["run"] / runs.WEIGHTS).read_bytes()
    # one seed: the chosen config is the one with the best val accuracy, reported with its test accuracy
    best = max(table, key=lambda r: r["val_accuracy"])
    chosen = [r for r in table if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_accuracy"] == best["val_accuracy"] and chosen[0]["val_rank"] == 1
    assert summary["chosen"]["val_accuracy"] == chosen[0]["val_accuracy"]
    assert summary["chosen"]["test_accuracy"] == chosen[0]["test_accuracy"]
    assert summary["chosen"]["runs"] == [chosen[0]["run"]]
    # resumed (through the CLI): nothing left to train, same results, the chosen config printed last
    from protocache.cli.main import main

    main(["ablate", "--store", str(store_path), "--grid", str(grid), "--out", str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "4 points: 0 trained in 0 read pass(es), 4 already finished" in out
    assert out.strip().splitlines()[-1].endswith(f"its test accuracy {100 * chosen[0]['test_accuracy']:.2f}%")
    assert pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist() == table


def test_group_reads_each_batch_once(store_path, tmp_path):
    from protocache.pipeline.ablate import AblatePoint, run_group

    points = [AblatePoint("infodisent", {"epochs": 2, "gumbel_tau": t}, 0) for t in (0.3, 0.5, 0.7)]
    rows = run_group(str(store_path), points, str(tmp_path / "g"), {"threads": 1, "shards_in_memory": 1})
    # every batch the store delivered went to all three heads
    assert rows[0]["group_served"] == 3 * rows[0]["group_reads"] > 0


def test_rank_by_val_picks_the_config_validation_prefers():
    # config a: val 0.8 and 0.6 over two seeds (mean 0.7), test 0.9 and 0.9
    # config b: val 0.75 and 0.75 (mean 0.75), test 0.5 and 0.6 (mean 0.55)
    # config c: val 0.75 (mean 0.75, a tie with b: b is listed first and wins), test 1.0
    points = [AblatePoint("linear", {"lr": lr}, s) for lr, seeds in ((1, (0, 1)), (2, (0, 1)), (3, (0,)))
              for s in seeds]
    rows = [{"run": f"r{i}", "val_accuracy": v, "test_accuracy": t}
            for i, (v, t) in enumerate([(0.8, 0.9), (0.6, 0.9), (0.75, 0.5), (0.75, 0.6), (0.75, 1.0)])]
    chosen = rank_by_val(points, rows)
    assert chosen["config"] == {"lr": 2} and chosen["seeds"] == [0, 1] and chosen["runs"] == ["r2", "r3"]
    assert chosen["val_accuracy"] == pytest.approx(0.75) and chosen["test_accuracy"] == pytest.approx(0.55)
    assert [r["val_rank"] for r in rows] == [3, 3, 1, 1, 2]
    assert [r["chosen"] for r in rows] == [False, False, True, True, False]
    # no validation split anywhere (val_fraction 0): nothing is chosen, test is never used instead
    rows = [{"run": "r", "val_accuracy": None, "test_accuracy": 0.9}]
    assert rank_by_val(points[:1], rows) is None and rows[0]["chosen"] is False and rows[0]["val_rank"] is None


@pytest.mark.slow
def test_twelve_point_protoquant_sweep_on_digits(digits_lite0_store, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "head: protoquant\ngrid:\n  codebook_size: [30, 60]\n  tau: [0.1, 0.2]\n"
                      "  codebook_epochs: [1]\n  prune_rounds: [1]\n  epochs: [4]\n  finetune_epochs: [1]\n"
                      "seeds: [0, 1, 2]\n")
    summary = run_ablate(AblateConfig(store=str(digits_lite0_store), grid_file=str(grid), out=str(tmp_path / "s")))
    assert summary["points"] == 12 and summary["trained"] == 12 and summary["groups"] == 3
    table = pq.read_table(tmp_path / "s" / "results.parquet")
    assert table.num_rows == 12 and min(table.column("test_accuracy").to_pylist()) > 0.5  # chance is 0.1
    assert sum(table.column("chosen").to_pylist()) == 3  # the val-chosen config, all three of its seeds
    assert summary["chosen"]["seeds"] == [0, 1, 2] and summary["chosen"]["configs_ranked"] == 4
    assert (tmp_path / "s" / "summary.png").exists()
    again = run_ablate(AblateConfig(store=str(digits_lite0_store), grid_file=str(grid), out=str(tmp_path / "s")))
    assert again["trained"] == 0 and again["skipped"] == 12
