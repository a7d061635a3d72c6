"""A trained run as one model outside the cache: `load_model(RUN) -> ProtoModel`.

A run folder holds only the head; the backbone it was trained behind is named by the
fingerprint of the store the run was fitted on (recorded in the run's config.json):
backbone, weights source and SHA-256, preprocessing (resize rule, mean/std) and compute
precision. `load_model` rebuilds that backbone and refuses to go on unless its weights
hash to the fingerprint's SHA-256, so the head never reads features of other weights.

`ProtoModel` is an `nn.Module` (frozen, always in eval mode) whose forward maps
preprocessed images [N, 3, H, W] to the head's logits exactly as the cached path
computes them: the backbone runs at the store's precision (bf16 autocast or fp32) and
its tokens and pooled features are rounded to float16 and back, because the store holds
float16 and the head was fitted, evaluated and explained on those values.

    model = load_model("runs/digits-pq")
    x = torch.stack([model.preprocess(image) for image in pil_images])
    logits = model(x)
    table = model.predict(["photo.jpg", pil_image], top_k=3)   # a pyarrow Table
    evidence = model.explain("photo.jpg")                       # prototypes, maps, contributions

Images are decoded by the one rule every loader uses (`datasets._common.to_rgb`). A run
fitted on a store of bounding-box crops (CUB) saw each image cropped to its box first;
new images get no crop, only the store's resize rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from protocache.stores.errors import ProtocacheError

FINGERPRINT_KEYS = ("backbone", "weights_source", "weights_sha256", "preprocessing", "precision")


def weights_spec(source: str) -> str | None:
    """The `--weights` value that rebuilds a fingerprint's weights source; None for a local file
    (the fingerprint keeps only its name, so the caller must pass the path)."""
    if source.startswith("shipped:"):
        return "shipped"
    if source.startswith("random"):
        return "random"
    if source.startswith("hub:"):
        return "hub"
    return None


def run_fingerprint(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The store fingerprint a run recorded, with every field a rebuilt backbone needs."""
    fingerprint = (config.get("store") or {}).get("fingerprint") or {}
    missing = [k for k in FINGERPRINT_KEYS if not fingerprint.get(k)]
    if missing:
        raise ProtocacheError(f"{run_dir}/config.json records no {', '.join(missing)} of its store's backbone, so "
                              "the backbone cannot be rebuilt; refit the run on a store made by `protocache extract`")
    return fingerprint


def _resolve_label(label: int | str | None, class_names: Sequence[str]) -> int | None:
    """A class given by name or index -> its index (None stays None)."""
    if label is None:
        return None
    if isinstance(label, str) and label in class_names:
        return list(class_names).index(label)
    if isinstance(label, str) and not (label.isascii() and label.isdigit()):
        raise ProtocacheError(f"unknown class {label!r}; the run's classes are {', '.join(class_names[:10])}"
                              + (" ..." if len(class_names) > 10 else ""))
    if not isinstance(label, (str, int, np.integer)) or isinstance(label, bool):
        raise ProtocacheError(f"label is a class index or name, got {label!r}")
    index = int(label)
    if not 0 <= index < len(class_names):
        raise ProtocacheError(f"class index {index} is out of range: the run has {len(class_names)} classes")
    return index


class _TokenRows:
    """Row access to features computed here, in the shape `explain.evidence.explain_images` reads a store."""

    def __init__(self, tokens: torch.Tensor, pooled: torch.Tensor):
        self.arrays = {"tokens": tokens.cpu().numpy(), "pooled": pooled.cpu().numpy()}

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.arrays[name][np.asarray(rows, dtype=np.int64)]


