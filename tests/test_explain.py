"""The explain report: real stores (tiny timm backbone), real fitted heads, real PNGs, real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import markupsafe
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from protocache.cli.main import main as cli_main
from protocache.pipeline.backbones import Backbone, BackboneConfig
from protocache.pipeline.datasets import create_dataset
from protocache.pipeline.datasets.synthetic_birds import make_synthetic_birds
from protocache.pipeline.explain import ExplainConfig, ImageSource, choose_images, explain_run, reroot, used_prototypes
from protocache.pipeline.extract import ExtractConfig, _load_cropped, run_extract
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.pipeline.evaluate import EvaluateConfig, evaluate_run
from protocache.pipeline.runs import load_run, run_splits
from protocache.stores import FeatureStore, ProtocacheError

CHROMIUM = Path("/usr/bin/chromium")
NASTY = "<img src=x onerror=alert(1)> & \"Co\""  # a class name that must never reach the page unescaped


def _extract(out: Path, **cfg) -> FeatureStore:
    base = dict(backbone="test_efficientnet", weights="random", shard_size=16, chunk_size=8, batch_size=16,
                out=str(out), progress=False, num_workers=0, threads=1)
    run_extract(ExtractConfig(**(base | cfg)))
    return FeatureStore.open(out)


def _fit(name: str, store: Path, out: Path, **head_config) -> Path:
    fit_head(name, store, out, head_config, FitConfig(device="cpu", threads=1, progress=False))
    return out


def _src_paths(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory):
    """A ProtoQuant head on 80 digits (8x8 images rendered by the loader) and its report."""
    tmp = tmp_path_factory.mktemp("explain_digits")
    store = _extract(tmp / "digits.zarr", dataset="digits", limit=80)
    run = _fit("protoquant", store.path, tmp / "run", codebook_size=32, epochs=3, codebook_epochs=1,
               finetune_epochs=1, kmeans_sample=2000)
    out = tmp / "report"
    result = explain_run(ExplainConfig(run=str(run), out=str(out), images=6, seed=1, device="cpu"))
    return {"store": store, "run": run, "out": out, "result": result}


@pytest.fixture(scope="module")
def birds_report(tmp_path_factory):
    """An InfoDisent head (signed evidence) on synthetic CUB birds cropped to their boxes, one class renamed
    to an HTML-injection string, and its report."""
    tmp = tmp_path_factory.mktemp("explain_birds")
    base = make_synthetic_birds(tmp / "birds", classes=3, per_class=6, seed=2, image_size=64)
    classes = (base / "classes.txt").read_text().splitlines()
    classes[0] = f"1 001.{NASTY}"
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    store = _extract(tmp / "birds.zarr", dataset="cub", root=str(tmp / "birds"))
    run = _fit("infodisent", store.path, tmp / "run", epochs=2)
    out = tmp / "report"
    result = explain_run(ExplainConfig(run=str(run), out=str(out), images=4, patches=3, top_prototypes=3,
                                       max_prototypes=12, device="cpu"))
    return {"store": store, "run": run, "out": out, "result": result}


def test_choose_images_mixes_correct_and_wrong_and_is_seeded():
    correct = np.array([True] * 7 + [False] * 3)
    pick = choose_images(correct, 6, seed=0)
    assert len(pick) == 6 and len(set(pick.tolist())) == 6
    assert correct[pick].sum() == 3 and (~correct[pick]).sum() == 3
    assert np.array_equal(pick, choose_images(correct, 6, seed=0))
    assert not all(np.array_equal(pick, choose_images(correct, 6, seed=s)) for s in range(1, 6))
    assert (~correct[choose_images(correct, 9, seed=0)]).sum() == 3  # too few wrong ones: more right ones
    few_right = np.array([True, False, False, False])
    assert few_right[choose_images(few_right, 3, seed=0)].sum() == 1  # one right, two wrong


def test_model_input_view_is_what_the_backbone_saw(digits_report, birds_report):
    """View -> timm normalisation == the extract path's tensor (crop_box and 8x8 upscaling included)."""
    backbone = Backbone(BackboneConfig("test_efficientnet", weights="random", device="cpu", precision="fp32"))
    mean = torch.tensor(backbone.data_config["mean"])[:, None, None]
    std = torch.tensor(backbone.data_config["std"])[:, None, None]
    for report, rows, root in ((digits_report, [0, 41, 79], None), (birds_report, [0, 5, 17], "birds")):
        store = report["store"]
        source = ImageSource(store)
        root = str(report["out"].parent / root) if root else None
        dataset = create_dataset(store.fingerprint["dataset"], root)
        transform = backbone.transform(store.fingerprint["preprocessing"].get("resize", "timm"))
        for row in rows:
            view = source.view(row)
            assert view.size == tuple(store.attrs["input_size"][1:][::-1])
            mine = (torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
            theirs = transform(_load_cropped(dataset, row).convert("RGB"))
            assert torch.allclose(mine, theirs, atol=1e-5), (store.fingerprint["dataset"], row)
    assert "crop_box" in ImageSource(birds_report["store"]).record(0)


def test_digits_report_files_and_gallery(digits_report):
    out, result = digits_report["out"], digits_report["result"]
    page = (out / "index.html").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    head, config, _ = load_run(digits_report["run"])
    store = digits_report["store"]
    used, _ = used_prototypes(head, 10)

    # gallery: every prototype the head uses, most important first, each with its top training patches
    assert result.prototypes_used == result.prototypes_shown == len(used) == len(report["gallery"])
    assert page.count('class="card prototype"') == len(used)
    assert sorted(g["prototype"] for g in report["gallery"]) == used
    importance = [g["importance"] for g in report["gallery"]]
    assert importance == sorted(importance, reverse=True)
    train_rows = run_splits(digits_report["run"], store).split_rows("train")  # the rows the head was fitted on
    with torch.inference_mode():
        presence = head.presence(torch.from_numpy(store.read_rows("tokens", train_rows)).float())  # [N, P]
    for g in report["gallery"][:5]:
        p = g["prototype"]
        assert len(g["patches"]) == 10 and len({x["row"] for x in g["patches"]}) == 10  # purity's ten images
        top10 = torch.topk(presence[:, p], 10).values.numpy()
        assert np.allclose([x["value"] for x in g["patches"]], top10, atol=1e-5)
        for patch in g["patches"]:
            assert patch["row"] in set(train_rows.tolist())
            assert Image.open(out / patch["png"]).size == (128, 128)
        assert all(c["weight"] > 0 for c in g["classes"])

    # explained images: seeded mix of correct and wrong test predictions, evidence adds up to the logit
    items = report["images"]
    assert len(items) == result.images_explained == 6
    assert {i["correct"] for i in items} == {True, False}
    test_rows = set(store.split_rows("test").tolist())
    for item in items:
        assert item["row"] in test_rows
        assert Image.open(out / item["view_png"]).size == (160, 160)
        assert [b["class"] for b in item["blocks"]][0] == item["pred"]
        if not item["correct"]:
            assert item["blocks"][1]["class"] == item["label"]
        for block in item["blocks"]:
            assert block["total_sum"] == pytest.approx(block["logit"], abs=1e-4)  # ProtoQuant has no bias
            contrib = [e["contribution"] for e in block["prototypes"]]
            assert contrib == sorted(contrib, key=abs, reverse=True) and 1 <= len(contrib) <= 5
            for e in block["prototypes"]:
                assert e["negative"] == 0 and e["contribution"] == pytest.approx(e["presence"] * e["weight"], rel=1e-4)
                overlay = Image.open(out / e["overlay_png"])
                assert overlay.size == (160, 160)
                plain = np.asarray(Image.open(out / item["view_png"]), np.int16)
                assert np.abs(np.asarray(overlay, np.int16) - plain).mean() > 1  # the heatmap is drawn on it
                assert e["patches"] == [x["png"] for g in report["gallery"] if g["prototype"] == e["prototype"]
                                        for x in g["patches"]][:5]  # the first --patches of them

    # every image on the page is a file of the report, linked relatively; nothing from the network
    srcs = _src_paths(page)
    assert len(srcs) == page.count("<img ") and srcs
    for src in srcs:
        assert src.startswith("img/") and (out / src).is_file()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "@import" not in page and "url(" not in page
    pngs = {p.relative_to(out).as_posix() for p in (out / "img").glob("*.png")}
    assert pngs == set(srcs) and len(pngs) == result.png_files


def test_birds_report_escapes_data_and_shows_negative_evidence(birds_report):
    out, result = birds_report["out"], birds_report["result"]
    page = (out / "index.html").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    store = birds_report["store"]
    assert store.attrs["class_names"][0] == NASTY
    assert "onerror=alert" in page  # the name is on the page ...
    # ... only escaped (as the page's Jinja autoescape escapes: &lt; &gt; &amp; &#34; &#39;)
    assert "<img src=x" not in page and str(markupsafe.escape(NASTY)) in page
    # InfoDisent: the gallery is capped, maps are signed, evidence for and against adds up to the logit
    assert result.prototypes_shown == 12 and result.prototypes_used > 12 and report["summary"]["signed_maps"]
    assert page.count('class="card prototype"') == 12
    negatives = 0
    for item in report["images"]:
        for block in item["blocks"]:
            assert block["total_sum"] == pytest.approx(block["logit"], abs=1e-4)
            for e in block["prototypes"]:
                assert e["contribution"] == pytest.approx(e["positive"] - e["negative"], abs=1e-6)
                negatives += e["negative"] > 0
                assert Image.open(out / e["overlay_png"]).size == (160, 160)
    assert negatives > 0
    for src in _src_paths(page):
        assert (out / src).is_file()


def test_gallery_shows_what_purity_scores_on_the_training_split(birds_report):
    """The gallery's images and patches are the rows `evaluate --split train` writes to purity.parquet, and
    the purity on the page is the number evaluate reports."""
    report = json.loads((birds_report["out"] / "report.json").read_text())
    run = birds_report["run"]
    evaluated = evaluate_run(run, EvaluateConfig(split="train", confusion_png=False))
    rows = pq.read_table(run / "eval-train" / "purity.parquet").to_pylist()
    for g in report["gallery"]:
        mine = [(x["image_id"], x["peak_x"], x["peak_y"], pytest.approx(x["value"], abs=1e-6)) for x in g["patches"]]
        assert mine == [(r["image_id"], r["peak_x"], r["peak_y"], r["presence"]) for r in rows
                        if r["prototype"] == g["prototype"]]
        side = report["summary"]["purity_patch"]
        for x in g["patches"]:  # the box drawn is the purity patch, moved inside the image
            x0, y0, x1, y1 = x["patch_box"]
            assert x1 - x0 == pytest.approx(side) and y1 - y0 == pytest.approx(side)
            assert x0 >= 0 and y0 >= 0 and x1 <= 160 + 1e-9 and y1 <= 160 + 1e-9
            assert x0 <= x["peak_x"] <= x1 and y0 <= x["peak_y"] <= y1
        assert g["purity"] is not None and 0 <= g["purity"]["value"] <= 1
    summary = report["summary"]["purity"]
    assert summary["value"] == pytest.approx(evaluated["purity"]["value"], abs=1e-12)
    assert summary["part_related"] == evaluated["purity"]["part_related"]


def test_cli_explain_rewrites_a_report_and_refuses_other_folders(digits_report, tmp_path, capsys):
    out = tmp_path / "cli-report"
    cli_main(["explain", str(digits_report["run"]), "--out", str(out), "--images", "2", "--patches", "2",
              "--max-prototypes", "3", "--device", "cpu"])
    assert "3 of" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert page.count('class="card prototype"') == 3
    assert len(json.loads((out / "report.json").read_text())["images"]) == 2
    stale = out / "img" / "stale.png"
    stale.write_bytes(b"x")
    cli_main(["explain", str(digits_report["run"]), "--out", str(out), "--images", "1", "--patches", "1",
              "--max-prototypes", "2", "--device", "cpu"])
    assert not stale.exists() and (out / "index.html").read_text().count('class="card prototype"') == 2
    other = tmp_path / "not-a-report"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["explain", str(digits_report["run"]), "--out", str(other)])
    assert exit_info.value.code == 2 and "not an explain report" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ProtocacheError, match="no split 'nope'"):
        explain_run(ExplainConfig(run=str(digits_report["run"]), out=str(tmp_path / "r2"), split="nope"))


