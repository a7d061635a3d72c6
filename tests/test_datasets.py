"""Standard dataset layouts on small generated trees of the real formats, the synthetic birds, and
one extraction whose stored keypoints must agree with the geometry."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from protocache.cli.main import main
from protocache.pipeline.datasets import create_dataset, list_datasets, record_image_loader
from protocache.pipeline.datasets.synthetic_birds import (HEAD_COLOURS, PART_NAMES, WING_STYLES, bird_classes,
                                                          class_grid, make_synthetic_birds)
from protocache.stores.errors import ProtocacheError


def write_jpeg(path: Path, size=(24, 16), colour=(120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    """A tiny synthetic CUB: 4 classes x 6 images of 96 px, at OUT/CUB_200_2011."""
    out = tmp_path_factory.mktemp("birds")
    make_synthetic_birds(out, classes=4, per_class=6, seed=3, image_size=96)
    return out


# ---------------------------------------------------------------------------- CUB
def write_cub(base: Path) -> None:
    """A hand-written 2-class, 3-image CUB_200_2011 folder with CUB's exact formats."""
    files = {
        "classes.txt": "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n",
        "images.txt": "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg\n"
                      "2 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg\n"
                      "3 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg\n",
        "image_class_labels.txt": "1 1\n2 2\n3 1\n",
        "train_test_split.txt": "1 0\n2 1\n3 1\n",
        "bounding_boxes.txt": "1 60.0 27.0 325.0 304.0\n2 139.5 30.0 153.0 264.0\n3 14.0 112.0 388.0 186.0\n",
        "parts/parts.txt": "1 back\n2 beak\n3 left eye\n",
        "parts/part_locs.txt": "1 1 312.0 182.0 1\n1 2 0.0 0.0 0\n1 3 215.5 109.0 1\n"
                               "2 1 200.0 100.0 1\n2 2 101.0 60.0 1\n2 3 0.0 0.0 0\n"
                               "3 1 10.0 20.0 1\n3 2 30.0 40.0 1\n3 3 50.0 60.0 1\n",
    }
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    for line in files["images.txt"].splitlines():
        write_jpeg(base / "images" / line.split()[1])


def test_cub_reads_every_annotation_exactly(tmp_path):
    write_cub(tmp_path / "CUB_200_2011")
    ds = create_dataset("cub", root=tmp_path)
    assert ds.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert ds.part_names == ["back", "beak", "left eye"]
    assert [r["image_id"] for r in ds.records] == ["1", "2", "3"]
    assert [r["label"] for r in ds.records] == [0, 1, 0]
    assert [r["split"] for r in ds.records] == ["test", "train", "train"]
    assert [r["class_name"] for r in ds.records] == ["Black footed Albatross", "Laysan Albatross",
                                                    "Black footed Albatross"]
    first, second = ds.records[0], ds.records[1]
    assert first["path"] == str(tmp_path.resolve() / "CUB_200_2011/images/001.Black_footed_Albatross/"
                                                     "Black_Footed_Albatross_0046_18.jpg")
    assert first["bbox"] == [60.0, 27.0, 385.0, 331.0]
    assert first["parts"] == [[312.0, 182.0, 1], [0.0, 0.0, 0], [215.5, 109.0, 1]]
    assert second["bbox"] == [139.5, 30.0, 292.5, 294.0]
    assert second["crop_box"] == [139, 30, 293, 294]  # rounded outwards: the whole box is kept
    assert ds.options == {"crop": True}
    assert ds.extract_defaults == {"resize": "stretch"}  # a box crop is resized straight to the input
    # the CUB folder itself works as the root; crop off drops the crop box
    same = create_dataset("cub", root=tmp_path / "CUB_200_2011", crop="false")
    assert [r["parts"] for r in same.records] == [r["parts"] for r in ds.records]
    assert all("crop_box" not in r for r in same.records)
    assert same.extract_defaults == {}
    assert same.manifest_sha256() != ds.manifest_sha256()
    assert ds.load_image(0).size == (24, 16)


