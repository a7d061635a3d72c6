"""Explain stage: a static HTML report of a fitted head ("this looks like that"), built from the cache.

The report (``DIR/index.html`` plus PNG files under ``DIR/img/``, relative links, no
server, no network) has two parts:

1. A prototype gallery: every prototype the head uses (the union of its classes'
   prototypes after the head's own pruning), ordered by importance (mean absolute
   contribution to the true class's logit over the training split), each with its top
   training patches (one per image, highest similarity first) cropped from the original
   images with the prototype's activation overlaid, its classes and last-layer weights.
2. A seeded choice of images of one split (mixing correct and wrong predictions): the
   prediction against the true class and, for the predicted class (and, when wrong, the
   true class), the prototypes that contribute most to its logit: where each fires on
   the image (heatmap on the model-input view, peak box), the training patches it
   stands for, and its contribution (positive and negative evidence where the head has
   both, as InfoDisent does).

The backbone is never run. Images are reloaded through the dataset's own loader from
the store's metadata records; the *model-input view* of an image is the record's
``crop_box`` crop followed by timm's evaluation resize + center crop (the store's
preprocessing config) without normalisation, so the store's token boxes line up with
its pixels. Similarity maps are upsampled bilinearly with cell centres on the token
boxes' centres (PIL's convention, the same as ``align_corners=False``).
"""

from __future__ import annotations

import html
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError

REPORT_MARKER = "report.json"  # written into every report folder; marks a folder as ours to replace
IMAGE_DIR = "img"


@dataclass
class ExplainConfig:
    run: str = ""
    out: str = ""
    images: int = 8  # images of `split` explained
    split: str = "test"
    seed: int = 0  # choice of the explained images
    patches: int = 5  # top training patches per prototype
    top_prototypes: int = 5  # prototypes shown per explained image and class
    max_prototypes: int | None = None  # gallery size cap (None: every prototype the head uses)
    train_split: str = "train"  # split the gallery's patches come from
    batch_size: int = 64
    device: str = "auto"
    root: str | None = None  # dataset folder, when it moved since extraction (default: the store's)
    patch_cells: float = 3.0  # side of a patch crop in token cells ...
    patch_min_fraction: float = 0.25  # ... but at least this fraction of the input side
    patch_px: int = 128  # side of a patch PNG
    lazy_images: bool | None = None  # loading="lazy" on <img>; None: only for large reports (> 400 images)


@dataclass
class ExplainResult:
    index: str
    out: str
    prototypes_shown: int
    prototypes_used: int
    images_explained: int
    correct: int
    wrong: int
    png_files: int
    seconds: float


