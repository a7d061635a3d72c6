"""The README's "Adding a head" example, taken from the README itself: registered by importing
its one file, listed by `protocache heads`, fitted by `protocache fit-head`, loaded and evaluated."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from protocache.cli.main import main
from protocache.pipeline.evaluate import EvaluateConfig, evaluate_run
from protocache.pipeline.heads import _registry, list_heads
from protocache.pipeline.runs import load_run


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Adding a head"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def cosine_head(tmp_path):
    path = tmp_path / "cosine.py"
    path.write_text(readme_example())
    spec = importlib.util.spec_from_file_location("readme_cosine_head", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as `import` does (the field docstrings are read from the source)
    spec.loader.exec_module(module)  # registers the head
    yield module
    _registry._HEADS.pop("cosine", None)
    sys.modules.pop(spec.name, None)


def test_the_readme_head_is_registered_fitted_and_evaluated(cosine_head, store_path, tmp_path, capsys):
    assert "cosine" in list_heads()
    main(["heads"])
    listed = capsys.readouterr().out
    assert re.search(r"(?m)^cosine\s+One prototype per class", listed)
    main(["heads", "--json"])
    described = json.loads(capsys.readouterr().out)["cosine"]
    assert described["epochs"] == {"default": 10, "type": "int", "help": "Training epochs."}

    store = store_path
    run = tmp_path / "run"
    main(["fit-head", "cosine", "--store", str(store), "--out", str(run), "--set", "epochs=15",
          "--threads", "1", "--no-progress", "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["prototype_count"] == 10  # one per digit class
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1
    head, config, _ = load_run(run)
    assert isinstance(head, cosine_head.CosineHead) and config["head_config"]["epochs"] == 15
    results = evaluate_run(run, EvaluateConfig(confusion_png=False))
    assert results["top1"] == pytest.approx(metrics["test_accuracy"])
    assert results["class_prototype_rule"] == "the class's own prototype"
