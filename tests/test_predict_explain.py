"""predict --explain: OUT/index.html explaining each new image, checked file by file and in headless Chromium.

Runs are quick fits on the session's small store (tiny random test_efficientnet backbone, 120 digits);
the new images are digits rendered as the dataset renders them, written as files.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import markupsafe
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fit_helpers import quick_fit
from protocache.cli.main import main
from protocache.pipeline.model import load_model
from protocache.pipeline.predict import PredictConfig, run_predict
from protocache.pipeline.runs import run_splits
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError
from test_explain import CHROMIUM, _chromium  # the explain report's browser check, reused
from test_predict import render, write_hard_cases

# names that must reach the page only escaped: if either ran, the title or <body data-pwned> would change
SCRIPT_NAME = "<script>document.title='pwned'<"  # a good image's file name (no "/" in a file name)
ONERROR_NAME = "<img src=x onerror=document.body.dataset.pwned=1>"  # an unreadable file's name


@pytest.fixture(scope="module")
def runs(store_path, tmp_path_factory) -> dict[str, Path]:
    """A quick fit of every head on the small store (about a second each)."""
    tmp = tmp_path_factory.mktemp("predict_explain")
    for name in ("protoquant", "protopool", "infodisent", "linear"):
        quick_fit(name, store_path, tmp / name)
    return {name: tmp / name for name in ("protoquant", "protopool", "infodisent", "linear")}


@pytest.fixture(scope="module")
def nasty_run(runs, tmp_path_factory) -> Path:
    """The ProtoQuant run with every class renamed to a script tag (as a dataset with such class names gives)."""
    run = tmp_path_factory.mktemp("nasty") / "pq"
    shutil.copytree(runs["protoquant"], run)
    config = json.loads((run / "config.json").read_text())
    config["store"]["info"]["class_names"] = [f"<script>document.title='pwned {c}'</script>" for c in range(10)]
    (run / "config.json").write_text(json.dumps(config))
    return run


def mixed_folder(folder: Path) -> dict[str, bool]:
    """Good digit PNGs (one named with a script tag, one a 16-bit greyscale PNG), a truncated JPEG and a text
    file named .png; file name -> whether it is a good image."""
    folder.mkdir(parents=True)
    render(0).save(folder / "digit-0.png")
    render(1).save(folder / f"{SCRIPT_NAME}.png")
    write_hard_cases(folder, f"{ONERROR_NAME}.png")
    return {"digit-0.png": True, f"{SCRIPT_NAME}.png": True, "sixteen.png": True, "truncated.jpg": False,
            f"{ONERROR_NAME}.png": False}


def check_files(out: Path) -> tuple[str, dict]:
    """The page and its data; every <img> of the page is a PNG file of OUT/img, linked relatively."""
    page = (out / "index.html").read_text(encoding="utf-8")
    data = json.loads((out / "explain.json").read_text())
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert srcs and len(srcs) == page.count("<img ")
    for src in srcs:
        assert src.startswith("img/") and (out / src).is_file(), src
    assert {p.relative_to(out).as_posix() for p in (out / "img").glob("*.png")} == set(srcs)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    return page, data


def check_evidence(item: dict, out: Path, top_prototypes: int, input_hw: tuple[int, int]) -> None:
    """The top class's prototypes: ranked by |contribution|, each drawn on this image, with training patches."""
    block = item["block"]
    entries = block["prototypes"]
    contributions = [e["contribution"] for e in entries]
    assert 1 <= len(entries) <= top_prototypes and contributions == sorted(contributions, key=abs, reverse=True)
    view = np.asarray(Image.open(out / item["view_png"]).convert("RGB"), np.int16)
    assert view.shape[:2] == input_hw
    for e in entries:
        assert e["contribution"] == pytest.approx(e["positive"] - e["negative"], abs=1e-6)
        drawn = np.asarray(Image.open(out / e["overlay_png"]).convert("RGB"), np.int16)
        assert drawn.shape == view.shape and np.abs(drawn - view).mean() > 1  # the map and peak box on this image


