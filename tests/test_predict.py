"""A trained run outside the cache: load_model, predict (API and CLI), explain, export.

Fast tests use the session's small store of the tiny random backbone (test_efficientnet,
120 digits) and a quick ProtoQuant fit on it; the slow ones use the default backbone
(tf_efficientnet_lite0, shipped weights) on the full digits store.

Tolerances. The store holds float16 tokens of a forward at the store's precision (bf16 on
CPUs with native bf16, as here); predict reruns the same forward on the same pixels and
rounds to float16 the same way, so the logits agree up to the kernels' dependence on the
batch size: we allow |dlogit| <= 2^-8 * max|logit| (one bf16 rounding step; measured on
lite0 digits: 0 at extract's batch of 64, <= 5e-7 at batches of 1 and 7). An exported
program runs the very same float ops, so it must agree with load_model within
1e-4 * max|logit|.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fit_helpers import quick_fit
from protocache.cli.main import main
from protocache.pipeline.datasets import create_dataset
from protocache.pipeline.model import load_model
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError

BF16_TOLERANCE = 2 ** -8  # of max |logit|: store vs predict (see the module docstring)
EXPORT_TOLERANCE = 1e-4  # of max |logit|: exported program vs load_model


@pytest.fixture(scope="module")
def run(store_path, tmp_path_factory) -> Path:
    """A quick ProtoQuant fit on the tiny store."""
    out = tmp_path_factory.mktemp("predict") / "pq"
    quick_fit("protoquant", store_path, out)
    return out


@pytest.fixture(scope="module")
def model(run):
    return load_model(run, device="cpu")


def render(row: int) -> Image.Image:
    """Digit `row` exactly as the digits dataset renders it for extract."""
    return create_dataset("digits").load_image(int(row))


def write_pngs(rows, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        paths.append(folder / f"digit-{int(row):04d}.png")
        render(row).save(paths[-1])
    return paths


def write_hard_cases(folder: Path, text_name: str) -> None:
    """Into `folder`: digit 3 as a 16-bit greyscale PNG (a good image), a truncated JPEG and a text file named
    `text_name` (two bad ones)."""
    grey = np.asarray(render(3).convert("L"), dtype=np.uint16) * 257  # 8 -> 16 bits, exactly invertible
    Image.fromarray(grey).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    render(4).resize((64, 64)).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / text_name).write_text("not an image at all")


def cached_logits(model, store: FeatureStore, rows) -> torch.Tensor:
    with torch.inference_mode():
        return model.head(torch.from_numpy(store.read_rows("tokens", np.asarray(rows))).float()).float()


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    scale = float(want.abs().max())
    worst = float((got - want).abs().max())
    assert worst <= tolerance * scale, f"max |dlogit| {worst:.3g} > {tolerance:.3g} * {scale:.3g}"


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """Good digit PNGs (one in a subfolder, one as a 16-bit greyscale PNG), a truncated JPEG and a text file
    named .png."""
    folder = tmp_path / "photos"
    write_pngs([0, 1], folder)
    write_pngs([2], folder / "nested" / "deeper")
    write_hard_cases(folder, "notes.png")
    return folder


# ----------------------------------------------------------------------------- load_model and the API


def test_load_model_gives_the_cached_logits(model, store_path):
    store = FeatureStore.open(store_path)
    rows = store.split_rows("test")
    x = torch.stack([model.preprocess(render(r)) for r in rows])
    with torch.inference_mode():
        logits = model(x)
    want = cached_logits(model, store, rows)
    assert logits.shape == (len(rows), model.num_classes)
    assert torch.equal(logits.argmax(1), want.argmax(1))
    assert_close_logits(logits, want, BF16_TOLERANCE)
    assert model.precision == store.fingerprint["precision"]
    assert model.preprocessing == store.fingerprint["preprocessing"]
    assert model.weights_sha256 == store.fingerprint["weights_sha256"]
    model.train()  # frozen: stays in eval mode, no gradients
    assert not model.training and not model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.parameters())


def test_predict_api_takes_paths_and_pil_images(model, tmp_path):
    (path,) = write_pngs([7], tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    table = model.predict([render(5), path, tmp_path / "bad.png"], top_k=50)
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == [None, str(path), str(tmp_path / "bad.png")]
    assert [r["ok"] for r in rows] == [True, True, False]
    assert rows[2]["reason"] and rows[2]["top_k_classes"] == [] and rows[2]["top_logit"] is None
    x = torch.stack([model.preprocess(render(5)), model.preprocess(render(7))])
    with torch.inference_mode():
        logits = model(x)
    for r, lg in zip(rows[:2], logits):
        assert len(r["top_k_classes"]) == model.num_classes  # top_k is capped at the class count
        assert r["top_k_classes"][0] == int(lg.argmax())
        assert r["top_k_names"] == [model.class_names[c] for c in r["top_k_classes"]]
        probs = np.asarray(r["top_k_probabilities"])
        assert np.all(np.diff(probs) <= 0) and abs(probs.sum() - 1) < 1e-4
        assert r["top_logit"] == pytest.approx(float(lg.max()), abs=1e-5)


def test_explain_names_prototypes_maps_and_contributions(model, tmp_path):
    (path,) = write_pngs([11], tmp_path)
    pred = int(model.predict([path]).column("top_k_classes")[0][0].as_py())
    other = (pred + 1) % model.num_classes
    evidence = model.explain(path, top_prototypes=3, label=model.class_names[other])
    assert evidence["pred"] == pred and evidence["label"] == other
    assert [b["class"] for b in evidence["classes"]] == [pred, other]
    assert evidence["input_view"].size == model.input_size[::-1]
    assert evidence["contributions"].shape == (model.num_classes, model.head.prototype_count)
    np.testing.assert_allclose(evidence["contributions"].sum(1), evidence["logits"], atol=1e-4)
    for block in evidence["classes"]:
        c = block["class"]
        assert block["class_name"] == model.class_names[c]
        # ProtoQuant's logit is exactly the sum of its prototypes' contributions
        assert block["total_sum"] == pytest.approx(float(evidence["logits"][c]), abs=1e-4)
        assert 0 < len(block["prototypes"]) <= 3
        for entry in block["prototypes"]:
            m = entry["map"]
            assert m.shape == model.grid
            assert entry["peak_cell"] == int(m.argmax())
            assert entry["peak"] == divmod(entry["peak_cell"], model.grid[1])
            x0, y0, x1, y1 = entry["peak_box"]
            assert 0 <= x0 < x1 <= model.input_size[1] and 0 <= y0 < y1 <= model.input_size[0]
            assert entry["contribution"] == pytest.approx(entry["presence"] * entry["weight"], rel=1e-4)
    with pytest.raises(ProtocacheError, match="unknown class"):
        model.explain(path, label="eleven")


def test_pipeline_exports_the_stages_lazily():
    code = ("import sys, protocache.pipeline as P; assert 'torch' not in sys.modules, 'eager import'; "
            "from protocache.pipeline import (load_model, ProtoModel, run_extract, ExtractConfig, fit_head, FitConfig, "
            "evaluate_run, EvaluateConfig, explain_run, ExplainConfig, run_ablate, AblateConfig, run_predict, "
            "PredictConfig, export_run, ExportConfig); print(sorted(P.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "load_model" in out.stdout and "ExplainConfig" in out.stdout


def test_numeric_options_have_value_rules():
    import dataclasses
    import typing

    from protocache.pipeline import config as C
    from protocache.pipeline.export import ExportConfig
    from protocache.pipeline.predict import PredictConfig

    for cls in (PredictConfig, ExportConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            scalar = C._scalar_types(hints[f.name])
            if scalar and (int in scalar or float in scalar):
                assert C.value_rule(f.name) is not None, f"{cls.__name__}.{f.name}"
        assert set(C.field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}  # every field documented


# ----------------------------------------------------------------------------- the CLI


def test_predict_writes_a_row_per_file_and_bad_files_are_rows(run, model, mixed_folder, tmp_path, capsys):
    out = tmp_path / "pred"
    main(["predict", str(run), str(mixed_folder), "--out", str(out), "--top-k", "3", "--num-workers", "1",
          "--batch-size", "2", "--no-progress"])  # returns: exit 0
    table = pq.read_table(out / "predictions.parquet")
    rows = {Path(r["path"]).relative_to(mixed_folder).as_posix(): r for r in table.to_pylist()}
    assert list(rows) == ["digit-0000.png", "digit-0001.png", "nested/deeper/digit-0002.png", "notes.png",
                          "sixteen.png", "truncated.jpg"]  # sorted by relative path
    bad = {k for k, r in rows.items() if not r["ok"]}
    assert bad == {"notes.png", "truncated.jpg"}
    assert "UnidentifiedImageError" in rows["notes.png"]["reason"]
    assert "runcated" in rows["truncated.jpg"]["reason"]
    assert all(r["reason"] == "" and len(r["top_k_classes"]) == 3 for k, r in rows.items() if k not in bad)
    # the 16-bit PNG decodes (v * 255 / 65535) to the very pixels of its 8-bit rendering
    want = model.predict([render(3)], top_k=3).to_pylist()[0]
    assert rows["sixteen.png"]["top_k_classes"] == want["top_k_classes"]
    assert rows["sixteen.png"]["top_logit"] == pytest.approx(want["top_logit"], abs=1e-5)
    printed = capsys.readouterr().out
    assert "unreadable" in printed and "6 images (2 unreadable)" in printed
    assert json.loads((out / "predict.json").read_text())["images"] == 6
    # a re-run replaces the previous output whole; a folder that is not a predict output is refused
    main(["predict", str(run), str(mixed_folder / "digit-0000.png"), "--out", str(out), "--no-progress"])
    assert pq.read_table(out / "predictions.parquet").num_rows == 1
    assert not list(tmp_path.glob(".pred*"))  # no staging leftovers
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(run), str(mixed_folder), "--out", str(foreign), "--no-progress"])
    assert exc.value.code == 2 and (foreign / "thesis.txt").read_text() == "keep me"
    assert "not a predict output folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["RUN", "nowhere.png"], "input nowhere.png does not exist"),
    (["RUN", "EMPTY"], "no image files in"),
    (["RUN", "IMG", "--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["RUN", "IMG", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["RUN", "IMG", "--num-workers", "-1"], "--num-workers must be an integer >= 0, got -1"),
    (["missing-run", "IMG"], "run folder missing-run does not exist"),
    (["RUN", "IMG", "--out", "IMG"], "exists and is not a folder"),
    (["RUN", "EMPTY", "--out", "EMPTY"], "is the input folder"),
])
def test_bad_predict_input_is_one_error_line(run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    write_pngs([0], tmp_path)
    names = {"RUN": str(run), "IMG": "digit-0000.png"}
    with pytest.raises(SystemExit) as exc:
        main(["predict", *[names.get(a, a) for a in args]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "predictions").exists()


def test_weights_of_another_sha256_are_refused(run, store_path, tmp_path, capsys):
    from safetensors.torch import save_file

    from protocache.pipeline.backbones import create_frozen_model, state_dict_sha256

    backbone, _ = create_frozen_model("test_efficientnet", "random")  # the weights the store was extracted with
    same = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(same))
    assert load_model(run, device="cpu", weights=str(same)).weights_sha256 == state_dict_sha256(backbone)
    with torch.no_grad():
        backbone.conv_stem.weight[0, 0, 0, 0] += 1e-3  # one value off
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(other))
    want = FeatureStore.open(store_path).fingerprint["weights_sha256"]
    got = state_dict_sha256(backbone)
    with pytest.raises(ProtocacheError) as exc:
        load_model(run, device="cpu", weights=str(other))
    assert want in str(exc.value) and got in str(exc.value) and "\n" not in str(exc.value)
    write_pngs([0], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(run), str(tmp_path / "digit-0000.png"), "--weights", str(other),
              "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and got in err and want in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() and not (tmp_path / ".p.partial").exists()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("args, message", [
    (["missing-run"], "run folder missing-run does not exist"),
    (["RUN", "--format", "onnx"], "--format must be one of auto, export, torchscript, got 'onnx'"),
    (["RUN", "--out", "."], "is a folder; name the program file"),
])
def test_bad_export_input_is_one_error_line(run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["export", *[str(run) if a == "RUN" else a for a in args]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []

LOAD_ALONE = """
import json, sys, torch
path, fmt, images, out = sys.argv[1:]
extra = {"protocache.json": ""}
if fmt == "torch.export":
    program = torch.export.load(path, extra_files=extra).module()