def test_cub_errors_say_what_is_missing_and_where_to_get_it(tmp_path):
    with pytest.raises(ProtocacheError, match="pass --root") as err:
        create_dataset("cub")
    assert "vision.caltech.edu/datasets/cub_200_2011" in str(err.value)
    with pytest.raises(ProtocacheError, match="is not a folder"):
        create_dataset("cub", root=tmp_path / "nowhere")
    with pytest.raises(ProtocacheError, match="images.txt") as err:
        create_dataset("cub", root=tmp_path)
    assert "cub_200_2011" in str(err.value) and "make-dataset synthetic-birds" in str(err.value)
    write_cub(tmp_path / "CUB_200_2011")
    (tmp_path / "CUB_200_2011/parts/part_locs.txt").unlink()
    with pytest.raises(ProtocacheError, match="part_locs.txt"):
        create_dataset("cub", root=tmp_path)
    with pytest.raises(ProtocacheError, match="does not take option"):
        create_dataset("cub", root=tmp_path, cropp=True)
    (tmp_path / "CUB_200_2011/parts/part_locs.txt").write_text("")
    (tmp_path / "CUB_200_2011/train_test_split.txt").write_text("1 0\n2 1\n")
    with pytest.raises(ProtocacheError, match="missing from train_test_split.txt"):
        create_dataset("cub", root=tmp_path)


def test_registry_lists_the_standard_layouts():
    assert {"cub", "cars", "dogs", "imagenet", "folder", "digits"} <= set(list_datasets())


def test_record_image_loader_loads_one_record_without_the_dataset(tmp_path):
    digits = create_dataset("digits")
    load = record_image_loader("digits")
    for i in (0, 17, len(digits) - 1):
        assert np.array_equal(np.asarray(load(digits.records[i])), np.asarray(digits.load_image(i)))
    write_cub(tmp_path / "CUB_200_2011")
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):  # three different images
        write_jpeg(Path(create_dataset("cub", root=tmp_path).records[i]["path"]), size=(20 + i, 16), colour=colour)
    cub = create_dataset("cub", root=tmp_path)
    records = [dict(r) for r in cub.records]
    for name in ("images.txt", "classes.txt", "parts/part_locs.txt"):  # the loader reads no annotation file
        (tmp_path / "CUB_200_2011" / name).unlink()
    load = record_image_loader("cub")
    for i, record in enumerate(records):
        assert np.array_equal(np.asarray(load(record)), np.asarray(cub.load_image(i)))
    assert load({"path": records[2]["path"]}).size == (22, 16)  # `path` is all a file layout needs
    with pytest.raises(ProtocacheError, match="unknown dataset 'cubb'. Did you mean cub") as err:
        record_image_loader("cubb")
    assert "Known datasets: cars, cub, digits" in str(err.value)


# ---------------------------------------------------------------------------- synthetic birds
def test_synthetic_birds_are_a_cub_with_true_keypoints(birds):
    ds = create_dataset("cub", root=birds, crop=False)
    assert ds.part_names == PART_NAMES and len(ds) == 24
    assert ds.class_names == ["Red headed Black pointed winged Fan tailed",
                              "Yellow headed Black pointed winged Fan tailed",
                              "Red headed White round winged Fan tailed",
                              "Yellow headed White round winged Fan tailed"]
    kinds = bird_classes(4)
    for label in range(4):  # half train, half test per class
        splits = [r["split"] for r in ds.records if r["label"] == label]
        assert splits.count("train") == 3 and splits.count("test") == 3
    for r in ds.records:
        image = np.asarray(Image.open(r["path"]).convert("RGB"), dtype=np.int64)
        assert image.shape == (96, 96, 3)
        x0, y0, x1, y1 = r["bbox"]
        parts = dict(zip(ds.part_names, r["parts"]))
        visible = {name for name, (_, _, v) in parts.items() if v}
        # one side of the bird shows: its eye and its wing on the same side, both legs
        assert ({"left eye", "left wing"} <= visible) != ({"right eye", "right wing"} <= visible)
        assert len(visible) == 13 and {"left leg", "right leg"} <= visible
        for name in visible:
            x, y, _ = parts[name]
            assert x0 <= x <= x1 and y0 <= y <= y1, (name, r["image_id"])
        # the keypoints sit on the drawn parts that decide the class
        kind = kinds[r["label"]]
        side = "left" if "left wing" in visible else "right"
        for name, colour in [("crown", HEAD_COLOURS[kind.head][1]), ("forehead", HEAD_COLOURS[kind.head][1]),
                             ("nape", HEAD_COLOURS[kind.head][1]), (f"{side} wing", WING_STYLES[kind.wing][1])]:
            x, y, _ = parts[name]
            assert np.abs(image[int(y), int(x)] - np.array(colour)).max() < 60, (name, r["image_id"])