class ProtoModel(nn.Module):
    """A frozen backbone and a fitted head: preprocessed images [N, 3, H, W] -> logits [N, C].

    `preprocess` turns a PIL image into that input exactly as the store's images were prepared
    (the fingerprint's resize rule, mean and std); `class_names`, `grid`, `input_size`,
    `preprocessing` and `fingerprint` describe the rest."""

    def __init__(self, backbone, head, run_config: dict[str, Any], run_dir: str | Path):
        super().__init__()
        from .transforms import ModelInputTransform

        fingerprint = run_config["store"]["fingerprint"]
        self.backbone = backbone.model
        self.head = head
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.fingerprint = fingerprint
        self.weights_sha256 = backbone.weights_sha256
        self.is_cnn, self.num_prefix_tokens = backbone.is_cnn, backbone.num_prefix_tokens
        self.has_cls_token, self.channels_last = backbone.has_cls_token, backbone.channels_last
        self.precision = str(fingerprint["precision"])
        self.preprocessing = dict(fingerprint["preprocessing"])
        self.preprocess = ModelInputTransform(self.preprocessing)  # PIL -> [3, H, W], as the store's images were
        self.grid = tuple(head.info.grid)
        self.input_size = tuple(int(v) for v in backbone.input_size[-2:])
        self.class_names = list(head.info.class_names) or [str(c) for c in range(head.num_classes)]
        self.requires_grad_(False)
        super().train(False)

    # ------------------------------------------------------------------ the module
    def train(self, mode: bool = True) -> "ProtoModel":
        """Always eval: the backbone is frozen and heads switch to their training behaviour otherwise."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters(), next(self.backbone.parameters())).device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def token_boxes(self) -> list[list[float]]:
        """Pixel box [x0, y0, x1, y1] of each grid cell at the model's input size, row-major."""
        (gh, gw), (h, w) = self.grid, self.input_size
        return [[j * w / gw, i * h / gh, (j + 1) * w / gw, (i + 1) * h / gh] for i in range(gh) for j in range(gw)]

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's forward_features at the store's precision, as extract runs it (the bare forward)."""
        from .backbones import run_frozen

        return run_frozen(self.backbone, images.to(self.device), self.precision, self.channels_last)[0]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, T, D], pooled [N, D]) float32 holding exactly the float16 values a store would cache."""
        from .backbones import split_features

        feats = self.backbone_features(images)
        tokens, pooled = split_features(feats, self.is_cnn, self.num_prefix_tokens, self.has_cls_token)
        return tokens.half().float(), pooled.half().float()

    def classify(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The head on cached-style features, with exactly the inputs it declares (as fit and evaluate give it)."""
        inputs = self.head.inputs
        return self.head(tokens if "tokens" in inputs else None, pooled=pooled if "pooled" in inputs else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N, 3, H, W] (see `preprocess`) -> logits [N, C], float32."""
        self._check_input(images)
        if images.dtype == torch.float64:  # (the backbone's autocast takes float32 and lower)
            images = images.float()
        tokens, pooled = self.features(images)
        return self.classify(tokens, pooled).float()

    # ------------------------------------------------------------------ images in
    def _check_input(self, images: Any) -> None:
        """Preprocessed float images [N, 3, H, W] at the input size the head was fitted on, else one error
        (a head scores features of other sizes without complaint, and wrongly)."""
        h, w = self.input_size
        if not isinstance(images, torch.Tensor):
            raise ProtocacheError(f"the model takes a float tensor [N, 3, {h}, {w}] of preprocessed images, got a "
                                  f"{type(images).__name__}; use model.predict or model.preprocess for images")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w) or not images.is_floating_point():
            raise ProtocacheError(f"the model takes a float tensor [N, 3, {h}, {w}] of preprocessed images, got "
                                  f"{images.dtype} {list(images.shape)}; model.preprocess(image) makes one image's")

    def input_view(self, image) -> tuple[torch.Tensor, Any]:
        """One image (file path, PIL image, or an already preprocessed [3, H, W] / [1, 3, H, W] tensor)
        -> ([1, 3, H, W] input, the model-input view as a PIL image, or None for a tensor)."""
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
            if tuple(x.shape[1:]) != (3, *self.input_size) or len(x) != 1 or not x.is_floating_point():
                raise ProtocacheError(f"expected a preprocessed float image [3, {self.input_size[0]}, "
                                      f"{self.input_size[1]}], got {image.dtype} {list(image.shape)}; pass a path or "
                                      "a PIL image to preprocess it here")
            return x.float(), None
        from torchvision.transforms import functional

        pixels = self.preprocess.pixels(decode_image(image))
        return self.preprocess.normalize(pixels)[None], functional.to_pil_image(pixels.clamp(0, 1))

    # ------------------------------------------------------------------ predict and explain
    def predict(self, images: Sequence[Any], top_k: int = 5, batch_size: int = 32):
        """Top-k classes of image files and/or PIL images -> a pyarrow Table, one row per image in order:
        path (None for a PIL image), ok, reason, top_k_classes, top_k_names, top_k_probabilities, top_logit.
        A file that cannot be decoded is a row with ok = False and the reason."""
        from PIL import Image

        from .predict import predict_items

        if isinstance(images, (str, Path, Image.Image)):  # one image, not a sequence of characters
            images = [images]
        return predict_items(self, list(images), top_k=top_k, batch_size=batch_size, num_workers=0)

    @torch.inference_mode()
    def explain(self, image, top_prototypes: int = 5, label: int | str | None = None) -> dict[str, Any]:
        """Why the head predicts what it does on one image: for the predicted class (and `label`, a class
        index or name, when given and different) the `top_prototypes` prototypes with the largest
        |contribution| to its logit, each with its positive and negative evidence, presence, weight,
        similarity map on the token grid (`map`, [H, W]) and peak cell (index, (row, column) and pixel box
        at the model's input size). The blocks are those `protocache explain` draws
        (`explain.evidence.explain_images`); `contributions` [C, P] is every prototype's signed share
        of every class's logit."""
        from .explain.evidence import explain_images

        if isinstance(top_prototypes, bool) or not isinstance(top_prototypes, (int, np.integer)) or top_prototypes < 1:
            raise ProtocacheError(f"top_prototypes must be an integer >= 1, got {top_prototypes!r}")
        x, view = self.input_view(image)
        tokens, pooled = self.features(x)
        logits = self.classify(tokens, pooled).float()
        prob = torch.softmax(logits, dim=1)[0]
        pred = int(logits[0].argmax())
        target = _resolve_label(label, self.class_names)
        chosen = {"rows": np.zeros(1, np.int64), "labels": np.asarray([pred if target is None else target]),
                  "preds": np.asarray([pred]), "confidence": np.asarray([float(prob[pred])])}
        explained, _ = explain_images(self.head, _TokenRows(tokens, pooled), chosen, np.zeros(1, np.int64),
                                      top_prototypes, 1, self.device)
        boxes = self.token_boxes()
        gw = self.grid[1]
        for block in explained[0]["blocks"]:
            block["class_name"] = self.class_names[block["class"]]
            for entry in block["prototypes"]:
                entry["peak"] = divmod(entry["peak_cell"], gw)
                entry["peak_box"] = boxes[entry["peak_cell"]]
                negative = entry["negative_peak_cell"]
                entry["negative_peak_box"] = boxes[negative] if negative is not None else None
        return {"pred": pred, "pred_name": self.class_names[pred], "confidence": float(prob[pred]),
                "label": target, "logits": logits[0].cpu().numpy(), "probabilities": prob.cpu().numpy(),
                "contributions": self.head.contributions(tokens)[0].float().cpu().numpy(),
                "grid": self.grid, "input_size": self.input_size, "signed_evidence": bool(self.head.signed_evidence),
                "classes": explained[0]["blocks"], "input_view": view}


