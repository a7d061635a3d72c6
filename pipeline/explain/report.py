"""The report: load a run, gather the evidence, draw the pictures, write the folder.

``DIR/index.html`` (rendered from ``report.html.j2`` with autoescape), the PNG files under
``DIR/img/`` (relative links, no server, no network) and ``DIR/report.json`` (the data on
the page; also the marker that lets a later run replace the folder).
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from protocache.pipeline import metrics as M
from protocache.pipeline.evaluate import _keypoints, metric_config
from protocache.pipeline.runs import load_run, open_run_store
from protocache.pipeline.runtime import resolve_device
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError
from protocache.stores.owned import replace_dir, restore_interrupted

from .config import IMAGE_DIR, REPORT_MARKER, ExplainConfig, ExplainResult
from .drawing import NEGATIVE_BOX, POSITIVE_BOX, crop_patch, css_gradient, draw_box, overlay, patch_window
from .evidence import TopImages, as_tensor, choose_images, explain_images, kept_scan_training, predict_split, \
    similarity_maps, used_prototypes
from .images import ImageSource

TEMPLATE = "report.html.j2"


def explain_run(cfg: ExplainConfig) -> ExplainResult:
    """Load a run (head, config, metrics) and write its report to cfg.out."""
    if not cfg.out:
        raise ProtocacheError("explain needs an output folder (--out DIR)")
    cfg.validate()  # numbers and a writable --out, before the run is loaded
    run = load_run(cfg.run)
    store = open_run_store(cfg.run, run.config)  # refused if re-extracted since the fit; the fit's train / val rows
    return explain(run.head, store, cfg, config=run.config, metrics=run.metrics)


@torch.inference_mode()
def explain(head, store: FeatureStore, cfg: ExplainConfig, config: dict | None = None,
            metrics: dict | None = None) -> ExplainResult:
    """Write the report of `head` (fitted on `store`) to cfg.out; see the package docstring."""
    started = time.perf_counter()
    cfg.validate()
    store.require_split(cfg.split, "--split")
    store.require_split(cfg.train_split, "--train-split")
    device = resolve_device(cfg.device)
    head = head.to(device).eval()
    out = Path(cfg.out).expanduser()
    staging = prepare_out(out)
    try:
        result = _write_report(head, store, cfg, staging, device, metrics)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    land(staging, out)
    result.index, result.out = str(out / "index.html"), str(out)
    result.seconds = time.perf_counter() - started
    return result


def _write_report(head, store: FeatureStore, cfg: ExplainConfig, out: Path, device: torch.device,
                  metrics: dict | None) -> ExplainResult:
    """Gather the evidence, draw the pictures and write the page and report.json into `out`."""
    class_names = list(store.attrs.get("class_names") or [])
    num_classes = int(head.num_classes)
    class_names += [str(c) for c in range(len(class_names), num_classes)]
    signed = bool(head.signed_evidence)
    pictures = Pictures(store, ImageSource(store, cfg.root), out, signed, cfg)
    weights = head.class_weights().float().cpu().numpy()  # [C, P]

    # ---- predictions on the explained split, the choice of images, their evidence
    pred = predict_split(head, store, cfg.split, cfg.batch_size, device)
    correct = pred["preds"] == pred["labels"]
    chosen = choose_images(correct, cfg.images, cfg.seed)
    explained, needed = explain_images(head, store, pred, chosen, cfg.top_prototypes, cfg.batch_size, device)

    # ---- the gallery: the images and patches PIP-Net purity scores on the training split, and importance
    mconf = metric_config(store, M.MetricConfig())
    top, importance, num_train = kept_scan_training(head, store, cfg.train_split, mconf["purity_top_k"],
                                                    cfg.batch_size, device, cfg.run)
    used, per_class = used_prototypes(head, num_classes)
    used_sorted = sorted(used, key=lambda p: (-importance[p], p))
    shown = used_sorted if cfg.max_prototypes is None else used_sorted[:max(0, cfg.max_prototypes)]
    in_gallery = set(shown)
    classes_of: dict[int, list[int]] = {}
    for c, ps in per_class.items():
        for p in ps:
            classes_of.setdefault(p, []).append(c)

    # ---- pictures
    patch_info = pictures.patches(head, top, sorted(in_gallery | needed), cfg.batch_size, device)
    pictures.explained(explained)
    purity = _gallery_purity(store, top, used, mconf)

    # ---- report data and page
    meta = meta_reader(store)
    for patches in patch_info.values():
        for patch in patches:
            patch.update(meta(patch["row"]))
    gallery = []
    for p in shown:
        cls = sorted(classes_of.get(p, []), key=lambda c: (-weights[c, p], c))
        gallery.append({"prototype": p, "importance": float(importance[p]), "patches": patch_info[p],
                        "purity": purity["per_prototype"].get(p) if purity else None,
                        "classes": [{"class": c, "name": class_names[c], "weight": float(weights[c, p])} for c in cls]})
    for item in explained:
        item.update(meta(item["row"]))
        for block in item["blocks"]:
            block["name"] = class_names[block["class"]]
            for entry in block["prototypes"]:
                p = entry["prototype"]
                entry["patches"] = [patch["png"] for patch in patch_info[p][:cfg.patches]]
                entry["in_gallery"] = p in in_gallery
    summary = {
        "run": str(cfg.run), "head": head.name or type(head).__name__, "store": str(store.path),
        "dataset": store.fingerprint.get("dataset"), "backbone": store.fingerprint.get("backbone"),
        "split": cfg.split, "train_split": cfg.train_split, "seed": cfg.seed,
        "prototype_count": int(head.prototype_count), "prototypes_used": len(used),
        "prototypes_shown": len(shown), "images_in_split": int(len(correct)),
        "split_accuracy": float(correct.mean()), "train_images_scanned": int(num_train),
        "signed_maps": signed, "metrics": _headline_metrics(metrics),
        "purity": None if purity is None else {k: v for k, v in purity.items() if k != "per_prototype"},
        "purity_patch": mconf["purity_patch"], "purity_top_k": mconf["purity_top_k"],
        "config": asdict(cfg),
    }
    report = {"summary": summary, "gallery": gallery, "images": explained}
    lazy = cfg.lazy_images if cfg.lazy_images is not None else (pictures.count > 400)
    page = render_html(report, class_names, patch_info, lazy=lazy)
    (out / "index.html").write_text(page, encoding="utf-8")
    from protocache.stores.runs import write_json

    write_json(out / REPORT_MARKER, report)
    n_right = sum(1 for i in explained if i["correct"])
    return ExplainResult(index=str(out / "index.html"), out=str(out), prototypes_shown=len(shown),
                         prototypes_used=len(used), images_explained=len(explained), correct=n_right,
                         wrong=len(explained) - n_right, png_files=pictures.count, seconds=0.0)


class Pictures:
    """Writes the report's PNG files: raw and overlaid patches, input views and their overlays."""

    def __init__(self, store: FeatureStore, images: ImageSource, out: Path, signed: bool, cfg: ExplainConfig):
        self.store, self.images, self.out, self.signed = store, images, out, signed
        self.input_h, self.input_w = (int(v) for v in store.attrs["input_size"][-2:])
        self.token_boxes = np.asarray(store.attrs["token_boxes"], dtype=np.float64)
        grid = tuple(int(v) for v in store.layout.grid)
        self.grid = grid
        self.purity_patch = metric_config(store, M.MetricConfig())["purity_patch"]
        cell = max(self.input_w / grid[1], self.input_h / grid[0])
        side = min(self.input_w, self.input_h)
        self.patch_side = min(max(cfg.patch_cells * cell, cfg.patch_min_fraction * side), side)
        self.patch_px = cfg.patch_px
        self.count = 0

    def _save(self, image, name: str) -> str:
        image.save(self.out / name)
        self.count += 1
        return name

    def patches(self, head, top: TopImages, prototypes: Sequence[int], batch_size: int, device: torch.device
                ) -> dict[int, list[dict[str, Any]]]:
        """Each prototype's top training images (purity's): the raw crop and the overlaid crop around the
        purity patch of the peak cell (the box drawn is that patch), with its scale."""
        # group by training row so each image is reloaded and mapped once
        by_row: dict[int, list[tuple[int, int]]] = {}
        for p in prototypes:
            for rank in range(top.rows.shape[1]):
                by_row.setdefault(int(top.rows[p, rank]), []).append((p, rank))
        info: dict[tuple[int, int], dict[str, Any]] = {}
        rows_sorted = sorted(by_row)
        for lo in range(0, len(rows_sorted), batch_size):
            rows = np.asarray(rows_sorted[lo:lo + batch_size], dtype=np.int64)
            maps = similarity_maps(head, as_tensor(self.store.read_rows("tokens", rows), device))
            for j, row in enumerate(rows.tolist()):
                view = self.images.view(row)
                for p, rank in by_row[row]:
                    cell = int(top.cells[p, rank])
                    centre = M.pipnet_patch_centres(np.array([cell]), self.grid, (self.input_h, self.input_w),
                                                    self.purity_patch)[0]
                    box = purity_box(centre, self.purity_patch, (self.input_h, self.input_w))
                    window = patch_window(box, (self.input_w, self.input_h), self.patch_side)
                    heat, scale = overlay(view, maps[j, p], signed=self.signed)
                    heat = draw_box(heat, box, POSITIVE_BOX)
                    stem = f"{IMAGE_DIR}/proto-{p:05d}-top{rank}"
                    info[(p, rank)] = {
                        "rank": rank, "row": row, "cell": cell, "value": float(top.values[p, rank]),
                        "peak_x": float(centre[0]), "peak_y": float(centre[1]), "patch_box": box,
                        "png": self._save(crop_patch(heat, window, self.patch_px), f"{stem}.png"),
                        "raw_png": self._save(crop_patch(view, window, self.patch_px), f"{stem}-raw.png"),
                        "scale": scale}
        return {p: [info[(p, r)] for r in range(top.rows.shape[1])] for p in prototypes}

    def explained(self, explained: list[dict[str, Any]]) -> None:
        """Each explained store image: its view and evidence drawn by `evidence`."""
        for item in explained:
            self.evidence(self.images.view(item["row"]), item, f"{IMAGE_DIR}/image-{item['row']:07d}")

    def evidence(self, view, item: dict[str, Any], stem: str) -> None:
        """One explained image (its model-input view; `item` as explain_images gives it): the plain view as
        `item["view_png"]`, and one overlay (peak box, negative box) per shown prototype as the entry's
        `overlay_png` and `scale` (its map is dropped once drawn). Also draws predict --explain's new images."""
        item["view_png"] = self._save(view, f"{stem}.png")
        drawn: dict[int, tuple[str, dict[str, Any]]] = {}
        for block in item["blocks"]:
            for entry in block["prototypes"]:
                p = entry["prototype"]
                if p not in drawn:
                    img, scale = overlay(view, entry["map"], signed=self.signed)
                    if entry["negative_peak_cell"] is not None:
                        img = draw_box(img, self.token_boxes[entry["negative_peak_cell"]], NEGATIVE_BOX)
                    img = draw_box(img, self.token_boxes[entry["peak_cell"]], POSITIVE_BOX)
                    drawn[p] = (self._save(img, f"{stem}-proto-{p:05d}.png"), scale)
                entry["overlay_png"], entry["scale"] = drawn[p]
                entry.pop("map")