def test_synthetic_birds_are_seeded_fast_and_class_grid_is_balanced(tmp_path):
    started = time.perf_counter()
    a = make_synthetic_birds(tmp_path / "a", classes=4, per_class=12, seed=0)
    assert time.perf_counter() - started < 2.0
    b = make_synthetic_birds(tmp_path / "b", classes=4, per_class=12, seed=0)
    c = make_synthetic_birds(tmp_path / "c", classes=4, per_class=12, seed=1)
    for name in ("parts/part_locs.txt", "bounding_boxes.txt", "train_test_split.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "parts/part_locs.txt").read_bytes() != (c / "parts/part_locs.txt").read_bytes()
    image = "images/001.Red_headed_Black_pointed_winged_Fan_tailed/Red_headed_Black_pointed_winged_Fan_tailed_0001.jpg"
    assert (a / image).read_bytes() == (b / image).read_bytes()
    assert class_grid(4) == [2, 2, 1] and class_grid(8) == [2, 2, 2] and class_grid(200) == [6, 6, 6]
    assert len(set(bird_classes(200))) == 200
    with pytest.raises(ProtocacheError, match="already holds"):
        make_synthetic_birds(tmp_path / "a")
    with pytest.raises(ProtocacheError, match="--per-class"):
        make_synthetic_birds(tmp_path / "d", per_class=1)


def test_make_dataset_command(tmp_path, capsys):
    main(["make-dataset", "synthetic-birds", "--out", str(tmp_path), "--classes", "3", "--per-class", "2",
          "--seed", "5", "--image-size", "64"])
    assert "wrote 6 images of 3 classes" in capsys.readouterr().out
    ds = create_dataset("cub", root=tmp_path)
    assert len(ds) == 6 and ds.num_classes == 3
    assert Image.open(ds.records[0]["path"]).size == (64, 64)
    with pytest.raises(SystemExit) as exit_info:
        main(["make-dataset", "dragons", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "unknown dataset kind 'dragons'" in capsys.readouterr().err


def test_extract_stores_annotations_in_input_pixels(birds, tmp_path):
    """A real extraction of the synthetic CUB: bbox_input/parts_input are the geometry of each record."""
    from protocache.pipeline.extract import ExtractConfig, run_extract
    from protocache.pipeline.geometry import input_space_annotations
    from protocache.stores import FeatureStore

    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(dataset="cub", root=str(birds), backbone="test_efficientnet", weights="random",
                              out=str(out), shard_size=8, batch_size=8, limit=16, progress=False, num_workers=0,
                              threads=1))
    store = FeatureStore.open(out)
    table = store.metadata().to_pylist()
    ds = create_dataset("cub", root=birds)
    config = store.info()["fingerprint"]["preprocessing"]  # test_efficientnet's: 160 px, crop_pct 0.95
    assert len(table) == 16
    for row, record in zip(table, ds.records):
        assert row["image_id"] == record["image_id"] and (row["width"], row["height"]) == (96, 96)
        x0, y0, x1, y1 = record["crop_box"]
        expected = input_space_annotations(record, (x1 - x0, y1 - y0), config)
        assert row["bbox_input"] == pytest.approx(expected["bbox_input"])
        assert [p[:2] for p in row["parts_input"]] == [pytest.approx(p[:2]) for p in expected["parts_input"]]
        assert [p[2] for p in row["parts_input"]] == [p[2] for p in expected["parts_input"]]
        # the crop is the bird's box, so the box fills the whole input and visible parts lie on it
        assert row["bbox_input"] == [0.0, 0.0, 160.0, 160.0]
        for (x, y, v), (_, _, seen) in zip(row["parts_input"], record["parts"]):
            assert v == (1 if seen and 0 <= x < 160 and 0 <= y < 160 else 0)
        assert row["parts"] == [list(map(float, p)) for p in record["parts"]]
    assert store.info()["num_images"] == 16


def test_box_crop_keeps_every_part_in_the_model_input(tmp_path):
    """`protocache make-dataset synthetic-birds` + `protocache extract` (cub, box crop, tiny random model):
    every part visible and inside the box in the original image is visible in parts_input, beak, tail and
    eyes included, because the box is resized straight to the input (`--resize auto` -> stretch)."""
    from protocache.pipeline.geometry import input_space_annotations
    from protocache.stores import FeatureStore

    main(["make-dataset", "synthetic-birds", "--out", str(tmp_path / "birds"), "--classes", "4", "--per-class", "6",
          "--seed", "7", "--image-size", "96"])
    main(["extract", "--dataset", "cub", "--root", str(tmp_path / "birds"), "--backbone", "test_efficientnet",
          "--weights", "random", "--out", str(tmp_path / "s.zarr"), "--threads", "1", "--num-workers", "0",
          "--no-progress"])
    store = FeatureStore.open(tmp_path / "s.zarr")
    config = store.fingerprint["preprocessing"]
    assert config["resize"] == "stretch"
    names = store.attrs["part_names"]
    rows = store.metadata().to_pylist()
    assert len(rows) == 24
    shown = {name: 0 for name in names}
    cut_by_timm = {name: 0 for name in names}
    for row in rows:
        x0, y0, x1, y1 = row["bbox"]
        cx0, cy0, cx1, cy1 = row["crop_box"]
        timm_rule = input_space_annotations(row, (cx1 - cx0, cy1 - cy0), {**config, "resize": "timm"})
        for k, name in enumerate(names):
            x, y, visible = row["parts"][k]
            if visible and x0 <= x <= x1 and y0 <= y <= y1:
                assert row["parts_input"][k][2] == 1, (row["image_id"], name, row["parts_input"][k])
                shown[name] += 1
                cut_by_timm[name] += 1 - timm_rule["parts_input"][k][2]
    assert shown["beak"] == shown["tail"] == 24 and shown["left eye"] + shown["right eye"] == 24
    assert min(shown["left eye"], shown["right eye"]) > 0
    # the old rule (timm's resize + centre crop of the box) would have cut the ends of most birds
    assert cut_by_timm["beak"] > 12 and cut_by_timm["tail"] > 12


# ---------------------------------------------------------------------------- Stanford Cars
CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def cars_annotations(rows) -> np.ndarray:
    """A 1 x N MATLAB struct array typed like the devkit's (uint8/uint16 scalars as [[v]], fname as ['x.jpg'])."""
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in CARS_FIELDS])
    for i, (x1, y1, x2, y2, label, fname) in enumerate(rows):
        scalar = [np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16) for v in (x1, y1, x2, y2, label)]
        array[0, i] = (*scalar, np.array([fname]))
    return array