@pytest.fixture(scope="module")
def explained(nasty_run, tmp_path_factory) -> dict:
    """`protocache predict --explain` on the mixed folder, through the CLI's entry point."""
    tmp = tmp_path_factory.mktemp("explained")
    names = mixed_folder(tmp / "photos")
    out = tmp / "pred"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = 0
        try:
            main(["predict", str(nasty_run), str(tmp / "photos"), "--out", str(out), "--explain", "--top-k", "3",
                  "--top-prototypes", "3", "--num-workers", "0", "--device", "cpu", "--no-progress"])
        except SystemExit as exc:  # main returns on success; it exits only with an error's code
            code = exc.code
    return {"names": names, "out": out, "code": code, "printed": printed.getvalue()}


def test_predict_explain_page_for_good_and_bad_files(explained, nasty_run, store_path):
    """The issue's check: every good image explained, every bad one listed with its reason, exit 0, the
    file and class names escaped."""
    names, out = explained["names"], explained["out"]
    assert explained["code"] == 0 and f"wrote {out / 'index.html'}" in explained["printed"]
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(names)
    page, data = check_files(out)
    model = load_model(nasty_run, device="cpu")
    input_hw = tuple(model.input_size)

    # every good image explained, in order, for the class predictions.parquet gives it
    items = {Path(i["path"]).name: i for i in data["items"]}
    assert sorted(items) == sorted(n for n, good in names.items() if good)
    assert [i["index"] for i in data["items"]] == [k for k, r in enumerate(rows) if r["ok"]]
    for item in data["items"]:
        row = rows[item["index"]]
        assert item["block"]["class"] == row["top_k_classes"][0] and item["pred_name"] == row["top_k_names"][0]
        assert [t["probability"] for t in item["top"]] == pytest.approx(row["top_k_probabilities"])
        # ProtoQuant's logit is exactly the sum of its prototypes' contributions (no bias)
        assert item["block"]["total_sum"] == pytest.approx(item["block"]["logit"], abs=1e-4)
        assert item["block"]["logit"] == pytest.approx(row["top_logit"], abs=1e-3)
        check_evidence(item, out, 3, input_hw)
    # the 16-bit PNG goes through the one decode rule: the evidence of its 8-bit rendering
    want = model.explain(render(3), top_prototypes=3)["classes"][0]["prototypes"]
    got = items["sixteen.png"]["block"]["prototypes"]
    assert [e["prototype"] for e in got] == [e["prototype"] for e in want]
    assert [e["contribution"] for e in got] == pytest.approx([e["contribution"] for e in want], abs=1e-5)

    # each shown prototype's training patches: its most present images among the rows the head was fitted on
    store = FeatureStore.open(store_path)
    train = run_splits(nasty_run, store).split_rows("train")
    with torch.inference_mode():
        presence = model.head.presence(torch.from_numpy(store.read_rows("tokens", train)).float())
    shown = {e["prototype"] for i in data["items"] for e in i["block"]["prototypes"]}
    assert sorted(int(p) for p in data["patches"]) == sorted(shown)
    for p, patches in data["patches"].items():
        assert len(patches) == 5 and {x["row"] for x in patches} <= set(train.tolist())
        top = torch.topk(presence[:, int(p)], 5).values.numpy()
        assert np.allclose([x["value"] for x in patches], top, atol=1e-5)
        assert all(x["class_name"] == store.metadata().column("class_name")[x["row"]].as_py() for x in patches)

    # every bad file listed with its reason, as in predictions.parquet
    bad = {Path(b["path"]).name: b["reason"] for b in data["unreadable"]}
    assert bad.keys() == {n for n, good in names.items() if not good}
    assert "runcated" in bad["truncated.jpg"] and "UnidentifiedImageError" in bad[f"{ONERROR_NAME}.png"]
    assert page.count('<li id="image-') == 2 and "runcated" in page

    # names reach the page only escaped
    for text in (SCRIPT_NAME, ONERROR_NAME, model.class_names[items["digit-0.png"]["block"]["class"]]):
        assert str(markupsafe.escape(text)) in page
    assert "<script>document" not in page and "<img src=x" not in page and page.count("<script") == 1


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install -y chromium; CI installs it)")
def test_predict_explain_page_in_headless_chromium(explained, tmp_path):
    """Every <img> loads (naturalWidth > 0) and no script but the page's own runs."""
    out = explained["out"]
    page = (out / "index.html").read_text(encoding="utf-8")
    dom = _chromium(["--dump-dom", (out / "index.html").resolve().as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
    assert attrs.get("ready") == "1", attrs  # the page's own script ran once every image settled
    assert int(attrs["images-total"]) == dom.stdout.count("<img ") == page.count("<img ") > 0
    assert attrs["images-loaded"] == attrs["images-total"] and attrs["images-broken"] == "0"  # naturalWidth > 0
    assert attrs["images-explained"] == attrs["images-expected"] == "3"
    assert attrs["unreadable-listed"] == attrs["unreadable-expected"] == "2"
    assert "pwned" not in attrs and "pwned" not in re.search(r"<title>([^<]*)</title>", dom.stdout).group(1)
    assert dom.stdout.count("<script") == 1  # the data became text, never an element


@pytest.mark.parametrize("head", ["protopool", "infodisent", "linear"])
def test_predict_explain_every_head(runs, head, tmp_path):
    """ProtoPool, InfoDisent (signed: evidence for and against) and the linear probe (its class maps)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for r in (5, 6):
        render(r).save(folder / f"digit-{r}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "pred"
    result = run_predict(PredictConfig(run=str(runs[head]), inputs=(str(folder),), out=str(out), explain=True,
                                       num_workers=0, device="cpu", progress=False))
    assert result.index == str(out / "index.html")
    page, data = check_files(out)
    model = load_model(runs[head], device="cpu")
    assert len(data["items"]) == 2 and [Path(b["path"]).name for b in data["unreadable"]] == ["broken.png"]
    assert json.loads((out / "predict.json").read_text())["explain"]["images_explained"] == 2
    entries = [e for i in data["items"] for e in i["block"]["prototypes"]]
    for item in data["items"]:
        check_evidence(item, out, 5, tuple(model.input_size))
    if head == "infodisent":  # signed evidence: both parts shown, some against the class
        assert data["summary"]["signed_maps"] and any(e["negative"] > 0 for e in entries)
        assert "−" in page
    else:
        assert not data["summary"]["signed_maps"]  # maps min-max scaled (a contribution may still be negative)
    if head == "linear":  # one "prototype" per class: the class's own map
        for item in data["items"]:
            (entry,) = item["block"]["prototypes"]
            assert entry["prototype"] == item["block"]["class"]
            assert entry["title"] == f"class map of {item['pred_name']}" and entry["title"] in page


def test_predict_explain_needs_the_runs_store(runs, tmp_path, capsys):
    """Without the store the run was fitted on, --explain is one error line before any image is read."""
    run = tmp_path / "moved-run"
    shutil.copytree(runs["protoquant"], run)
    config = json.loads((run / "config.json").read_text())
    config["store"]["path"] = str(tmp_path / "gone.zarr")
    (run / "config.json").write_text(json.dumps(config))
    render(0).save(tmp_path / "digit.png")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(run), str(tmp_path / "digit.png"), "--out", str(tmp_path / "pred"), "--explain",
              "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "predict --explain shows each prototype's training patches" in err and "gone.zarr" in err
    assert not (tmp_path / "pred").exists() and not list(tmp_path.glob(".pred*"))
    with pytest.raises(ProtocacheError, match="--top-prototypes must be an integer >= 1"):
        run_predict(PredictConfig(run=str(run), inputs=(str(tmp_path / "digit.png"),), out=str(tmp_path / "p"),
                                  explain=True, top_prototypes=0))