def purity_box(centre: np.ndarray, patch: float, input_hw: tuple[int, int]) -> list[float]:
    """[x0, y0, x1, y1] of the purity patch centred at `centre`, moved inside the input (metrics.patch_hits)."""
    h, w = input_hw
    x0 = float(np.clip(centre[0] - patch / 2.0, 0, max(w - patch, 0)))
    y0 = float(np.clip(centre[1] - patch / 2.0, 0, max(h - patch, 0)))
    return [x0, y0, x0 + patch, y0 + patch]


def _gallery_purity(store: FeatureStore, top: TopImages, used: list[int], mconf: dict[str, Any]
                    ) -> dict[str, Any] | None:
    """PIP-Net purity of the gallery's top images (the same rows `evaluate --split <train split>` scores):
    the mean over the used prototypes, and per prototype {purity, part}; None without part keypoints."""
    keypoints = _keypoints(store)
    if keypoints is None or not used:
        return None
    protos = np.asarray(used, dtype=np.int64)
    k = top.rows.shape[1]
    cells = top.cells[protos].reshape(-1)
    centres = M.pipnet_patch_centres(cells, tuple(mconf["grid"]), tuple(mconf["input_size"]), mconf["purity_patch"])
    args = (np.repeat(protos, k), centres, keypoints[top.rows[protos].reshape(-1)], store.attrs["part_names"],
            mconf["purity_patch"], tuple(mconf["input_size"]))
    per = M.purity_per_prototype(*args)
    return {**M.purity(*args), "per_prototype": {p: {"value": v, "part": part} for p, (v, part) in per.items()}}