def write_cars(root: Path, test_annos_in_devkit: bool = True) -> None:
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit/cars_meta.mat", {"class_names": names})
    train = [(39, 116, 569, 375, 3, "00002.jpg"), (36, 116, 868, 587, 1, "00001.jpg")]
    test = [(30, 52, 246, 147, 2, "00001.jpg")]
    savemat(root / "devkit/cars_train_annos.mat", {"annotations": cars_annotations(train)})
    test_path = root / ("devkit" if test_annos_in_devkit else "") / "cars_test_annos_withlabels.mat"
    savemat(test_path, {"annotations": cars_annotations(test)})
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for row in rows:
            write_jpeg(root / folder / row[-1])


@pytest.mark.parametrize("in_devkit", [True, False])
def test_cars_devkit_layout(tmp_path, in_devkit):
    write_cars(tmp_path, in_devkit)
    ds = create_dataset("cars", root=tmp_path)
    assert ds.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    assert [(r["image_id"], r["label"], r["split"]) for r in ds.records] == [
        ("cars_train/00001.jpg", 0, "train"), ("cars_train/00002.jpg", 2, "train"), ("cars_test/00001.jpg", 1, "test")]
    assert ds.records[0]["bbox"] == [36.0, 116.0, 868.0, 587.0]
    assert ds.records[2]["class_name"] == "Acura RL Sedan 2012"
    assert ds.records[2]["path"] == str(tmp_path.resolve() / "cars_test/00001.jpg")
    assert all("crop_box" not in r for r in ds.records) and ds.extract_defaults == {}
    cropped = create_dataset("cars", root=tmp_path, crop=True)
    assert cropped.records[1]["crop_box"] == [39, 116, 569, 375]
    assert cropped.extract_defaults == cropped.limit(1).extract_defaults == {"resize": "stretch"}


