"""`protocache bench --only PARTS`: the named parts alone (bad names: tests/test_bench_scale.py's one-line errors)."""

from __future__ import annotations

import json

from protocache.cli.main import main


def test_only_runs_the_named_part(capsys):
    capsys.readouterr()
    main(["bench", "--quick", "--only", "kmeans", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["only"] == ["kmeans"]
    assert [r["name"] for r in report["ratios"]] == ["k-means: scikit-learn time / FAISS time"]
    assert report["ratios"][0]["value"] > 0
