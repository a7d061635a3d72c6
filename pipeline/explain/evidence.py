"""Evidence: predictions over a split, the choice of explained images, what each chosen image's
logits are made of, the scan of training patches, and the prototypes a head uses.

Everything reads the cache (tokens) and the head; nothing here draws. The one file written is the
training scan kept in the run folder (`kept_scan_training`), reused while its inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocache.pipeline import metrics as M
from protocache.pipeline.evaluate import head_fields, head_logits
from protocache.stores import FeatureStore, runs
from protocache.stores.errors import ProtocacheError
from protocache.stores.keyed_arrays import load_keyed, save_keyed

TopImages = M.TopImages  # the one implementation purity uses


def as_tensor(batch_tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch_tokens)).float().to(device)


def similarity_maps(head, tokens: torch.Tensor) -> np.ndarray:
    """[B, P, H, W] float32 similarity maps."""
    return head.similarity_map(tokens).float().cpu().numpy()


@torch.inference_mode()
def predict_split(head, store: FeatureStore, split: str, batch_size: int, device: torch.device
                  ) -> dict[str, np.ndarray]:
    """rows, labels, predictions and softmax confidence of every usable image of a split."""
    rows, labels, preds, conf = [], [], [], []
    for batch in store.iter_batches(split, batch_size, fields=head_fields(head), prefetch=False):
        logits = head_logits(head, batch, as_tensor(batch["tokens"], device), device).float()
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
def explain_images(head, store: FeatureStore, pred: dict[str, np.ndarray], chosen: np.ndarray, top_prototypes: int,
                   batch_size: int, device: torch.device) -> tuple[list[dict[str, Any]], set[int]]:
    """What the logits of the chosen images are made of; and the prototypes shown for them.

    Per chosen image: one block for the predicted class (and one for the true class when
    they differ) listing the `top_prototypes` prototypes with the largest |contribution|
    to that logit (ties by prototype), each with its positive and negative evidence, its
    presence and weight, its peak cell (and strongest negative cell) and its similarity
    map (``"map"``, [H, W], for drawing; not part of the report's JSON).
    """
    weights = head.class_weights().float().cpu().numpy()  # [C, P]
    explained: list[dict[str, Any]] = []
    needed: set[int] = set()
    for lo in range(0, len(chosen), batch_size):
        idx = chosen[lo:lo + batch_size]
        rows = pred["rows"][idx]
        order = np.argsort(rows)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        back = torch.from_numpy(inv).to(device)
        tokens = as_tensor(store.read_rows("tokens", rows[order]), device)[back]
        pooled = (as_tensor(store.read_rows("pooled", rows[order]), device)[back] if "pooled" in head.inputs
                  else None)
        logits = head(tokens if "tokens" in head.inputs else None, pooled=pooled).float().cpu().numpy()
        evidence = {k: v.float().cpu().numpy() for k, v in head.evidence(tokens).items()}
        presence = head.presence(tokens).float().cpu().numpy()
        maps = similarity_maps(head, tokens)
        for j, i in enumerate(idx):
            label, p_cls = int(pred["labels"][i]), int(pred["preds"][i])
            classes = [p_cls] if label == p_cls else [p_cls, label]
            blocks = []
            for c in classes:
                pos, neg = evidence["positive"][j, c], evidence["negative"][j, c]
                net = pos - neg
                candidates = np.flatnonzero((pos != 0) | (neg != 0))
                ranked = candidates[np.lexsort((candidates, -np.abs(net[candidates])))][:top_prototypes]
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
    return explained, needed


@torch.inference_mode()
def scan_training(head, store: FeatureStore, split: str, k: int, batch_size: int, device: torch.device
                  ) -> tuple[TopImages, np.ndarray, int]:
    """One pass over a split: each prototype's top-k images, ranked and placed as purity does, and its importance.

    The top images are exactly the ones PIP-Net purity scores (`metrics.TopImages` over
    `head.presence`, each with its `metrics.pipnet_peak_cells` peak), so with k = purity's top-k
    the gallery shows what `evaluate --split <split>` scored. Importance of prototype p is the
    mean over the split of |presence_p * w_{y,p}|, its share of the true class's logit.
    """
    weights = head.class_weights().float()
    top: TopImages | None = None
    importance = None
    n = 0
    for batch in store.iter_batches(split, batch_size, fields=("tokens", "label", "row"), prefetch=False):
        tokens = as_tensor(batch["tokens"], device)
        presence = head.presence(tokens).float()
        if top is None:
            top = TopImages(presence.shape[1], k)
            importance = np.zeros(presence.shape[1], dtype=np.float64)
        cells = M.pipnet_peak_cells(head.similarity_map(tokens).float())
        top.update(presence.cpu().numpy(), cells, np.asarray(batch["row"], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)).to(device)
        importance += (presence * weights[labels]).abs().sum(0).double().cpu().numpy()
        n += len(labels)
    if top is None:
        raise ProtocacheError(f"split {split!r} of {store.path} has no usable images: the gallery needs "
                              "training images (choose another with --train-split)")
    return top, importance / max(n, 1), n


def kept_scan_training(head, store: FeatureStore, split: str, k: int, batch_size: int, device: torch.device,
                       run_dir: str | Path) -> tuple[TopImages, np.ndarray, int]:
    """`scan_training`, kept in RUN/scan-<split>-k<k>.npz: the scan reads the whole split (hours on ImageNet),
    while explaining a few new images needs only its result. Reused while the head's weights, the store's
    fingerprint, the split's rows and labels, k and the device type are the same (else scanned again and kept)."""
    rows = np.ascontiguousarray(store.split_rows(split), dtype=np.int64)
    labels = np.ascontiguousarray(np.asarray(store.labels())[rows], dtype=np.int64)
    key = {"format": 1, "split": split, "k": int(k), "device": torch.device(device).type,
           "weights_sha256": hashlib.sha256((Path(run_dir) / runs.WEIGHTS).read_bytes()).hexdigest(),
           "store_sha256": hashlib.sha256(json.dumps(store.fingerprint, sort_keys=True).encode()).hexdigest(),
           "rows_sha256": hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest()}
    path = Path(run_dir) / f"scan-{split}-k{int(k)}.npz"
    kept = load_keyed(path, key)
    if kept is not None and _sound_scan(kept, head.prototype_count, int(k), rows, store.layout.num_tokens):
        top = TopImages(kept["values"].shape[0], int(k))
        top.values, top.rows, top.cells = kept["values"], kept["rows"], kept["cells"]
        return top, kept["importance"], int(kept["count"])
    top, importance, n = scan_training(head, store, split, k, batch_size, device)
    save_keyed(path, key, {"values": top.values, "rows": top.rows, "cells": top.cells, "importance": importance,
                           "count": np.asarray(n)})
    return top, importance, n


def _sound_scan(kept: dict[str, np.ndarray], prototypes: int, k: int, rows: np.ndarray, cells: int) -> bool:
    """Whether a kept scan holds what a scan of these rows gives (a file edited under its key is scanned again)."""
    if not {"values", "rows", "cells", "importance", "count"} <= kept.keys():
        return False
    shape = (prototypes, min(k, len(rows)))
    return (kept["values"].shape == kept["rows"].shape == kept["cells"].shape == shape
            and kept["importance"].shape == (prototypes,) and bool(np.isin(kept["rows"], rows).all())
            and bool(((kept["cells"] >= 0) & (kept["cells"] < cells)).all()))


def used_prototypes(head, num_classes: int) -> tuple[list[int], dict[int, list[int]]]:
    """(sorted prototypes any class uses, class -> its prototypes), from head.class_prototypes."""
    per_class = {c: [int(p) for p in head.class_prototypes(c)] for c in range(num_classes)}
    used = sorted({p for ps in per_class.values() for p in ps})
    return used, per_class