# ----------------------------------------------------------------------------- images
def model_input_view(image: Image.Image, data_config: dict[str, Any], crop_box: Sequence[float] | None = None
                     ) -> Image.Image:
    """The image as the backbone saw it, before normalisation: crop_box crop, then timm's eval resize + crop.

    Uses timm's own eval transform with mean 0 and std 1, so the geometry (resize rule,
    rounding, interpolation, center crop or pad) is exactly the one the cache was
    extracted with; the result is an RGB image of the model's input size.
    """
    import timm.data

    if crop_box is not None:
        image = image.crop(tuple(int(round(float(v))) for v in crop_box))
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    cfg["mean"], cfg["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    allowed = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "crop_border_pixels")
    transform = timm.data.create_transform(**{k: v for k, v in cfg.items() if k in allowed}, is_training=False)
    x = transform(image.convert("RGB"))
    array = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def open_dataset(store: FeatureStore, root: str | None = None):
    """The store's dataset (for its image loader), built from the name, root and options the store recorded.

    The stored options are what the dataset reported (some are informational and not
    accepted back, e.g. digits' split seed), so a refusal falls back to the defaults:
    images are loaded from the store's own metadata records, which carry the path,
    index and crop box, so only the loader matters here.
    """
    from .datasets import create_dataset

    name = store.fingerprint["dataset"]
    root = root or store.attrs.get("dataset_root")
    options = {k: v for k, v in (store.attrs.get("dataset_options") or {}).items() if k != "limit"}
    try:
        return create_dataset(name, root, **options)
    except ProtocacheError as first:
        if not options:
            raise ProtocacheError(f"cannot open dataset {name!r} of {store.path} ({first}); "
                                  "pass --root DIR if the dataset moved") from first
        try:
            return create_dataset(name, root)
        except ProtocacheError as exc:
            raise ProtocacheError(f"cannot open dataset {name!r} of {store.path} ({exc}); "
                                  "pass --root DIR if the dataset moved") from exc


class ImageSource:
    """Model-input views of store rows, reloaded through the dataset's loader (small LRU cache)."""

    def __init__(self, store: FeatureStore, root: str | None = None, cache_size: int = 256):
        self.store = store
        self.root = root
        self.data_config = dict(store.fingerprint.get("preprocessing") or {})
        if "input_size" not in self.data_config:
            self.data_config["input_size"] = store.attrs["input_size"]
        self._dataset = None
        self._table = store.metadata()
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self.cache_size = cache_size

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = open_dataset(self.store, self.root)
        return self._dataset

    def record(self, row: int) -> dict[str, Any]:
        """The dataset's record of store row `row` (the store's metadata row if the manifest differs)."""
        meta = {k: v[0] for k, v in self._table.slice(int(row), 1).to_pydict().items()}
        records = self.dataset.records
        if row < len(records) and str(records[row].get("image_id")) == str(meta.get("image_id")):
            return records[row]
        return meta

    def view(self, row: int) -> Image.Image:
        row = int(row)
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        record = self.record(row)
        try:
            image = self.dataset.image_loader(record)
        except Exception as exc:  # noqa: BLE001 - any load failure names the image
            raise ProtocacheError(f"cannot reload image {record.get('path')!r} (row {row}): "
                                  f"{type(exc).__name__}: {exc}. Pass --root DIR if the dataset moved.") from exc
        view = model_input_view(image, self.data_config, record.get("crop_box"))
        expected = tuple(int(v) for v in self.store.attrs["input_size"][-2:])[::-1]
        if view.size != expected:
            raise ProtocacheError(f"model-input view of row {row} is {view.size}, the store's input is {expected}")
        self._cache[row] = view
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return view


# ----------------------------------------------------------------------------- heatmaps
def _colormap(name: str):
    try:
        import matplotlib

        return matplotlib.colormaps[name]
    except (ImportError, KeyError):
        return None


def colorize(values: np.ndarray, diverging: bool = False) -> np.ndarray:
    """values in [0, 1] (or [-1, 1] when diverging) -> uint8 RGB [..., 3]."""
    cmap = _colormap("RdBu_r" if diverging else "jet")
    x = (values + 1.0) / 2.0 if diverging else values
    x = np.clip(x, 0.0, 1.0)
    if cmap is not None:
        return (cmap(x)[..., :3] * 255.0).round().astype(np.uint8)
    if diverging:  # blue - white - red
        r = np.clip(2.0 * x, 0, 1)
        b = np.clip(2.0 - 2.0 * x, 0, 1)
        g = np.minimum(r, b)
        rgb = np.stack([r, g, b], axis=-1)
    else:  # jet
        rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    return (rgb * 255.0).round().astype(np.uint8)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W] token-grid map -> [height, width] bilinear, cell values at the cell centres. size = (width, height)."""
    m = Image.fromarray(np.ascontiguousarray(grid_map, dtype=np.float32), mode="F")
    return np.asarray(m.resize(size, Image.BILINEAR), dtype=np.float32)


def overlay(view: Image.Image, grid_map: np.ndarray, signed: bool = False, alpha: float = 0.6) -> Image.Image:
    """The view with the map upsampled to its size and blended on top.

    Unsigned maps are scaled min-max on this image (jet); signed maps (InfoDisent's
    rotated channels) use a diverging map centred on 0, opaque where |value| is large.
    """
    m = upsample(grid_map, view.size)
    base = np.asarray(view.convert("RGB"), dtype=np.float32)
    if signed:
        scale = float(np.abs(m).max()) or 1.0
        v = m / scale
        colors = colorize(v, diverging=True).astype(np.float32)
        a = (0.75 * np.abs(v))[..., None]
    else:
        lo, hi = float(m.min()), float(m.max())
        v = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        colors = colorize(v).astype(np.float32)
        a = (alpha * (0.3 + 0.7 * v))[..., None]  # the image shows through where the prototype is absent
    out = base * (1.0 - a) + colors * a
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), mode="RGB")


def draw_box(image: Image.Image, box: Sequence[float], color: tuple[int, int, int], width: int | None = None
             ) -> Image.Image:
    """A rectangle outline drawn inside the pixel box [x0, y0, x1, y1) (continuous coordinates)."""
    width = width or max(2, round(min(image.size) / 80))
    out = image.copy()
    x0, y0, x1, y1 = box
    ImageDraw.Draw(out).rectangle([round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)],
                                  outline=color, width=width)
    return out


def patch_window(box: Sequence[float], input_wh: tuple[int, int], side: float) -> tuple[int, int, int, int]:
    """A square of `side` px centred on the token box, shifted to stay inside the input."""
    w, h = input_wh
    side = int(round(min(side, w, h)))
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x0 = int(round(min(max(cx - side / 2.0, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2.0, 0), h - side)))
    return x0, y0, x0 + side, y0 + side


POSITIVE_BOX = (0, 230, 64)
NEGATIVE_BOX = (255, 0, 200)


# ----------------------------------------------------------------------------- streaming passes
class _TopImages:
    """Per prototype, the k images where it is most similar (value, row, cell of the per-image peak)."""

    def __init__(self, num_prototypes: int, k: int):
        self.k = k
        self.values = np.zeros((num_prototypes, 0), dtype=np.float32)
        self.rows = np.zeros((num_prototypes, 0), dtype=np.int64)
        self.cells = np.zeros((num_prototypes, 0), dtype=np.int64)

    def update(self, peak_values: np.ndarray, peak_cells: np.ndarray, rows: np.ndarray) -> None:
        """peak_values, peak_cells [B, P]; rows [B]."""
        values = np.concatenate([self.values, peak_values.T.astype(np.float32)], axis=1)
        cells = np.concatenate([self.cells, peak_cells.T.astype(np.int64)], axis=1)
        rows_all = np.concatenate([self.rows, np.broadcast_to(rows[None, :], peak_values.T.shape)], axis=1)
        # highest first, ties by row: the result does not depend on batching
        order = np.lexsort((rows_all, -values), axis=1)[:, :self.k]
        self.values = np.take_along_axis(values, order, 1)
        self.rows = np.take_along_axis(rows_all, order, 1)
        self.cells = np.take_along_axis(cells, order, 1)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tensor(batch_tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch_tokens)).float().to(device)


def _maps(head, tokens: torch.Tensor) -> np.ndarray:
    """[B, P, H, W] float32 similarity maps."""
    return head.similarity_map(tokens).float().cpu().numpy()


@torch.inference_mode()
def predict_split(head, store: FeatureStore, split: str, batch_size: int, device: torch.device
                  ) -> dict[str, np.ndarray]:
    """rows, labels, predictions and softmax confidence of every usable image of a split."""
    rows, labels, preds, conf = [], [], [], []
    pooled = "pooled" in getattr(head, "inputs", ())  # the linear probe on the store's CLS/mean token
    fields = ("tokens", "label", "row") + (("pooled",) if pooled else ())
    for batch in store.iter_batches(split, batch_size, fields=fields, prefetch=False):
        extra = {"pooled": _tensor(batch["pooled"], device)} if pooled else {}
        logits = head(_tensor(batch["tokens"], device), **extra).float()
        prob = torch.softmax(logits, dim=1)
        p = logits.argmax(dim=1)
        rows.append(batch["row"])
        labels.append(batch["label"])
        preds.append(p.cpu().numpy())
        conf.append(prob.gather(1, p[:, None])[:, 0].cpu().numpy())
    if not rows:
        raise ProtocacheError(f"split {split!r} of {store.path} has no usable images")
    return {"rows": np.concatenate(rows), "labels": np.concatenate(labels).astype(np.int64),
            "preds": np.concatenate(preds).astype(np.int64), "confidence": np.concatenate(conf)}


def choose_images(correct: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` items, seeded: about half wrong predictions (when there are any), the rest correct.

    Returned right ones first, then wrong ones, each in ascending order.
    """
    rng = np.random.default_rng(seed)
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    n = min(int(n), len(correct))
    n_wrong = min(len(wrong), n // 2 if n > 1 else 0)
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)  # too few right ones: fill with wrong ones
    pick_right = np.sort(rng.choice(right, size=n_right, replace=False)) if n_right else np.zeros(0, np.int64)
    pick_wrong = np.sort(rng.choice(wrong, size=n_wrong, replace=False)) if n_wrong else np.zeros(0, np.int64)
    return np.concatenate([pick_right, pick_wrong]).astype(np.int64)


