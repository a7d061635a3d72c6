"""Side-by-side timings of the cache stages; every figure is a ratio measured in one run.

Kept apart from the head benchmarks so each can run alone; `pipeline.bench` prints them together.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from protocache.stores.errors import ProtocacheError

from .runtime import pinned_threads


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class Ratio:
    """One benchmark figure: a measured ratio, its target and whether the target is met."""

    name: str
    """What is compared, e.g. `extraction / bare forward (time)`."""
    value: float
    """The measured ratio."""
    target: str
    """The target it is judged against, e.g. `>= 5`, or `report` where there is none."""
    met: bool | None
    """Whether the target is met; None where it cannot be judged on this machine."""
    detail: dict[str, Any]
    """The raw timings and sizes behind the ratio."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "target": self.target, "met": self.met, **self.detail}


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _synthetic_store(path: Path, data: np.ndarray, shard_size: int, compression: str = "none"):
    """A store of `data` [N, T, D] float16 (every shard written, unless compression is none: then
    the caller writes them, timing the first) and its metadata rows."""
    from protocache.stores import FeatureStore, StoreLayout

    num_images, tokens, dim = data.shape
    layout = StoreLayout(num_images=num_images, grid=(tokens, 1), dim=dim, shard_size=shard_size, chunk_size=8,
                         compression=compression)
    store = FeatureStore.create_or_open(path, layout, {"bench": True}, {"num_classes": 10})
    rows = [{"row": i, "image_id": str(i), "path": "", "label": i % 10, "class_name": str(i % 10),
             "split": "train", "width": 1, "height": 1} for i in range(num_images)]
    if compression != "none":
        for s in range(layout.num_shards):
            start, stop = layout.shard_bounds(s)
            store.write_shard(s, {"clean": {"tokens": data[start:stop], "pooled": data[start:stop, 0]}},
                              rows[start:stop])
    return store, rows