else:
    program = torch.jit.load(path, _extra_files=extra)
with torch.inference_mode():
    torch.save(program(torch.load(images)), out)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("protocache", "timm", "torchvision"))
print(json.dumps({"leaked": leaked, "meta": json.loads(extra["protocache.json"])}))
"""


def load_alone(path: Path, fmt: str, images: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, dict]:
    """Logits of an exported program run in a fresh interpreter that imports only torch."""
    torch.save(images, tmp_path / "images.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(path), fmt, str(tmp_path / "images.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []  # neither protocache nor timm (nor torchvision) was needed
    return torch.load(tmp_path / "logits.pt"), report["meta"]


@pytest.mark.slow
def test_export_loads_with_torch_alone(run, model, tmp_path, capsys):
    x = torch.stack([model.preprocess(render(r)) for r in (0, 1, 2)])
    with torch.inference_mode():
        want = model(x)
    for fmt, flags in (("torch.export", []), ("torchscript", ["--format", "torchscript"])):
        path = tmp_path / fmt / "model.pt2"
        main(["export", str(run), "--out", str(path), *flags])
        printed = capsys.readouterr().out
        assert f"({fmt};" in printed and ("TorchScript instead" in printed) == (fmt == "torchscript")
        sidecar = json.loads(path.with_name("model.pt2.json").read_text())
        assert sidecar["format"] == fmt
        assert sidecar["class_names"] == model.class_names and sidecar["preprocessing"] == model.preprocessing
        got, meta = load_alone(path, fmt, x, tmp_path / fmt)
        assert meta == sidecar  # the archive carries the same metadata
        assert got.shape == want.shape
        assert_close_logits(got, want, EXPORT_TOLERANCE)


# ----------------------------------------------------------------------------- the default backbone, end to end


@pytest.mark.slow
def test_round_trip_on_the_digits_store(digits_lite0_store, tmp_path):
    """50 test digits written as PNG, predicted from the files, agree with the cached test predictions."""
    store = FeatureStore.open(digits_lite0_store)
    run = tmp_path / "pq"
    quick_fit("protoquant", digits_lite0_store, run)
    rows = store.split_rows("test")[:50]
    paths = write_pngs(rows, tmp_path / "pngs")
    main(["predict", str(run), str(tmp_path / "pngs"), "--out", str(tmp_path / "pred"), "--top-k", "1",
          "--no-progress"])
    table = pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pylist()
    assert [r["path"] for r in table] == [str(p) for p in paths] and all(r["ok"] for r in table)
    model = load_model(run, device="cpu")
    want = cached_logits(model, store, rows)
    assert [r["top_k_classes"][0] for r in table] == want.argmax(1).tolist()  # every image
    top = torch.tensor([r["top_logit"] for r in table])
    assert_close_logits(top, want.max(1).values, BF16_TOLERANCE)
    x = torch.stack([model.preprocess(render(r)) for r in rows])
    with torch.inference_mode():
        assert_close_logits(model(x), want, BF16_TOLERANCE)  # every class's logit, not just the top one