@torch.inference_mode()
def scan_training(head, store: FeatureStore, split: str, k: int, batch_size: int, device: torch.device
                  ) -> tuple[_TopImages, np.ndarray, int]:
    """One pass over a split: top-k images per prototype, and each prototype's importance.

    Importance of prototype p is the mean over the split of |presence_p * w_{y,p}|, its
    share of the true class's logit.
    """
    weights = head.class_weights().float()
    top: _TopImages | None = None
    importance = None
    n = 0
    for batch in store.iter_batches(split, batch_size, fields=("tokens", "label", "row"), prefetch=False):
        tokens = _tensor(batch["tokens"], device)
        maps = head.similarity_map(tokens).float()
        flat = maps.flatten(2)  # [B, P, T]
        values, cells = flat.max(dim=2)
        if top is None:
            top = _TopImages(flat.shape[1], k)
            importance = np.zeros(flat.shape[1], dtype=np.float64)
        top.update(values.cpu().numpy(), cells.cpu().numpy(), np.asarray(batch["row"], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)).to(device)
        share = (head.presence(tokens).float() * weights[labels]).abs().sum(0)
        importance += share.double().cpu().numpy()
        n += len(labels)
    if top is None:
        raise ProtocacheError(f"split {split!r} of {store.path} has no usable images: the gallery needs "
                              "training images (choose another with --train-split)")
    return top, importance / max(n, 1), n