def test_cars_errors(tmp_path):
    with pytest.raises(ProtocacheError, match="jkrause/cars"):
        create_dataset("cars", root=tmp_path)
    with pytest.raises(ProtocacheError, match="cars_train_annos.mat"):
        create_dataset("cars", root=tmp_path)
    write_cars(tmp_path)
    (tmp_path / "devkit/cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(ProtocacheError, match="cars_test_annos_withlabels.mat"):
        create_dataset("cars", root=tmp_path)


# ---------------------------------------------------------------------------- Stanford Dogs
def write_dogs(root: Path) -> None:
    train = [("n02085782-Japanese_spaniel/n02085782_2.jpg", 2), ("n02085620-Chihuahua/n02085620_5927.jpg", 1),
             ("n02085620-Chihuahua/n02085620_10074.jpg", 1)]
    test = [("n02085782-Japanese_spaniel/n02085782_17.jpg", 2)]
    for split, rows in (("train", train), ("test", test)):
        files = np.empty((len(rows), 1), dtype=object)
        files[:, 0] = [f for f, _ in rows]
        annotations = np.empty((len(rows), 1), dtype=object)
        annotations[:, 0] = [f[:-4] for f, _ in rows]
        labels = np.array([[float(label)] for _, label in rows])
        savemat(root / f"{split}_list.mat", {"file_list": files, "annotation_list": annotations, "labels": labels})
        for f, _ in rows:
            write_jpeg(root / "Images" / f)


def test_dogs_layout(tmp_path):
    write_dogs(tmp_path)
    ds = create_dataset("dogs", root=tmp_path)
    assert ds.class_names == ["Chihuahua", "Japanese spaniel"]
    assert [(r["image_id"], r["label"], r["split"], r["class_name"]) for r in ds.records] == [
        ("n02085620-Chihuahua/n02085620_10074", 0, "train", "Chihuahua"),
        ("n02085620-Chihuahua/n02085620_5927", 0, "train", "Chihuahua"),
        ("n02085782-Japanese_spaniel/n02085782_2", 1, "train", "Japanese spaniel"),
        ("n02085782-Japanese_spaniel/n02085782_17", 1, "test", "Japanese spaniel")]
    assert Path(ds.records[3]["path"]).is_file()
    with pytest.raises(ProtocacheError, match="ImageNetDogs") as err:
        create_dataset("dogs", root=tmp_path / "Images")
    assert "train_list.mat" in str(err.value)


# ---------------------------------------------------------------------------- ImageNet
def test_imagenet_layout(tmp_path):
    for rel in ["train/n03126707/n03126707_1.JPEG", "train/n01440764/n01440764_2.JPEG",
                "train/n01440764/n01440764_10.JPEG", "train/n02012849/n02012849_5.JPEG",
                "val/n01440764/ILSVRC2012_val_00000293.JPEG", "val/n03126707/ILSVRC2012_val_00000001.JPEG"]:
        write_jpeg(tmp_path / rel)
    (tmp_path / "train/n01440764/notes.txt").write_text("not an image")
    ds = create_dataset("imagenet", root=tmp_path)
    assert ds.class_names == ["n01440764", "n02012849", "n03126707"]
    assert [(r["image_id"], r["label"], r["split"]) for r in ds.records] == [
        ("train/n01440764/n01440764_10", 0, "train"), ("train/n01440764/n01440764_2", 0, "train"),
        ("train/n02012849/n02012849_5", 1, "train"), ("train/n03126707/n03126707_1", 2, "train"),
        ("val/n01440764/ILSVRC2012_val_00000293", 0, "test"), ("val/n03126707/ILSVRC2012_val_00000001", 2, "test")]
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n")
    named = create_dataset("imagenet", root=tmp_path)
    assert named.class_names == ["tench", "crane (n02012849)", "crane (n03126707)"]
    assert named.records[0]["class_name"] == "tench"
    with pytest.raises(ProtocacheError, match="image-net.org"):
        create_dataset("imagenet", root=tmp_path / "train")


def test_imagenet_flat_val_with_kaggle_solution(tmp_path):
    root = tmp_path / "ILSVRC/Data/CLS-LOC"
    write_jpeg(root / "train/n01440764/n01440764_2.JPEG")
    write_jpeg(root / "train/n01443537/n01443537_7.JPEG")
    write_jpeg(root / "val/ILSVRC2012_val_00000002.JPEG")
    with pytest.raises(ProtocacheError, match="LOC_val_solution.csv"):
        create_dataset("imagenet", root=root)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8\n")
    ds = create_dataset("imagenet", root=root)
    last = ds.records[-1]
    assert (last["image_id"], last["label"], last["split"]) == ("val/ILSVRC2012_val_00000002", 1, "test")


# ---------------------------------------------------------------------------- class-per-folder trees
def test_folder_with_split_folders(tmp_path):
    for rel in ["train/cat/b.JPG", "train/cat/a.png", "train/dog/x.jpeg", "train/dog/.hidden.jpg",
                "val/dog/y.Jpg", "test/cat/sub/z.webp", "test/ant/q.bmp"]:
        write_jpeg(tmp_path / rel)
    (tmp_path / "train/cat/README.txt").write_text("not an image")
    ds = create_dataset("folder", root=tmp_path)
    assert ds.class_names == ["ant", "cat", "dog"]
    assert [(r["image_id"], r["label"], r["split"]) for r in ds.records] == [
        ("train/cat/a.png", 1, "train"), ("train/cat/b.JPG", 1, "train"), ("train/dog/x.jpeg", 2, "train"),
        ("val/dog/y.Jpg", 2, "val"), ("test/ant/q.bmp", 0, "test"), ("test/cat/sub/z.webp", 1, "test")]
    with pytest.raises(ProtocacheError, match="split folders"):
        create_dataset("folder", root=tmp_path, test_fraction=0.5)


def test_folder_of_class_folders_is_split_by_a_seeded_stratified_rule(tmp_path):
    for name, n in (("b_class", 8), ("a_class", 4)):
        for i in range(n):
            write_jpeg(tmp_path / name / f"img{i:02d}.jpg")
    ds = create_dataset("folder", root=tmp_path, test_fraction=0.25, split_seed=1)
    assert ds.class_names == ["a_class", "b_class"]
    assert [r["image_id"] for r in ds.records][:2] == ["a_class/img00.jpg", "a_class/img01.jpg"]
    splits = np.array([r["split"] for r in ds.records])
    labels = np.array([r["label"] for r in ds.records])
    assert (splits[labels == 0] == "test").sum() == 1 and (splits[labels == 1] == "test").sum() == 2
    again = create_dataset("folder", root=tmp_path, test_fraction=0.25, split_seed=1)
    assert [r["split"] for r in again.records] == list(splits)
    other = create_dataset("folder", root=tmp_path, test_fraction=0.25, split_seed=2)
    assert [r["split"] for r in other.records] != list(splits)
    assert ds.options == {"layout": "class folders", "test_fraction": 0.25, "split_seed": 1}
    assert all(r["split"] == "train" for r in create_dataset("folder", root=tmp_path, test_fraction=0).records)


def test_folder_errors(tmp_path):
    with pytest.raises(ProtocacheError, match="pass --root"):
        create_dataset("folder")
    write_jpeg(tmp_path / "loose.jpg")  # loose images only: an unlabeled folder, which a split needs 2 of
    with pytest.raises(ProtocacheError, match="fewer than 2 images"):
        create_dataset("folder", root=tmp_path)
    write_jpeg(tmp_path / "only_one" / "a.jpg")
    write_jpeg(tmp_path / "two" / "a.jpg")
    write_jpeg(tmp_path / "two" / "b.jpg")
    with pytest.raises(ProtocacheError, match="only_one"):
        create_dataset("folder", root=tmp_path)


# ---------------------------------------------------------------------------- decoding: every mode to RGB
def load(path: Path) -> np.ndarray:
    """What every image loader hands on: load_image's RGB pixels as uint8 [H, W, 3]."""
    from protocache.pipeline.datasets import load_image

    image = load_image({"path": str(path)})
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # PIL reads it back as 16-bit
    # By hand, v -> round(v * 255 / 65535) = round(v / 257): 0 -> 0; 257 -> 1; 1000 -> 3.89 -> 4;
    # 32768 -> 127.502 -> 128; 65535 -> 255. (PIL's own convert("RGB") clips: 0, 255, 255, 255, 255.)
    pixels = load(tmp_path / "g16.png")
    assert pixels[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    # 40 x 20 (landscape) with a white band over the left 10 columns, tagged orientation 6
    # ("rotate 90 degrees clockwise to display"): upright it is 20 wide, 40 high, the band on top.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = load(tmp_path / "rot.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[:8].min() > 200 and upright[12:].max() < 60  # JPEG blurs the edge at row 10


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    palette.putdata([0, 1, 0, 1])
    palette.save(tmp_path / "p.png", transparency=1)  # index 1 is fully transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert load(tmp_path / "p.png")[0].tolist() == [[255, 0, 0], [255, 255, 255]] * 2
    Image.new("P", (2, 1), 0).save(tmp_path / "opaque.png")  # a palette without transparency: its colours
    assert load(tmp_path / "opaque.png")[0].tolist() == [[0, 0, 0]] * 2


def test_alpha_is_composited_on_white(tmp_path):
    # out = a * colour + (1 - a) * 255 per channel; a = 128/255 over black: 255 * 127/255 = 127.
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load(tmp_path / "rgba.png")[0].tolist() == [[255, 255, 255], [10, 20, 30], [127, 127, 127]]
    la = np.array([[[10, 0], [10, 255], [0, 128]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert load(tmp_path / "la.png")[0].tolist() == [[255, 255, 255], [10, 10, 10], [127, 127, 127]]


def test_cmyk_is_converted_to_rgb(tmp_path):
    # PIL's rule: R = 255 - C - K, G = 255 - M - K, B = 255 - Y - K, clipped at 0.
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    cmyk.save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    assert load(tmp_path / "c.tif")[0].tolist() == [[255, 0, 0]] * 2
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert np.abs(load(tmp_path / "c.jpg").astype(int) - [255, 0, 0]).max() <= 3


def test_greyscale_modes_are_grey_rgb(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L").save(tmp_path / "l.png")
    assert load(tmp_path / "l.png")[0, :, 0].tolist() == [0, 100, 255]
    # I (32-bit integers) is read as 16-bit values: 0 -> 0, 1000 -> 4, 65535 -> 255 (as above); beyond clips.
    Image.fromarray(np.array([[0, 1000, 65535, 70000]], np.int32), "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert load(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 4, 255, 255]
    # F within [0, 1] is scaled by 255: 0 -> 0, 0.5 -> 127.5 -> 128 (rint: to even), 1 -> 255.
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f01.tif")
    assert Image.open(tmp_path / "f01.tif").mode == "F"
    assert load(tmp_path / "f01.tif")[0, :, 0].tolist() == [0, 128, 255]
    # F beyond [0, 1] is read as 0..255 (PIL's convention), clipped: -5 -> 0, 100.4 -> 100, 300 -> 255.
    Image.fromarray(np.array([[-5.0, 100.4, 300.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert load(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 100, 255]
    for path in ("l.png", "i.tif", "f.tif"):
        pixels = load(tmp_path / path)
        assert (pixels[..., 0] == pixels[..., 2]).all()


def test_explain_views_decode_like_the_loaders(tmp_path):
    """The explain image source gets the same RGB whether its loader decoded the file or not."""
    from protocache.pipeline.datasets import load_image
    from protocache.pipeline.explain.images import model_input_view

    Image.fromarray(np.array([[0, 20000, 40000, 65535]] * 4, dtype=np.uint16)).save(tmp_path / "g16.png")
    config = {"input_size": (3, 4, 4), "interpolation": "bilinear", "resize": "stretch"}
    raw = model_input_view(Image.open(tmp_path / "g16.png"), config)
    loaded = model_input_view(load_image({"path": str(tmp_path / "g16.png")}), config)
    assert np.array_equal(np.asarray(raw), np.asarray(loaded))
    assert np.asarray(raw)[0, :, 0].tolist() == [0, 78, 156, 255]  # 20000/257 = 77.8, 40000/257 = 155.6


def test_extract_stores_a_16_bit_image_as_its_8_bit_rendering(tmp_path):
    """Through a folder dataset: the 16-bit PNG is extracted as ok with the tokens of its 8-bit rendering."""
    from protocache.pipeline.extract import ExtractConfig, run_extract

    grey = np.full((32, 32), 30000, np.uint16)  # -> round(30000 / 257) = 117 everywhere
    for cls, name in (("a", "x"), ("b", "y")):
        (tmp_path / "data" / cls).mkdir(parents=True)
    Image.fromarray(grey).save(tmp_path / "data" / "a" / "x.png")
    Image.new("RGB", (32, 32), (117, 117, 117)).save(tmp_path / "data" / "b" / "y.png")
    run_extract(ExtractConfig(dataset="folder", root=str(tmp_path / "data"), backbone="test_efficientnet",
                              weights="random", out=str(tmp_path / "s.zarr"), progress=False, num_workers=0,
                              dataset_options={"test_fraction": 0}))
    from protocache.stores import FeatureStore

    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.metadata().column("ok").to_pylist() == [True, True]
    tokens = store.read("tokens", 0, 2)
    assert np.array_equal(tokens[0], tokens[1])
