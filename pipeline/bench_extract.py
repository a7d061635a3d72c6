"""The extraction figures of `protocache bench`: the extraction loop against the bare forward pass, and the
whole `protocache extract` process against the loop a user would write by hand.

Both are ratios of timings taken side by side, alternating, so a load that comes and goes hits both sides.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_stages import Ratio
from .extract_loop import decode_plan

# The loop a user would write for "timm backbone -> tokens on disk": timm's model and eval transform, a
# torch DataLoader over the images, forward_features, np.save. Arguments: model name, weights file,
# output .npy, DataLoader workers, batch size, image limit (0: all). On a CPU it runs in float32, as
# written by hand; on CUDA in bf16 autocast, the usual recipe there.
NAIVE_LOOP = r'''
import sys
import numpy as np
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

name, weights, out, workers, batch_size, limit = sys.argv[1:7]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = timm.create_model(name, pretrained=False)
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval().to(device)
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))


class Digits(torch.utils.data.Dataset):  # scikit-learn's digits as dark ink on white RGB, as protocache renders them
    def __init__(self, limit):
        self.images = load_digits().images[:limit or None]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        gray = np.round(255.0 * (1.0 - self.images[i] / 16.0)).astype(np.uint8)
        return transform(Image.fromarray(gray, mode="L").convert("RGB"))


loader = torch.utils.data.DataLoader(Digits(int(limit)), batch_size=int(batch_size), num_workers=int(workers))
tokens = []
with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
    for images in loader:
        tokens.append(model.forward_features(images.to(device)).half().cpu().numpy())
np.save(out, np.concatenate(tokens))
'''


def bench_extraction(num_images: int = 512, batch_size: int = 32, backbone_name: str | None = None,
                     rounds: int = 3) -> Ratio:
    """Extraction time over bare forward time on the same images in the same batches (target <= 1.10 on a CPU).

    Bare: `Backbone.forward` on images decoded, resized and normalised beforehand, the tokens copied to the host
    in float16. Extraction: `extract_shards` does everything extract does per image (decoding, batched
    normalisation, forward, float16 shard buffers, the background write with the default compression and
    checksums, the Parquet part) into a store in the default layout, whose last shard's write is not overlapped.
    `rounds` alternating pairs; the ratio of each side's fastest run (the one least disturbed by other load).
    """
    from .backbones import DEFAULT_BACKBONE, Backbone, BackboneConfig
    from .datasets import create_dataset
    from .extract import ExtractConfig, extract_shards, prepare_store

    name = backbone_name or DEFAULT_BACKBONE
    backbone = Backbone(BackboneConfig(name, weights="auto" if name == DEFAULT_BACKBONE else "random"))
    dataset = create_dataset("digits").limit(num_images)
    transform = backbone.transform()
    images = torch.stack([transform(dataset.load_image(i).convert("RGB")) for i in range(len(dataset))])

    def bare() -> float:
        t0 = time.perf_counter()
        for b in range(0, num_images, batch_size):
            tokens, pooled, logits = backbone.forward(images[b:b + batch_size])
            tokens.half().cpu().numpy()  # (the copy to the host is part of the bare cost)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        def extraction() -> tuple[float, dict]:
            cfg = ExtractConfig(dataset="digits", backbone=name, limit=num_images, batch_size=batch_size,
                                out=str(Path(tmp) / "s.zarr"), progress=False, overwrite=True,
                                weights=backbone.config.weights)
            store, ds, bb = prepare_store(cfg, dataset=dataset, backbone=backbone)
            t0 = time.perf_counter()
            extract_shards(store, ds, bb, store.missing_shards(), cfg)
            return time.perf_counter() - t0, {"shards": store.layout.num_shards,
                                               "compression": store.layout.compression}

        bare(), extraction()  # warm-up: first-call allocations and kernel selection
        runs = [(bare(), *extraction()) for _ in range(rounds)]  # interleaved: the same load on both
    timings = [(b, e) for b, e, _ in runs]
    bare_s, extract_s = min(t[0] for t in timings), min(t[1] for t in timings)
    limit = 1.05 if backbone.device.type == "cuda" else 1.10
    ratio = extract_s / bare_s
    return Ratio("extraction / bare forward (time)", ratio, f"<= {limit}", ratio <= limit,
                 {"images": num_images, "backbone": name, "bare_images_per_s": num_images / bare_s,
                  "extract_images_per_s": num_images / extract_s, "device": str(backbone.device),
                  "precision": backbone.precision, "decode": "{} x{}".format(*decode_plan(None, backbone.device)),
                  "torch_threads": torch.get_num_threads(), **runs[0][2],
                  "rounds": [{"bare_s": b, "extract_s": e} for b, e in timings]})


def naive_workers() -> int:
    """The DataLoader workers of the hand-written loop: one per core, as the usual `num_workers=os.cpu_count()`,
    capped at 8."""
    return max(1, min(8, os.cpu_count() or 1))


def bench_extract_vs_naive(pairs: int = 3, limit: int | None = None, batch_size: int = 64) -> Ratio:
    """Wall time of the whole `protocache extract --dataset digits` process (all defaults: the default backbone
    with its shipped weights, precision auto, compression auto) over a hand-written loop, `pairs` runs of each,
    alternating (the order flips every pair); the ratio is the median of the pairs' ratios (target <= 1.0).

    The hand-written loop (`NAIVE_LOOP`, a fresh Python process too) is what a user would write with timm and
    torch alone: the same backbone weights (saved beforehand as a timm state dict, as a user's checkpoint), timm's
    eval transform, a DataLoader with one worker per core (`naive_workers`), `forward_features` in batches of 64
    (extract's default) and one `np.save` of the tokens in float16 (the store's dtype, so both write the same
    values). It runs in float32 on a CPU: bf16 autocast is not what a CPU user writes by default (and is several
    times slower than fp32 on CPUs without native bf16), while extract's `--precision auto` picks bf16 only
    where the CPU has it natively and checks the tokens against fp32; on CUDA the loop uses bf16 autocast,
    the usual recipe there. Both load Python, torch and the weights in the timed run.
    """
    from .backbones import DEFAULT_BACKBONE, create_frozen_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = naive_workers()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, _ = create_frozen_model(DEFAULT_BACKBONE, "auto")
        torch.save(model.state_dict(), tmp / "weights.pth")
        del model

        def ours(n: int | None) -> float:
            shutil.rmtree(tmp / "store.zarr", ignore_errors=True)
            args = ["--limit", str(n)] if n else []
            return _timed([sys.executable, "-m", "protocache.cli.main", "extract", "--dataset", "digits",
                           "--out", str(tmp / "store.zarr"), "--no-progress", *args])

        def naive(n: int | None) -> float:
            return _timed([sys.executable, "-c", NAIVE_LOOP, DEFAULT_BACKBONE, str(tmp / "weights.pth"),
                           str(tmp / "tokens.npy"), str(workers), str(batch_size), str(n or 0)])

        ours(16), naive(16)  # warm-up: files in the page cache, as for every later run
        timings = []
        for i in range(pairs):
            if i % 2 == 0:
                timings.append((ours(limit), naive(limit)))
            else:
                naive_s = naive(limit)
                timings.append((ours(limit), naive_s))
    ratio = statistics.median(o / n for o, n in timings)
    return Ratio("whole extract process / hand-written timm loop (time)", ratio, "<= 1.0", ratio <= 1.0,
                 {"images": limit or 1797, "pairs": [{"extract_s": o, "naive_s": n} for o, n in timings],
                  "naive_workers": workers, "naive_precision": "bf16 autocast" if device == "cuda" else "fp32",
                  "device": device})


def _timed(command: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return seconds
