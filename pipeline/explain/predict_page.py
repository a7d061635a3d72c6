"""predict --explain: OUT/index.html, why the run predicts what it does on each new image.

Per readable image (rendered from ``predict.html.j2``, a page of the explain report's
``base.html.j2`` family, with autoescape): its top-k classes as ``predictions.parquet`` holds
them, and for the top class the ``top_prototypes`` prototypes with the largest |contribution|
to its logit (``ProtoModel.explain``), each with

- where it fires in *this* image: its similarity map over the image as the model saw it
  (the model-input view), the peak cell boxed (and, for heads with signed evidence, the
  strongest negative cell),
- the training patches it stands for: the training images where it is most present, cut
  around their peak cells, found and drawn as the explain report finds and draws them
  (``evidence.kept_scan_training`` over the run's train split, kept in the run folder;
  ``report.Pictures``; the images are reloaded from the store's dataset by their metadata records),
- its contribution to the logit (positive minus negative evidence; both parts shown for
  InfoDisent, whose evidence is signed).

A linear probe's "prototypes" are its class maps (class c's score of each cell). Unreadable
files are listed with their reason. The page's data is also written as ``explain.json``.
--explain reads the store the run was fitted on (its tokens, for the training scan; its
metadata, to reload the training images), so the store and its dataset must be reachable
(``--root`` where the dataset moved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from protocache.stores.errors import ProtocacheError

from .config import IMAGE_DIR, ExplainConfig
from .evidence import kept_scan_training
from .images import ImageSource
from .report import Pictures, meta_reader, render_page

TEMPLATE = "predict.html.j2"
INDEX = "index.html"
PAGE_DATA = "explain.json"  # the page's data: summary, items (evidence per image), unreadable, patches


class PredictPage:
    """The explanation page of one predict run: built before predicting (the run's store is opened and
    scanned, so a missing store or dataset fails before any image is read), written into the output."""

    def __init__(self, model, top_prototypes: int, batch_size: int, root: str | None = None):
        from protocache.pipeline.runs import open_run_store

        self.model, self.top_prototypes = model, int(top_prototypes)
        self.drawing = ExplainConfig()  # the report's patch geometry and count of training patches per prototype
        try:
            self.store = open_run_store(model.run_dir, model.run_config)
        except ProtocacheError as exc:
            raise ProtocacheError(f"predict --explain shows each prototype's training patches from the store the "
                                  f"run was fitted on: {exc}") from None
        self.images = ImageSource(self.store, root)
        self.top, _, _ = kept_scan_training(model.head, self.store, "train", self.drawing.patches, batch_size,
                                            model.device, model.run_dir)
        self.images.view(int(self.top.rows[0, 0]))  # the dataset is reachable (else: pass --root)

    def write(self, table, out: Path, sources: Sequence[Any] | None = None) -> dict[str, Any]:
        """Explain every readable row of `table` (predict's table, in order, of `sources`: the paths or images it
        was made from; default: the table's paths) into out/index.html + out/img/; returns what the page holds."""
        model, names = self.model, self.model.class_names
        (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        pictures = Pictures(self.store, self.images, out, bool(model.head.signed_evidence), self.drawing)
        class_maps = model.head.name == "linear"
        items, unreadable, needed = [], [], set()
        for index, row in enumerate(table.to_pylist()):
            path = row["path"] if row["path"] is not None else f"image {index}"
            if not row["ok"]:
                unreadable.append({"index": index, "path": path, "reason": row["reason"]})
                continue
            top_class = int(row["top_k_classes"][0])
            try:
                source = sources[index] if sources is not None else row["path"]
                evidence = model.explain(source, top_prototypes=self.top_prototypes, label=top_class)
            except Exception as exc:  # noqa: BLE001 - a file that changed since it was predicted is listed, not a crash
                unreadable.append({"index": index, "path": path, "reason": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            block = next(b for b in evidence["classes"] if b["class"] == top_class)
            for entry in block["prototypes"]:
                p = entry["prototype"]
                entry["title"] = f"class map of {names[p]}" if class_maps else f"prototype {p}"
                needed.add(p)
            item = {"index": index, "path": path, "pred_name": names[top_class], "block": block,
                    "top": [{"class": c, "name": n, "probability": pr} for c, n, pr in
                            zip(row["top_k_classes"], row["top_k_names"], row["top_k_probabilities"])]}
            drawn = {"blocks": [block]}
            pictures.evidence(evidence["input_view"], drawn, f"{IMAGE_DIR}/input-{index:06d}")
            items.append(item | {"view_png": drawn["view_png"]})
        patch_info = pictures.patches(model.head, self.top, sorted(needed), self.drawing.batch_size, model.device)
        meta = meta_reader(self.store)
        for patches in patch_info.values():
            for patch in patches:
                patch.update(meta(patch["row"]))
        summary = {"run": str(model.run_dir), "head": model.head.name or type(model.head).__name__,
                   "backbone": model.fingerprint.get("backbone"), "dataset": self.store.fingerprint.get("dataset"),
                   "store": str(self.store.path), "images": len(table), "explained": len(items),
                   "unreadable": len(unreadable), "patches": self.drawing.patches,
                   "top_prototypes": self.top_prototypes, "signed_maps": bool(model.head.signed_evidence),
                   "class_maps": class_maps}
        lazy = pictures.count > 400
        page = render_page(TEMPLATE, s=summary, items=items, unreadable=unreadable, patch_info=patch_info, lazy=lazy)
        (out / INDEX).write_text(page, encoding="utf-8")
        from protocache.stores.runs import write_json

        write_json(out / PAGE_DATA, {"summary": summary, "items": items, "unreadable": unreadable,
                                     "patches": {str(p): patch_info[p] for p in sorted(patch_info)}})
        return {"index": INDEX, "images_explained": len(items), "unreadable": len(unreadable),
                "prototypes_shown": len(needed), "png_files": pictures.count}