def test_reroot_moves_paths_recorded_under_the_dataset_root():
    assert reroot("/data/cub/CUB_200_2011/images/a.jpg", "/data/cub", None) == "/data/cub/CUB_200_2011/images/a.jpg"
    assert reroot("/data/cub/CUB_200_2011/images/a.jpg", "/data/cub", "/moved") == "/moved/CUB_200_2011/images/a.jpg"
    # extracted with a relative --root: the path starts with that root's last component(s)
    assert reroot("cub/CUB_200_2011/a.jpg", "/data/cub", None) == "/data/cub/CUB_200_2011/a.jpg"
    assert reroot("../x/cub/CUB_200_2011/a.jpg", "/data/x/cub", "/moved") == "/moved/CUB_200_2011/a.jpg"
    assert reroot("CUB_200_2011/a.jpg", "/data/cub", "/moved") == "/moved/CUB_200_2011/a.jpg"  # --root .
    assert reroot("sklearn:digits/3", None, "/moved") == "sklearn:digits/3"  # no folder: as recorded
    assert reroot("/elsewhere/a.jpg", "/data/cub", "/moved") == "/elsewhere/a.jpg"


def test_moved_dataset_needs_root_and_a_failed_run_keeps_the_previous_report(birds_report, tmp_path):
    store, run = birds_report["store"], birds_report["run"]
    recorded = Path(store.attrs["dataset_root"])
    moved = tmp_path / "moved"
    shutil.copytree(recorded, moved)
    source = ImageSource(store, root=str(moved))
    record = source.record(3)
    assert record["path"].startswith(str(moved)) and Path(record["path"]).is_file()
    assert np.array_equal(np.asarray(source.view(3)), np.asarray(ImageSource(store).view(3)))

    out = tmp_path / "report"
    cfg = dict(run=str(run), out=str(out), images=2, patches=1, top_prototypes=1, max_prototypes=2, device="cpu")
    explain_run(ExplainConfig(**cfg, root=str(moved)))
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(ProtocacheError, match=r"cannot reload image .*Pass --root DIR if the dataset moved"):
        explain_run(ExplainConfig(**(cfg | {"images": 3}), root=str(tmp_path / "nowhere")))
    assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no staging folder left


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install -y chromium; CI installs it)")
def test_report_renders_in_headless_chromium(digits_report, tmp_path):
    out = digits_report["out"]
    url = (out / "index.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("ready") == "1", attrs  # the page's own script ran after every image settled
    expected = len(json.loads((out / "report.json").read_text())["gallery"])
    assert int(attrs["images-total"]) == dom.stdout.count("<img ") > expected
    assert attrs["images-loaded"] == attrs["images-total"] and attrs["images-broken"] == "0"
    assert int(attrs["prototypes-shown"]) == int(attrs["prototypes-expected"]) == expected
    assert int(attrs["images-explained"]) == 6

    shot = tmp_path / "report.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], tmp_path / "profile-shot")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2000, 1280, 3)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 500  # header, text, heatmaps
    dark_header = image[:40, :, :].mean()
    assert dark_header < 90  # the dark title bar rendered: the stylesheet applied
    if os.environ.get("PROTOCACHE_SCREENSHOT_DIR"):  # keep the screenshot for a human to look at
        keep = Path(os.environ["PROTOCACHE_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "explain-report.png")