def decode_image(image) -> Any:
    """A file path or PIL image -> the 8-bit RGB image the model expects (the one decode rule, `to_rgb`)."""
    from PIL import Image

    from .datasets._common import load_image, to_rgb

    if isinstance(image, Image.Image):
        image.load()
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        return load_image({"path": str(image)})
    raise ProtocacheError(f"cannot read an image from a {type(image).__name__}; pass a file path or a PIL image")


def load_model(run: str | Path, device: str = "auto", weights: str | None = None) -> ProtoModel:
    """The run's head behind the backbone its store was extracted with, frozen and in eval mode.

    The backbone (name, weights source, preprocessing, precision) comes from the store fingerprint
    the run recorded; `weights` overrides the source (a checkpoint path, needed where the store was
    extracted from a local file). Refuses (ProtocacheError) unless the weights' SHA-256 equals the
    fingerprint's. The store itself is not opened: a run folder is enough."""
    from protocache.stores import owned

    from .backbones import Backbone, BackboneConfig
    from .runs import load_run

    run_dir = Path(run).expanduser()
    owned.restore_interrupted(run_dir)
    if not run_dir.is_dir():
        raise ProtocacheError(f"run folder {run} does not exist; pass a folder written by `protocache fit-head`")
    head, config, _ = load_run(run_dir, device="cpu")
    fingerprint = run_fingerprint(run_dir, config)
    source = str(fingerprint["weights_source"])
    spec = weights or weights_spec(source)
    if spec is None:
        raise ProtocacheError(f"the store of {run_dir} was extracted with weights from a local file ({source}); "
                              "pass that file: --weights PATH (load_model(run, weights=PATH))")
    backbone = Backbone(BackboneConfig(fingerprint["backbone"], spec, device, str(fingerprint["precision"])))
    want = str(fingerprint["weights_sha256"])
    if backbone.weights_sha256 != want:
        raise ProtocacheError(
            f"weights {backbone.weights_source} of {backbone.name} have SHA-256 {backbone.weights_sha256}, but the "
            f"store {run_dir} was fitted on was extracted with SHA-256 {want}; pass the weights the store was "
            "extracted with (--weights PATH), or re-extract the store with these weights and refit the run")
    if tuple(backbone.grid) != tuple(head.info.grid) or backbone.dim != head.info.dim:
        raise ProtocacheError(f"{backbone.name} gives {backbone.grid[0]}x{backbone.grid[1]} tokens of {backbone.dim}, "
                              f"but {run_dir} was fitted on {head.info.grid[0]}x{head.info.grid[1]} x "
                              f"{head.info.dim}; refit the run on a store of this backbone")
    return ProtoModel(backbone, head, config, run_dir).to(backbone.device)