def prepare_out(out: Path) -> Path:
    """Check the report folder and return an empty staging folder (with img/) to write the report into.

    `out` may be missing, empty, or a previous report (it holds REPORT_MARKER); any other
    non-empty folder is refused. The report is written into the staging folder (a hidden
    sibling of `out`) and lands in `out` only once complete (`land`), so a failure leaves a
    previous report whole and `out` reusable.
    """
    out = Path(out).expanduser()
    restore_interrupted(out)  # a swap cut short between its renames
    if out.exists() and not out.is_dir():
        raise ProtocacheError(f"{out} exists and is not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()) and not (out / REPORT_MARKER).exists():
        raise ProtocacheError(f"{out} exists, is not empty and is not an explain report; choose another --out.")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / IMAGE_DIR).mkdir(parents=True)
    except OSError as exc:
        raise ProtocacheError(f"cannot write the report next to {out} ({exc.strerror}: {exc.filename}); "
                              "choose a folder you can write to as --out") from None
    return staging


def land(staging: Path, out: Path) -> None:
    """Swap the complete staged report in for `out` (a previous report, an empty folder or nothing):
    at every moment `out` is the whole previous report or the whole new one."""
    replace_dir(staging, out)


def meta_reader(store: FeatureStore):
    """row -> its image_id, path and class_name from the store's metadata (as strings), for captions."""
    table = store.metadata()
    cols = {k: table.column(k).to_pylist() for k in ("image_id", "path", "class_name") if k in table.column_names}
    return lambda row: {k: str(v[row]) for k, v in cols.items()}


def _headline_metrics(metrics: dict | None) -> dict[str, Any]:
    """The scalar entries of the run's metrics.json (accuracies, counts)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def fmt(x: float) -> str:
    """A number for the page: 0, 3 decimals, or 3 significant digits when very large or small."""
    if x == 0:
        return "0"
    if abs(x) >= 100 or abs(x) < 0.001:
        return f"{x:.3g}"
    return f"{x:.3f}"


@functools.cache
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt
    return env


def render_page(template: str, **context: Any) -> str:
    """A page of the base.html.j2 family (report.html.j2, predict.html.j2) with the colour bars' gradients;
    the environment escapes every value that comes from the data."""
    gradients = {"seq": css_gradient(False), "div": css_gradient(True)}
    return _environment().get_template(template).render(gradients=gradients, **context)


def render_html(report: dict[str, Any], class_names: Sequence[str], patch_info: dict[int, list[dict[str, Any]]],
                lazy: bool = False) -> str:
    """The report page, from the template; the environment escapes every value that comes from the data."""
    return render_page(TEMPLATE, s=report["summary"], gallery=report["gallery"], images=report["images"],
                       class_names=list(class_names), patch_info=patch_info, lazy=lazy)