def used_prototypes(head, num_classes: int) -> tuple[list[int], dict[int, list[int]]]:
    """(sorted prototypes any class uses, class -> its prototypes), from head.class_prototypes."""
    per_class = {c: [int(p) for p in head.class_prototypes(c)] for c in range(num_classes)}
    used = sorted({p for ps in per_class.values() for p in ps})
    return used, per_class


# ----------------------------------------------------------------------------- the report
def _prepare_out(out: Path) -> Path:
    """Create the report folder, or clear a previous report in it; refuse any other non-empty folder."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ProtocacheError(f"{out} exists and is not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()):
        if not (out / REPORT_MARKER).exists():
            raise ProtocacheError(f"{out} exists, is not empty and is not an explain report; choose another --out.")
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
        for name in ("index.html", REPORT_MARKER):
            (out / name).unlink(missing_ok=True)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    return out


def _e(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100 or abs(x) < 0.001:
        return f"{x:.3g}"
    return f"{x:.3f}"


def explain_run(cfg: ExplainConfig) -> ExplainResult:
    """Load a run (head, config, metrics) and write its report to cfg.out."""
    from .fit import load_run

    if not cfg.out:
        raise ProtocacheError("explain needs an output folder (--out DIR)")
    head, config, metrics = load_run(cfg.run)
    store_path = (config.get("store") or {}).get("path")
    if not store_path:
        raise ProtocacheError(f"{cfg.run}/config.json names no store path")
    store = FeatureStore.open(store_path)
    return explain(head, store, cfg, config=config, metrics=metrics)


@torch.inference_mode()
def explain(head, store: FeatureStore, cfg: ExplainConfig, config: dict | None = None,
            metrics: dict | None = None) -> ExplainResult:
    """Write the report of `head` (fitted on `store`) to cfg.out; see the module docstring."""
    started = time.perf_counter()
    if cfg.images < 0 or cfg.patches < 1 or cfg.top_prototypes < 1:
        raise ProtocacheError("explain: --images must be >= 0, --patches and --top-prototypes >= 1")
    splits = set(store.metadata().column("split").to_pylist())
    for name, split in (("--split", cfg.split), ("--train-split", cfg.train_split)):
        if split not in splits:
            raise ProtocacheError(f"{store.path} has no split {split!r} ({name}); it has {sorted(splits)}")
    device = _device(cfg.device)
    head = head.to(device).eval()
    out = _prepare_out(Path(cfg.out))
    class_names = list(store.attrs.get("class_names") or [])
    num_classes = int(getattr(head, "num_classes", 0) or store.attrs.get("num_classes") or len(class_names))
    class_names += [str(c) for c in range(len(class_names), num_classes)]
    input_h, input_w = (int(v) for v in store.attrs["input_size"][-2:])
    token_boxes = np.asarray(store.attrs["token_boxes"], dtype=np.float64)
    grid = tuple(int(v) for v in store.layout.grid)
    cell = max(input_w / grid[1], input_h / grid[0])
    patch_side = min(max(cfg.patch_cells * cell, cfg.patch_min_fraction * min(input_w, input_h)), min(input_w, input_h))
    images = ImageSource(store, cfg.root)
    weights = head.class_weights().float().cpu().numpy()  # [C, P]

    # ---- predictions on the explained split, and the choice of images
    pred = predict_split(head, store, cfg.split, cfg.batch_size, device)
    correct = pred["preds"] == pred["labels"]
    chosen = choose_images(correct, cfg.images, cfg.seed)
    chosen_rows = pred["rows"][chosen]

    # ---- evidence for the chosen images
    explained: list[dict[str, Any]] = []
    needed: set[int] = set()
    for lo in range(0, len(chosen_rows), cfg.batch_size):
        idx = chosen[lo:lo + cfg.batch_size]
        rows = pred["rows"][idx]
        order = np.argsort(rows)
        tokens = _tensor(store.read_rows("tokens", rows[order]), device)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        tokens = tokens[torch.from_numpy(inv).to(device)]
        extra = {}
        if "pooled" in getattr(head, "inputs", ()):
            extra["pooled"] = _tensor(store.read_rows("pooled", rows[order]), device)[torch.from_numpy(inv).to(device)]
        logits = head(tokens, **extra).float().cpu().numpy()
        evidence = {k: v.float().cpu().numpy() for k, v in head.evidence(tokens).items()}
        presence = head.presence(tokens).float().cpu().numpy()
        maps = _maps(head, tokens)
        for j, i in enumerate(idx):
            label, p_cls = int(pred["labels"][i]), int(pred["preds"][i])
            classes = [p_cls] if label == p_cls else [p_cls, label]
            blocks = []
            for c in classes:
                pos, neg = evidence["positive"][j, c], evidence["negative"][j, c]
                net = pos - neg
                candidates = np.flatnonzero((pos != 0) | (neg != 0))
                ranked = candidates[np.lexsort((candidates, -np.abs(net[candidates])))][:cfg.top_prototypes]
                entries = []
                for p in ranked.tolist():
                    m = maps[j, p]
                    entries.append({"prototype": p, "positive": float(pos[p]), "negative": float(neg[p]),
                                    "contribution": float(net[p]), "presence": float(presence[j, p]),
                                    "weight": float(weights[c, p]), "peak_cell": int(m.argmax()),
                                    "negative_peak_cell": int(m.argmin()) if neg[p] > 0 else None,
                                    "map": m})
                    needed.add(p)
                blocks.append({"class": c, "logit": float(logits[j, c]), "shown_sum": float(net[ranked].sum()),
                               "total_sum": float(net.sum()), "prototypes": entries})
            explained.append({"row": int(pred["rows"][i]), "label": label, "pred": p_cls,
                              "correct": bool(label == p_cls), "confidence": float(pred["confidence"][i]),
                              "blocks": blocks})

    # ---- the gallery: top training patches and importance
    top, importance, num_train = scan_training(head, store, cfg.train_split, cfg.patches, cfg.batch_size, device)
    used, per_class = used_prototypes(head, num_classes)
    used_sorted = sorted(used, key=lambda p: (-importance[p], p))
    shown = used_sorted if cfg.max_prototypes is None else used_sorted[:max(0, cfg.max_prototypes)]
    in_gallery = set(shown)
    classes_of: dict[int, list[int]] = {}
    for c, ps in per_class.items():
        for p in ps:
            classes_of.setdefault(p, []).append(c)
    patch_protos = sorted(in_gallery | needed)
    png_count = 0

    # patches: group by training row so each image is reloaded and mapped once
    by_row: dict[int, list[tuple[int, int]]] = {}
    for p in patch_protos:
        for rank in range(top.rows.shape[1]):
            by_row.setdefault(int(top.rows[p, rank]), []).append((p, rank))
    patch_files: dict[tuple[int, int], str] = {}
    signed = _is_signed(head)
    rows_sorted = sorted(by_row)
    for lo in range(0, len(rows_sorted), cfg.batch_size):
        rows = np.asarray(rows_sorted[lo:lo + cfg.batch_size], dtype=np.int64)
        maps = _maps(head, _tensor(store.read_rows("tokens", rows), device))
        for j, row in enumerate(rows.tolist()):
            view = images.view(row)
            for p, rank in by_row[row]:
                cell_index = int(top.cells[p, rank])
                img = overlay(view, maps[j, p], signed=signed)
                img = draw_box(img, token_boxes[cell_index], POSITIVE_BOX)
                crop = img.crop(patch_window(token_boxes[cell_index], (input_w, input_h), patch_side))
                crop = crop.resize((cfg.patch_px, cfg.patch_px), Image.BICUBIC)
                name = f"{IMAGE_DIR}/proto-{p:05d}-top{rank}.png"
                crop.save(out / name)
                patch_files[(p, rank)] = name
                png_count += 1

    # test images: the plain view, and one overlay per shown prototype
    for item in explained:
        view = images.view(item["row"])
        name = f"{IMAGE_DIR}/image-{item['row']:07d}.png"
        view.save(out / name)
        item["view_png"] = name
        png_count += 1
        for block in item["blocks"]:
            for entry in block["prototypes"]:
                p = entry["prototype"]
                name = f"{IMAGE_DIR}/image-{item['row']:07d}-proto-{p:05d}.png"
                if not (out / name).exists():
                    img = overlay(view, entry["map"], signed=signed)
                    if entry["negative_peak_cell"] is not None:
                        img = draw_box(img, token_boxes[entry["negative_peak_cell"]], NEGATIVE_BOX)
                    img = draw_box(img, token_boxes[entry["peak_cell"]], POSITIVE_BOX)
                    img.save(out / name)
                    png_count += 1
                entry["overlay_png"] = name
                entry.pop("map")

    # ---- report data and page
    table = store.metadata()
    meta_cols = {k: table.column(k).to_pylist() for k in ("image_id", "path", "class_name") if k in table.column_names}

    def meta(row: int) -> dict[str, str]:
        return {k: str(v[row]) for k, v in meta_cols.items()}

    gallery = []
    for p in shown:
        patches = [{"rank": r, "row": int(top.rows[p, r]), "cell": int(top.cells[p, r]),
                    "value": float(top.values[p, r]), "png": patch_files[(p, r)], **meta(int(top.rows[p, r]))}
                   for r in range(top.rows.shape[1])]
        cls = sorted(classes_of.get(p, []), key=lambda c: (-weights[c, p], c))
        gallery.append({"prototype": p, "importance": float(importance[p]), "patches": patches,
                        "classes": [{"class": c, "name": class_names[c], "weight": float(weights[c, p])} for c in cls]})
    for item in explained:
        item.update(meta(item["row"]))
        for block in item["blocks"]:
            block["name"] = class_names[block["class"]]
            for entry in block["prototypes"]:
                p = entry["prototype"]
                entry["patches"] = [patch_files[(p, r)] for r in range(top.rows.shape[1])]
                entry["in_gallery"] = p in in_gallery
    summary = {
        "run": str(cfg.run), "head": getattr(head, "name", type(head).__name__), "store": str(store.path),
        "dataset": store.fingerprint.get("dataset"), "backbone": store.fingerprint.get("backbone"),
        "split": cfg.split, "train_split": cfg.train_split, "seed": cfg.seed,
        "prototype_count": int(head.prototype_count), "prototypes_used": len(used),
        "prototypes_shown": len(shown), "images_in_split": int(len(correct)),
        "split_accuracy": float(correct.mean()), "train_images_scanned": int(num_train),
        "signed_maps": signed, "metrics": _headline_metrics(metrics),
        "config": asdict(cfg),
    }
    report = {"summary": summary, "gallery": gallery, "images": explained}
    lazy = cfg.lazy_images if cfg.lazy_images is not None else (png_count > 400)
    (out / "index.html").write_text(render_html(report, class_names, lazy=lazy), encoding="utf-8")
    from protocache.stores.runs import write_json

    write_json(out / REPORT_MARKER, report)
    n_right = sum(1 for i in explained if i["correct"])
    return ExplainResult(index=str(out / "index.html"), out=str(out), prototypes_shown=len(shown),
                         prototypes_used=len(used), images_explained=len(explained), correct=n_right,
                         wrong=len(explained) - n_right, png_files=png_count,
                         seconds=time.perf_counter() - started)


def _is_signed(head) -> bool:
    """Whether the head's similarity maps are signed (InfoDisent's rotated channels: evidence for and against)."""
    return getattr(head, "name", "") == "infodisent" or hasattr(head, "channel_evidence")


def _headline_metrics(metrics: dict | None) -> dict[str, Any]:
    """The scalar entries of the run's metrics.json (accuracies, counts)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


