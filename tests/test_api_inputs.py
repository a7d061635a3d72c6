"""The Python API handed wrong things: the store readers, the loaded model and fit_head answer with the right
result or one clear ProtocacheError, never a silently wrong result or a hang."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fit_helpers import quick_fit
from protocache.pipeline.extract import ExtractConfig
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.pipeline.model import load_model
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError


@pytest.fixture(scope="module")
def store(store_path) -> FeatureStore:
    return FeatureStore.open(store_path)


@pytest.fixture(scope="module")
def model(store_path, tmp_path_factory):
    run = quick_fit("linear", store_path, tmp_path_factory.mktemp("api") / "run").run_dir
    return load_model(run, device="cpu")


def test_read_rows_takes_row_numbers_or_a_mask_and_nothing_else(store):
    mask = np.zeros(store.num_images, dtype=bool)
    mask[[10, 50, 100]] = True
    assert np.array_equal(store.read_rows("pooled", mask), store.read_rows("pooled", [10, 50, 100]))
    assert np.array_equal(store.read_rows("pooled", [50, 10, 50])[1], store.read("pooled", 10, 11)[0])
    for rows, message in (([1.9], "1-D list of integer row numbers"), ([[1, 2]], "1-D list"),
                          ([True, False], "one entry per image"), ([-1], "row -1 is outside"),
                          ([store.num_images], f"row {store.num_images} is outside")):
        with pytest.raises(ProtocacheError, match=message):
            store.read_rows("pooled", rows)


def test_read_refuses_rows_outside_the_store_and_unknown_arrays(store):
    with pytest.raises(ProtocacheError, match=r"rows 110\.\.199 are outside .* rows 0\.\.119"):
        store.read("pooled", 110, 200)
    with pytest.raises(ProtocacheError, match=r"row numbers \(integers\), got 0, None"):
        store.read("pooled", 0, None)
    with pytest.raises(ProtocacheError, match=r"has no array 'label'; its arrays are tokens, pooled, logits"):
        store.read("label", 0, 5)
    with pytest.raises(ProtocacheError, match=r"mode is 'r' \(read\) or 'r\+'"):
        FeatureStore.open(store.path, mode="x")


def test_iter_batches_refuses_what_would_loop_for_ever_or_read_nothing(store):
    for size in (0, -1, 2.5, "8", None):
        with pytest.raises(ProtocacheError, match="batch_size must be an integer >= 1"):
            store.iter_batches("train", size)
    with pytest.raises(ProtocacheError, match=r"has no split 'trian' \(split\); it has test, train"):
        store.iter_batches("trian", 8)
    with pytest.raises(ProtocacheError, match="fields is a non-empty list of names"):
        store.iter_batches("train", 8, fields="tokens")
    assert list(store.iter_batches("val", 8)) == []  # a standard split the store does not have is empty


def test_the_model_takes_only_the_input_it_was_fitted_on(model):
    h, w = model.input_size
    assert model(torch.zeros(2, 3, h, w)).shape == (2, len(model.class_names))
    assert torch.equal(model(torch.zeros(1, 3, h, w, dtype=torch.float64)), model(torch.zeros(1, 3, h, w)))
    for bad in (torch.zeros(1, 3, h + 64, w + 64), torch.zeros(3, h, w), torch.zeros(1, h, w, 3),
                torch.zeros(1, 3, h, w, dtype=torch.uint8), np.zeros((1, 3, h, w), np.float32)):
        with pytest.raises(ProtocacheError, match=rf"takes a float tensor \[N, 3, {h}, {w}\]"):
            model(bad)
    with pytest.raises(ProtocacheError, match=r"expected a preprocessed float image"):
        model.explain(torch.zeros(2, 3, h, w))  # one image at a time


def test_preprocess_decodes_as_predict_does(model):
    """Transparent pixels are white and 16-bit values scaled in every path (it used PIL's own convert)."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA")
    deep = Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16).astype(np.int32), "I")
    for image in (rgba, deep, Image.new("La", (8, 8))):
        predicted = model.predict([image]).to_pylist()[0]
        assert predicted["ok"], predicted["reason"]
        logits = model(model.preprocess(image)[None])[0]
        assert predicted["top_k_classes"][0] == int(logits.argmax())
        assert abs(predicted["top_logit"] - float(logits.max())) < 1e-4
    row = model.predict([Image.new("RGB", (0, 0))]).to_pylist()[0]
    assert not row["ok"] and "0 x 0 pixels" in row["reason"]


def test_predict_takes_one_image_as_one_row_and_explain_checks_its_numbers(model, tmp_path):
    Image.new("RGB", (12, 12), (90, 20, 200)).save(tmp_path / "a.png")
    table = model.predict(str(tmp_path / "a.png"))  # not one row per character
    assert table.num_rows == 1 and table.to_pylist()[0]["ok"]
    assert model.predict(tmp_path / "a.png").num_rows == 1
    for kwargs, message in (({"label": True}, "label is a class index or name"),
                            ({"label": 2.7}, "label is a class index or name"),
                            ({"label": "\u00b2"}, "unknown class"),
                            ({"top_prototypes": -1}, "top_prototypes must be an integer >= 1")):
        with pytest.raises(ProtocacheError, match=message):
            model.explain(tmp_path / "a.png", **kwargs)


def test_none_in_a_number_field_is_refused_by_name():
    with pytest.raises(ProtocacheError, match=r"fit option 'seed' expects int, got None"):
        FitConfig(seed=None).validate()
    with pytest.raises(ProtocacheError, match=r"--batch-size expects int, got None"):
        ExtractConfig(dataset="digits", batch_size=None).validate()


def test_fit_head_arguments(store_path, tmp_path):
    result = fit_head("linear", store_path, tmp_path / "run", {"epochs": 1}, {"threads": 1, "val_fraction": 0})
    assert result.config["fit"]["threads"] == 1  # the fit options as a dict
    with pytest.raises(ProtocacheError, match=r"is inside the feature store"):
        fit_head("linear", store_path, Path(store_path) / "run", {"epochs": 1})
    assert not (Path(store_path) / "run").exists() and not (Path(store_path) / ".run.partial").exists()
    with pytest.raises(ProtocacheError, match=r"bad --device 'gpu'; use auto, cpu, cuda or cuda:N"):
        fit_head("linear", store_path, tmp_path / "r2", {"epochs": 1}, FitConfig(device="gpu"))
    assert not (tmp_path / "r2").exists() and not (tmp_path / ".r2.partial").exists()
    with pytest.raises(ProtocacheError, match=r"head_config is a dict of the head's config keys"):
        fit_head("linear", store_path, tmp_path / "r3", "epochs=1")