def _relu6_tokens(num_images: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """float16 tokens shaped like a ReLU6 CNN's (lite0's are ~91 % exact zeros): a shifted Gaussian
    clipped to [0, 6], 90 % zeros (made 64 images at a time, so the float32 draw stays small)."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_images, tokens, dim), dtype=np.float16)
    for b in range(0, num_images, 64):
        draw = rng.standard_normal((min(64, num_images - b), tokens, dim), dtype=np.float32)
        out[b:b + 64] = np.clip(draw - 1.2816, 0, 6)  # P(z > 1.2816) = 0.10
    return out


def _sequential_read(store) -> int:
    """Read every tokens shard file of `store` front to back in 8 MB blocks (what `cat` does); the bytes read."""
    buf, total = bytearray(8 * 2**20), 0
    for path in sorted(Path(store.root, "tokens", "c").rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


def bench_store_io(num_images: int = 2048, tokens: int = 49, dim: int = 1280, shard_size: int = 128,
                   batch_size: int = 256, repeats: int = 3, shards_in_memory: int = 2) -> list[Ratio]:
    """Shard write time over numpy.save of the same bytes; one shuffled epoch through the batch
    iterator over the same epoch from arrays in RAM; a zstd-compressed store's epoch over the raw
    store's (all from the page cache), beside a plain sequential read of the same shard files.

    The tokens are ReLU6-like (90 % zeros, as lite0's). Each epoch reads several windows of
    `shards_in_memory` shards, so it measures streaming, not just the first window (read before
    the first batch, with nothing to overlap it: `first_batch_s`)."""
    data = _relu6_tokens(num_images, tokens, dim)
    labels = np.arange(num_images) % 10
    with tempfile.TemporaryDirectory() as tmp:
        store, rows = _synthetic_store(Path(tmp) / "raw.zarr", data, shard_size)
        shard = data[:shard_size]

        def write_store():
            store.write_shard(0, {"clean": {"tokens": shard, "pooled": shard[:, 0]}}, rows[:shard_size])

        def write_npy():
            np.save(Path(tmp) / "shard.npy", shard)
            np.save(Path(tmp) / "pooled.npy", shard[:, 0])

        write_store()
        write_npy()
        store_w, npy_w = _best_of(write_store, repeats), _best_of(write_npy, repeats)
        for s in range(1, store.layout.num_shards):
            start, stop = store.layout.shard_bounds(s)
            store.write_shard(s, {"clean": {"tokens": data[start:stop], "pooled": data[start:stop, 0]}},
                              rows[start:stop])
        zstd, _ = _synthetic_store(Path(tmp) / "zstd.zarr", data, shard_size, compression="zstd:1")
        first_batch = []

        def epoch(source):
            def run():
                t0 = time.perf_counter()
                for batch in source.iter_batches("train", batch_size, fields=("tokens", "label"), shuffle=True,
                                                 seed=0, shards_in_memory=shards_in_memory):
                    if t0 is not None:
                        first_batch.append(time.perf_counter() - t0)
                        t0 = None
                    batch["tokens"].astype(np.float32)
            return run

        def epoch_ram():  # the same shuffled epoch from arrays already in memory
            order = np.random.default_rng(0).permutation(num_images)
            for b in range(0, num_images, batch_size):
                idx = order[b:b + batch_size]
                data[idx].astype(np.float32), labels[idx]

        runs = {"store": epoch(store), "zstd": epoch(zstd), "ram": epoch_ram,
                "cat": lambda: _sequential_read(store), "cat_zstd": lambda: _sequential_read(zstd)}
        best = {name: float("inf") for name in runs}
        for rep in range(repeats + 1):  # round-robin, so a busy moment hits every variant alike; the first is warm-up
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    best[name] = min(best[name], time.perf_counter() - t0)
        raw_files, zstd_files = _sequential_read(store), _sequential_read(zstd)
        windows = -(-store.layout.num_shards // shards_in_memory)
    mb = shard.nbytes / 2**20
    epoch_mb = data.nbytes / 2**20
    write = Ratio("store shard write / numpy.save (time)", store_w / npy_w, "report", None,
                  {"shard_mb": mb, "store_mb_per_s": mb / store_w, "numpy_mb_per_s": mb / npy_w})
    read_ratio = best["ram"] / best["store"]
    read = Ratio("store epoch read / RAM epoch (throughput)", read_ratio, ">= 0.9", read_ratio >= 0.9,
                 {"epoch_mb": epoch_mb, "windows": windows, "store_mb_per_s": epoch_mb / best["store"],
                  "ram_mb_per_s": epoch_mb / best["ram"], "sequential_read_mb_per_s": raw_files / 2**20 / best["cat"],
                  "first_batch_s": min(first_batch[0::2])})
    zstd_ratio = best["store"] / best["zstd"]
    compressed = Ratio("zstd store epoch / raw store epoch (throughput)", zstd_ratio, ">= 0.8", zstd_ratio >= 0.8,
                       {"zstd_mb_per_s": epoch_mb / best["zstd"], "raw_mb_per_s": epoch_mb / best["store"],
                        "zstd_files_over_raw": zstd_files / raw_files,
                        "zstd_sequential_read_mb_per_s": zstd_files / 2**20 / best["cat_zstd"],
                        "zstd_first_batch_s": min(first_batch[1::2])})
    return [write, read, compressed]


def bench_kmeans(num_points: int = 20_000, dim: int = 256, num_codes: int = 64, iters: int = 10,
                 repeats: int = 1) -> Ratio:
    """FAISS k-means over scikit-learn's KMeans: same sample, k, iteration count (one init each)."""
    from .codebook import faiss_available

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((num_codes, dim)).astype(np.float32)
    points = (centers[rng.integers(0, num_codes, num_points)]
              + 0.5 * rng.standard_normal((num_points, dim))).astype(np.float32)
    if not faiss_available():
        return Ratio("k-means: scikit-learn time / FAISS time", float("nan"), ">= 5", None,
                     {"note": "faiss is not installed"})
    import faiss
    from sklearn.cluster import KMeans

    def run_faiss():
        # The same work as codebook.kmeans: one init, `iters` Lloyd iterations over every point.
        km = faiss.Kmeans(dim, num_codes, niter=iters, seed=0, max_points_per_centroid=num_points)
        km.train(points)

    def run_sklearn():  # tol=0: exactly `iters` iterations, as FAISS does
        KMeans(n_clusters=num_codes, n_init=1, max_iter=iters, tol=0, random_state=0).fit(points)

    faiss_s, sk_s = _best_of(run_faiss, repeats), _best_of(run_sklearn, repeats)
    ratio = sk_s / faiss_s
    return Ratio("k-means: scikit-learn time / FAISS time", ratio, ">= 5", ratio >= 5,
                 {"points": num_points, "dim": dim, "k": num_codes, "iters": iters,
                  "faiss_s": faiss_s, "sklearn_s": sk_s, "gpu": faiss.get_num_gpus() > 0})


def _digits_store(tmp: Path, num_images: int, backbone: str | None = None) -> Path:
    from .backbones import DEFAULT_BACKBONE
    from .extract import ExtractConfig, run_extract

    out = tmp / "digits.zarr"
    run_extract(ExtractConfig(dataset="digits", backbone=backbone or DEFAULT_BACKBONE, limit=num_images,
                              out=str(out), progress=False, shard_size=max(8, num_images // 4 // 8 * 8)))
    return out


def bench_compression(num_images: int = 64) -> Ratio:
    """Bytes on disk over raw float16 bytes of a digits store extracted with `--compression auto`."""
    from protocache.stores import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        info = FeatureStore.open(_digits_store(Path(tmp), num_images)).info()
    ratio = info["stored_over_raw"]
    return Ratio("digits store: bytes on disk / raw bytes (auto)", ratio, "<= 0.2", ratio <= 0.2,
                 {"images": num_images, "compression": info["compression"], "bytes_on_disk": info["bytes_on_disk"],
                  "raw_bytes": info["raw_bytes"], "probe_ratio": (info["compression_choice"] or {}).get("probe_ratio")})


def bench_cache_vs_backbone(num_images: int = 512, batch_size: int | None = None, head: str = "protoquant",
                            repeats: int = 3) -> Ratio:
    """One training epoch of a head on cached tokens over the same epoch with the backbone in the loop.

    Both loops train one head (one init, one Adam) with the same batch size (None: the head's own for
    this store, 32 for ProtoQuant on 512 digits) over the same images on the backbone's device; only
    the token source differs, and both are warmed up before timing. The cache is the store `extract`
    writes (its default codec). The detail splits the cache epoch: `read_epoch_s` is the batch
    iterator alone (float16 -> float32 and the copy to the device included), `head_steps_s` the same
    steps on those tokens already on the device, so `bound` (backbone epoch / head steps) is the ratio
    a free read would give: past it only a cheaper head step helps.
    """
    import torch.nn.functional as F

    from .backbones import DEFAULT_BACKBONE, Backbone, BackboneConfig
    from .datasets import create_dataset
    from .heads import create_head, store_info
    from protocache.stores import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.open(_digits_store(Path(tmp), num_images))
        backbone = Backbone(BackboneConfig(DEFAULT_BACKBONE))
        device = backbone.device
        dataset = create_dataset("digits").limit(num_images)
        transform = backbone.transform()
        images = torch.stack([transform(dataset.load_image(i).convert("RGB")) for i in range(num_images)])
        labels = torch.as_tensor([r["label"] for r in dataset.records]).to(device)
        torch.manual_seed(0)
        model = create_head(head, store_info(store)).to(device)  # both loops train on the backbone's device
        bs = batch_size or getattr(model.config, "batch_size", None) or 32
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def synced(fn):  # CUDA runs ahead of Python: an epoch ends when its last step has
            def run():
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return run

        def step(tokens, y):
            loss = F.cross_entropy(model(tokens), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def cached_batches():
            for b in store.iter_batches(None, bs, fields=("tokens", "label"), shuffle=True, seed=0):
                yield torch.from_numpy(b["tokens"]).to(device).float(), torch.from_numpy(b["label"]).to(device)

        @synced
        def cache_epoch():
            for tokens, y in cached_batches():
                step(tokens, y)

        @synced
        def read_epoch():
            for _ in cached_batches():
                pass

        in_memory = list(cached_batches())

        @synced
        def steps_epoch():
            for tokens, y in in_memory:
                step(tokens, y)

        @synced
        def backbone_epoch():
            order = np.random.default_rng(0).permutation(num_images)
            for i in range(0, num_images, bs):
                idx = torch.from_numpy(order[i:i + bs])
                tokens, _, _ = backbone.forward(images[idx])  # (on the backbone's device)
                step(tokens.half().float(), labels[idx])

        backbone.forward(images[:bs])  # warm-up: first-call allocations and kernel choices, as the cache loop gets
        cache_epoch()
        cache_s = _best_of(cache_epoch, repeats)
        read_s = _best_of(read_epoch, repeats)
        steps_s = _best_of(steps_epoch, repeats)
        backbone_s = _best_of(backbone_epoch, 1)
        compression = store.layout.compression
    ratio = backbone_s / cache_s
    per_image = {"backbone_epoch_ms_per_image": 1e3 * backbone_s / num_images,
                 "cache_epoch_ms_per_image": 1e3 * cache_s / num_images,
                 "head_step_ms_per_image": 1e3 * steps_s / num_images,
                 "read_ms_per_image": 1e3 * read_s / num_images}
    return Ratio(f"{head} epoch: backbone in the loop / on the cache (time)", ratio, ">= 50", ratio >= 50,
                 {"images": num_images, "batch_size": bs, "device": str(device), "store_compression": compression,
                  "cache_epoch_s": cache_s, "backbone_epoch_s": backbone_s, "read_epoch_s": read_s,
                  "head_steps_s": steps_s, "bound": backbone_s / steps_s, **per_image})


def _random_store(path: Path, num_images: int, tokens: int = 49, dim: int = 256, shard_size: int = 256,
                  num_classes: int = 10) -> Path:
    """A complete store of random tokens whose class shifts a few channels (learnable, cheap to build)."""
    from protocache.stores import FeatureStore, StoreLayout

    layout = StoreLayout(num_images=num_images, grid=(7, tokens // 7), dim=dim, shard_size=shard_size, chunk_size=8)
    store = FeatureStore.create_or_open(path, layout, {"bench": "random", "n": num_images},
                                        {"num_classes": num_classes, "class_names": [str(c) for c in range(num_classes)],
                                         "pooled": "mean", "input_size": [3, 224, 224], "part_names": []})
    rng = np.random.default_rng(0)
    for s in range(layout.num_shards):
        start, stop = layout.shard_bounds(s)
        labels = np.arange(start, stop) % num_classes
        x = rng.standard_normal((stop - start, layout.num_tokens, dim)).astype(np.float32)
        x[np.arange(stop - start), :, labels] += 2.0
        rows = [{"row": i, "image_id": str(i), "path": "", "label": int(i % num_classes),
                 "class_name": str(i % num_classes), "split": "test" if i % 5 == 0 else "train",
                 "width": 1, "height": 1} for i in range(start, stop)]
        store.write_shard(s, {"clean": {"tokens": x, "pooled": x.mean(1)}}, rows)
    return path


def bench_fit_memory(base_images: int = 1024, head: str = "infodisent", epochs: int = 1) -> Ratio:
    """Peak RSS of `protocache fit-head` on a store 4x the size over the 1x store (flat = 1)."""
    import subprocess
    import sys

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 4):
            store = _random_store(Path(tmp) / f"s{factor}.zarr", base_images * factor)
            code = ("import resource, sys; from protocache.pipeline.fit import fit_head, FitConfig; "
                    f"fit_head({head!r}, {str(store)!r}, {str(Path(tmp) / f'run{factor}')!r}, "
                    f"{{'epochs': {epochs}}}, FitConfig(progress=False, shards_in_memory=1)); "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peaks[factor] = int(out.stdout.strip().splitlines()[-1]) / 1024  # MiB
    ratio = peaks[4] / peaks[1]
    return Ratio(f"fit-head {head} peak RSS: 4x store / 1x store", ratio, "<= 1.1 (flat)", ratio <= 1.1,
                 {"peak_mib_1x": peaks[1], "peak_mib_4x": peaks[4], "images_1x": base_images})


def _bench_ablation(**kwargs) -> list[Ratio]:
    from .bench_ablation import bench_ablation  # (it imports this module)

    return bench_ablation(**kwargs)


def _steps(quick: bool) -> list[tuple[str, Callable[[], list[Ratio]]]]:
    """The benchmark's parts in the order they run, each a name `--only` takes and a function giving its ratios."""
    from .bench_extract import bench_extract_vs_naive, bench_extraction
    from .bench_predict import bench_predict

    return [
        ("extraction", lambda: [bench_extraction(num_images=512 if quick else 1024)]),  # bench_extract.py
        ("extract-process", lambda: [bench_extract_vs_naive(pairs=3)]),  # the whole digits set, both runs
        ("store", lambda: bench_store_io(num_images=1024 if quick else 4096)),
        ("compression", lambda: [bench_compression(num_images=64 if quick else 256)]),
        ("kmeans", lambda: [bench_kmeans(num_points=10_000 if quick else 50_000)]),
        ("cache", lambda: [bench_cache_vs_backbone(num_images=512 if quick else 1536)]),
        ("ablation", lambda: _bench_ablation(num_heads=8, num_images=512 if quick else 4096)),  # bench_ablation.py
        ("memory", lambda: [bench_fit_memory(base_images=384 if quick else 2048)]),
        ("predict", lambda: [bench_predict(num_images=64 if quick else 256)]),
    ]


def run_all(quick: bool = False, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Every stage ratio, measured side by side on this machine. quick: smaller inputs (< 15 min on 2 CPU cores);
    only: the names of the parts to run (see `_steps`), all by default."""
    steps = _steps(quick)
    names = [name for name, _ in steps]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ProtocacheError(f"bench: unknown part(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    machine = machine_info()
    started = time.perf_counter()
    ratios: list[Ratio] = []
    for name, fn in steps:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        with pinned_threads(None):  # a part that pins torch's threads does not pin the next parts'
            for r in fn():
                r.detail["bench_seconds"] = time.perf_counter() - t0
                ratios.append(r)
    return {"machine": machine, "quick": quick, "only": list(only) if only else None,
            "seconds": time.perf_counter() - started, "ratios": [r.as_dict() for r in ratios]}


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
             f"GPU {m['gpu'] or 'none'}, torch {m['torch']}",
             f"{'figure':<58} {'ratio':>8} {'target':>14}  status"]
    lines.append("-" * len(lines[-1]))
    for r in report["ratios"]:
        status = {True: "met", False: "NOT MET", None: "(reported)"}[r["met"]]
        lines.append(f"{r['name']:<58} {r['value']:>8.2f} {r['target']:>14}  {status}")
    lines.append(f"({'quick' if report['quick'] else 'full'} run, {report['seconds']:.0f}s)")
    return "\n".join(lines)