CSS = """
:root { --fg: #1d232b; --muted: #5d6773; --line: #d9dee4; --bg: #f6f7f9; --card: #fff;
        --good: #1a7f37; --bad: #c62828; --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #202a36; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 6px; font-size: 21px; font-weight: 600; }
header .facts { color: #c9d3de; font-size: 13px; }
header .facts span { margin-right: 18px; white-space: nowrap; }
nav { padding: 8px 28px; background: #e9edf2; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); margin-right: 18px; text-decoration: none; font-weight: 600; }
main { padding: 8px 28px 40px; }
h2 { font-size: 18px; margin: 26px 0 4px; }
p.note { color: var(--muted); margin: 0 0 14px; max-width: 70em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(590px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card h3 { margin: 0 0 6px; font-size: 15px; }
.card h3 .meta { font-weight: normal; color: var(--muted); font-size: 12.5px; margin-left: 8px; }
.patches { display: flex; gap: 6px; flex-wrap: wrap; }
.patches figure { margin: 0; text-align: center; }
.patches img { width: 100px; height: 100px; border-radius: 4px; border: 1px solid var(--line); display: block;
               image-rendering: auto; }
.patches figcaption { font-size: 11px; color: var(--muted); max-width: 100px; overflow: hidden;
                      text-overflow: ellipsis; white-space: nowrap; }
.classes { margin-top: 6px; font-size: 12.5px; }
.tag { display: inline-block; background: #eef2f7; border: 1px solid var(--line); border-radius: 10px;
       padding: 0 8px; margin: 2px 4px 2px 0; }
.tag b { font-weight: 600; }
.explained { display: flex; flex-direction: column; gap: 16px; }
.image-card { display: grid; grid-template-columns: 230px 1fr; gap: 16px; }
.image-card .input img { width: 224px; height: auto; border-radius: 4px; border: 1px solid var(--line); }
.verdict { font-weight: 600; margin: 6px 0 2px; }
.verdict.good { color: var(--good); }
.verdict.bad { color: var(--bad); }
.small { font-size: 12px; color: var(--muted); word-break: break-all; }
.block h4 { margin: 4px 0 6px; font-size: 14px; }
table.evidence { border-collapse: collapse; width: 100%; }
table.evidence td, table.evidence th { border-top: 1px solid var(--line); padding: 6px 8px; vertical-align: middle;
                                       text-align: left; }
table.evidence th { font-size: 12px; color: var(--muted); font-weight: 600; }
table.evidence img.where { width: 150px; height: auto; border-radius: 4px; border: 1px solid var(--line); }
table.evidence .patches img { width: 72px; height: 72px; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--good); }
.neg { color: var(--bad); }
.legend-box { display: inline-block; width: 11px; height: 11px; border: 2px solid; vertical-align: -1px; }
a { color: var(--accent); }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, loaded = 0, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) loaded++;
    else if (imgs[i].complete) broken++;
  }
  var d = document.body.dataset;
  d.imagesTotal = String(imgs.length);
  d.imagesLoaded = String(loaded);
  d.imagesBroken = String(broken);
  d.prototypesShown = String(document.querySelectorAll('.gallery .prototype').length);
  d.imagesExplained = String(document.querySelectorAll('.explained .image-card').length);
  d.ready = '1';
});
"""


