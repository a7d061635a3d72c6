"""End to end on the real digits cache of the default backbone: every head against the probe.

The targets (README): the linear probe reaches >= 94% test accuracy; ProtoQuant is within
2 points of it, InfoDisent within 3, ProtoPool within 5, each with its default config and
each fit well under two minutes on two CPU cores. The store comes from conftest's session
fixture (extracted once, ~2 minutes on 2 cores).
"""

from __future__ import annotations

import pytest

from protocache.pipeline.bench import BenchConfig, bench_heads, format_table

TARGET_GAP_POINTS = {"protoquant": 2.0, "infodisent": 3.0, "protopool": 5.0}


@pytest.mark.slow
def test_heads_reach_their_targets_on_digits(digits_lite0_store, tmp_path):
    rows = bench_heads(BenchConfig(store=str(digits_lite0_store), seed=0, out=str(tmp_path / "runs")))
    print("\n" + format_table(rows))
    by_head = {r["head"]: r for r in rows}
    probe = by_head["linear"]["test_accuracy"]
    assert probe >= 0.94, f"linear probe {probe:.4f} < 0.94"
    for head, gap in TARGET_GAP_POINTS.items():
        acc = by_head[head]["test_accuracy"]
        assert acc >= probe - gap / 100, f"{head} {acc:.4f} is more than {gap} points below the probe {probe:.4f}"
    assert by_head["protoquant"]["local_size"] <= 5
