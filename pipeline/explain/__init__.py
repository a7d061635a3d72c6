"""Explain stage: a static HTML report of a fitted head ("this looks like that"), built from the cache.

The report (``DIR/index.html`` plus PNG files under ``DIR/img/``, relative links, no
server, no network) has two parts:

1. A prototype gallery: every prototype the head uses (the union of its classes'
   prototypes after the head's own pruning), ordered by importance (mean absolute
   contribution to the true class's logit over the training split), each with exactly
   the images and patches its purity is scored on (PIP-Net's protocol: the 10 training
   images of highest presence, the 32-px patch at each one's peak) cut from the original
   images, shown plain and with the prototype's activation overlaid, its purity, its
   classes and last-layer weights.
2. A seeded choice of images of one split (mixing correct and wrong predictions): the
   prediction against the true class and, for the predicted class (and, when wrong, the
   true class), the prototypes that contribute most to its logit: where each fires on
   the image (translucent heat map on the model-input view, peak box), the training
   patches it stands for, and its contribution (positive and negative evidence where the
   head declares ``signed_evidence``, as InfoDisent does).

The backbone is never run. Images are reloaded from the store's own metadata records
with the dataset layout's per-record loader (no dataset listing); the *model-input view*
of an image is the record's ``crop_box`` crop followed by the store's resize rule (straight
to the square input for box crops, timm's evaluation resize + center crop otherwise; the
store's preprocessing config) without normalisation, so the store's token boxes line up
with its pixels. Similarity maps are upsampled bilinearly with cell
centres on the token boxes' centres (PIL's convention, the same as ``align_corners=False``).

Modules: ``config`` (ExplainConfig, ExplainResult), ``images`` (the image source),
``drawing`` (colour maps, overlay, boxes, colour scales), ``evidence`` (predictions,
choice of images, training scan, used prototypes), ``report`` (orchestration and the
folder) and ``report.html.j2`` (the page, rendered with autoescape). ``predict_page`` draws
``predict --explain``'s page of new images with the same pieces (``predict.html.j2``); both
pages extend ``base.html.j2`` and draw with ``macros.html.j2``.
"""

from __future__ import annotations

from .config import IMAGE_DIR, REPORT_MARKER, ExplainConfig, ExplainResult
from .drawing import colorize, css_gradient, draw_box, overlay, patch_window, upsample
from .evidence import TopImages, choose_images, explain_images, kept_scan_training, predict_split, scan_training, \
    used_prototypes
from .images import ImageSource, model_input_view, reroot
from .report import explain, explain_run, prepare_out, render_html

__all__ = [
    "ExplainConfig", "ExplainResult", "REPORT_MARKER", "IMAGE_DIR", "explain_run", "explain", "render_html",
    "prepare_out", "ImageSource", "model_input_view", "reroot", "choose_images", "predict_split", "scan_training",
    "kept_scan_training", "used_prototypes", "explain_images", "TopImages", "colorize", "overlay", "draw_box",
    "patch_window", "upsample", "css_gradient",
]