def render_html(report: dict[str, Any], class_names: Sequence[str], lazy: bool = False) -> str:
    """The report page; every text that comes from the data is HTML-escaped."""
    s = report["summary"]
    load = ' loading="lazy"' if lazy else ""
    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e('protocache explain: ' + str(s['head']) + ' on ' + str(s['dataset']))}</title>\n"
        f"<style>{CSS}</style>\n</head>\n")
    add(f"<body data-prototypes-expected=\"{len(report['gallery'])}\" "
        f"data-images-expected=\"{len(report['images'])}\">\n")
    facts = [("head", s["head"]), ("dataset", s["dataset"]), ("backbone", s["backbone"]),
             ("prototypes used", f"{s['prototypes_used']} of {s['prototype_count']}"),
             (f"{s['split']} accuracy", f"{100 * s['split_accuracy']:.1f}% of {s['images_in_split']}")]
    if isinstance(s["metrics"].get("train_accuracy"), (int, float)):
        facts.append(("train accuracy", f"{100 * float(s['metrics']['train_accuracy']):.1f}%"))
    add("<header><h1>This looks like that: " + _e(s["head"]) + " on " + _e(s["dataset"]) + "</h1>"
        "<div class=\"facts\">" + "".join(f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in facts) + "</div>"
        "<div class=\"facts\"><span>run: " + _e(s["run"]) + "</span><span>store: " + _e(s["store"]) + "</span></div>"
        "</header>\n")
    add("<nav><a href=\"#gallery\">Prototype gallery</a><a href=\"#images\">Explained images</a></nav>\n<main>\n")

    # gallery
    add("<section id=\"gallery\"><h2>Prototype gallery</h2>")
    more = s["prototypes_used"] - s["prototypes_shown"]
    add("<p class=\"note\">Each prototype the head uses, most important first (importance: mean |contribution| to "
        f"the true class's logit over the {_e(s['train_split'])} split). Patches: the "
        f"{_e(s['train_split'])} images where the prototype is most present, cropped around its peak "
        "(<span class=\"legend-box\" style=\"border-color:rgb(0,230,64)\"></span> token box), activation overlaid"
        + (" (red: positive, blue: negative channel values)" if s["signed_maps"] else "") + "."
        + (f" {more} less important prototype(s) are not shown." if more > 0 else "") + "</p>")
    add("<div class=\"gallery\">")
    for g in report["gallery"]:
        p = g["prototype"]
        add(f"<div class=\"card prototype\" id=\"proto-{p}\" data-prototype=\"{p}\">")
        add(f"<h3>Prototype {p}<span class=\"meta\">importance {_e(_fmt(g['importance']))} · "
            f"{len(g['classes'])} class(es)</span></h3>")
        add("<div class=\"patches\">")
        for patch in g["patches"]:
            tip = f"{patch.get('image_id', '')} · {patch.get('class_name', '')} · {patch.get('path', '')}"
            alt = f"prototype {p} patch {patch['rank']}"
            add(f"<figure><img src=\"{_e(patch['png'])}\" alt=\"{_e(alt)}\" title=\"{_e(tip)}\"{load}>"
                f"<figcaption>{_e(patch.get('class_name', ''))} · {_e(_fmt(patch['value']))}</figcaption></figure>")
        add("</div><div class=\"classes\">")
        shown_classes = g["classes"][:8]
        for c in shown_classes:
            add(f"<span class=\"tag\">{_e(c['name'])} <b>w={_e(_fmt(c['weight']))}</b></span>")
        if len(g["classes"]) > len(shown_classes):
            add(f"<span class=\"small\">+{len(g['classes']) - len(shown_classes)} more</span>")
        add("</div></div>")
    add("</div></section>\n")

    # explained images
    add("<section id=\"images\"><h2>Explained images</h2>")
    add(f"<p class=\"note\">{len(report['images'])} {_e(s['split'])} image(s), chosen with seed {_e(s['seed'])} "
        "to mix correct and wrong predictions. For the predicted class (and the true class when they differ): "
        "the prototypes that contribute most to its logit, where each fires on the image "
        "(<span class=\"legend-box\" style=\"border-color:rgb(0,230,64)\"></span> peak"
        + (", <span class=\"legend-box\" style=\"border-color:rgb(255,0,200)\"></span> strongest negative evidence"
           if s["signed_maps"] else "")
        + "), and the training patches it stands for.</p>")
    add("<div class=\"explained\">")
    for item in report["images"]:
        ok = item["correct"]
        add(f"<div class=\"card image-card\" id=\"image-{item['row']}\" data-correct=\"{str(ok).lower()}\">")
        add("<div class=\"input\">")
        add(f"<img src=\"{_e(item['view_png'])}\" alt=\"{_e('input ' + item.get('image_id', ''))}\"{load}>")
        verdict = "correct" if ok else "wrong"
        add(f"<div class=\"verdict {'good' if ok else 'bad'}\">{'✓' if ok else '✗'} {verdict}</div>")
        add(f"<div>predicted <b>{_e(class_names[item['pred']])}</b> ({100 * item['confidence']:.1f}%)</div>")
        add(f"<div>true <b>{_e(class_names[item['label']])}</b></div>")
        add(f"<div class=\"small\">{_e(item.get('image_id', ''))}<br>{_e(item.get('path', ''))}</div>")
        add("</div><div>")
        for block in item["blocks"]:
            role = "predicted class" if block["class"] == item["pred"] else "true class"
            add(f"<div class=\"block\"><h4>Why {_e(block['name'])} ({role})? logit {_e(_fmt(block['logit']))}; "
                f"shown prototypes sum to {_e(_fmt(block['shown_sum']))} of {_e(_fmt(block['total_sum']))}</h4>")
            if not block["prototypes"]:
                add("<p class=\"small\">No prototype contributes to this class.</p></div>")
                continue
            add("<table class=\"evidence\"><tr><th>this (where it fires)</th><th>looks like that (prototype's "
                "training patches)</th><th>contribution</th></tr>")
            for entry in block["prototypes"]:
                p = entry["prototype"]
                link = f"<a href=\"#proto-{p}\">prototype {p}</a>" if entry["in_gallery"] else f"prototype {p}"
                add(f"<tr><td><img class=\"where\" src=\"{_e(entry['overlay_png'])}\" "
                    f"alt=\"{_e('prototype ' + str(p) + ' on this image')}\"{load}></td>")
                add(f"<td>{link}<div class=\"patches\">"
                    + "".join(f"<img src=\"{_e(png)}\" alt=\"{_e('prototype ' + str(p) + ' patch')}\"{load}>"
                              for png in entry["patches"]) + "</div></td>")
                net = entry["contribution"]
                rows = [f"<b class=\"{'pos' if net >= 0 else 'neg'}\">{_e(('+' if net >= 0 else '') + _fmt(net))}</b>"]
                if s["signed_maps"] or entry["negative"]:
                    minus = "−" if entry["negative"] else ""
                    rows.append(f"<span class=\"pos\">+{_e(_fmt(entry['positive']))}</span> / "
                                f"<span class=\"neg\">{minus}{_e(_fmt(entry['negative']))}</span>")
                rows.append(f"<span class=\"small\">presence {_e(_fmt(entry['presence']))} × "
                            f"w {_e(_fmt(entry['weight']))}</span>")
                add("<td class=\"num\">" + "<br>".join(rows) + "</td></tr>")
            add("</table></div>")
        add("</div></div>")
    add("</div></section>\n</main>\n")
    add(f"<script>{SCRIPT}</script>\n</body>\n</html>\n")
    return "".join(parts)
