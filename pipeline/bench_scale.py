"""`protocache bench --scale N`: a store of N images of realistic tokens, streamed cold.

The store is written through the real writer (`FeatureStore.write_shard`, the codec chosen as
`extract --compression` would choose it), its files are flushed and dropped from the page cache
(`posix_fadvise(DONTNEED)` after `fsync`, which needs no root), and one shuffled epoch is streamed
from it in a fresh process, so the epoch's peak RSS is its own: the batch iterator alone (what the
store delivers), then the same iterator feeding ProtoQuant training steps. Beside it: the disk's
own sequential read rate of the same shard files, read cold the same way (like `cat`).

Tokens are drawn, not extracted, so N can be ImageNet-sized without running a backbone:
- sparse: like tf_efficientnet_lite0's 7 x 7 x 1280 ReLU6 maps: ~91 % exact zeros (natural photos;
  13 % of the channels never fire, the rest with log-normal rates), non-zeros Exp(mean 1.45) capped
  at 6; zstd:1 packs them ~7x, as it packs the tokens of real photos;
- dense: like a ViT-B/16's 197 x 768 outputs: 196 patch tokens (the store drops the CLS token from
  the tokens and keeps it as `pooled`), normal values with log-normal channel scales and two
  outlier channels; zstd barely packs them (~1.08x).
Token rows come from a pool of distinct drawn rows (2^16 / 2^17) in permuted order, so no
compressed chunk (8 images) repeats a row while writing stays far faster than the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocache.stores.errors import ProtocacheError

from .bench_disk import (MB, drop_page_cache, memory_total, resident_fraction, sequential_read, status_kib, store_files,
                         token_shard_files)

IMAGENET_TRAIN = 1_281_167
"""Images of ImageNet-1k's train split: what the extrapolation scales to."""
NUM_CLASSES = 10  # labels of the drawn images (ProtoQuant's codebook follows: 137 codes)
NUM_LOGITS = 1000  # both reference backbones are ImageNet classifiers: their logits are cached too


@dataclass(frozen=True)
class TokenKind:
    """The token shape of a reference backbone, how its pooled vector is made, and its pool of drawn rows."""

    grid: tuple[int, int]
    dim: int
    like: str
    pooled: str
    pool_rows: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


TOKEN_KINDS = {
    "sparse": TokenKind((7, 7), 1280, "tf_efficientnet_lite0 (49 x 1280 ReLU6 tokens)", "mean", 2**16),
    "dense": TokenKind((14, 14), 768, "ViT-B/16 (196 patch tokens + CLS as pooled, 197 x 768)", "cls", 2**17),
}


@dataclass
class ScaleBenchConfig:
    """The scale benchmark: write N images of drawn tokens, stream one epoch cold."""

    scale: int
    """Images in the store (N): --scale 49920 is a 6 GB lite0-sized store."""
    tokens: str = "sparse"
    """sparse (lite0-like ReLU6 tokens, ~91% zeros) | dense (ViT-B/16-like) | sparse,dense (one store each)."""
    compression: str = "none,auto"
    """Comma-separated codecs, one store each, resolved as `extract --compression` resolves them
    (auto: zstd:1 when 64 drawn images' tokens pack >= 1.3x, else none; a codec met twice runs once)."""
    batch_size: int = 256
    """Images per batch of the epoch."""
    head: bool = True
    """Also stream a cold epoch of ProtoQuant training steps (the batch iterator feeding the head)."""
    dir: str | None = None
    """Folder the stores are written in (and removed from); None: the system's temporary folder. Use
    a folder on the disk to measure (on tmpfs the page cache cannot be dropped: the report says so)."""
    seed: int = 0
    """Seed of the drawn tokens and of the epoch's shuffle."""

    def kinds(self) -> list[str]:
        names = [t.strip() for t in str(self.tokens).split(",") if t.strip()]
        bad = [t for t in names if t not in TOKEN_KINDS]
        if bad or not names:
            raise ProtocacheError(f"bench: --tokens {self.tokens!r}: use sparse, dense or sparse,dense")
        return list(dict.fromkeys(names))

    def codecs(self) -> list[str]:
        from protocache.stores.layout import parse_compression

        names = [c.strip() for c in str(self.compression).split(",") if c.strip()]
        if not names:
            raise ProtocacheError("bench: --compression is empty; e.g. --compression none,auto")
        return list(dict.fromkeys(parse_compression(c, what="bench") for c in names))

    def validate(self) -> None:
        from .config import check_values

        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ProtocacheError(f"bench: --scale must be an integer >= 1, got {self.scale!r}; e.g. --scale 49920 "
                                  "(a 6 GB store of lite0-sized tokens)")
        check_values(self, "bench", flags=True)  # the ranges of pipeline/config.py's VALUE_RULES
        self.kinds(), self.codecs()
        if self.dir is not None and not Path(self.dir).is_dir():
            raise ProtocacheError(f"bench: --dir {self.dir} is not a folder; create it or choose another")


# ----------------------------------------------------------------------------- drawn tokens


def token_pool(kind: TokenKind, rows: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` distinct float16 token rows [rows, D] with the statistics of `kind`."""
    d = kind.dim
    out = np.empty((rows, d), dtype=np.float16)
    step = 4096
    if kind.pooled == "mean":  # ReLU6 maps: per-channel firing rates, per-token activity
        rate = np.exp(rng.normal(np.log(0.02), 2.0, d)).astype(np.float32)
        rate[rng.random(d) < 0.13] = 0
        for r in range(0, rows, step):
            n = min(step, rows - r)
            prob = rate[None, :] * np.exp(rng.normal(0, 0.6, (n, 1))).astype(np.float32)
            for _ in range(4):  # ~91 % zeros: rescale, cap, rescale what the cap took
                prob *= 0.09 / max(float(prob.mean()), 1e-12)
                np.minimum(prob, 0.99, out=prob)
            u = rng.random((n, d), dtype=np.float32)
            fire = u < prob
            # u / prob is uniform where a channel fires: an exponential of mean 1.45, capped at ReLU6's 6
            value = np.minimum(-1.45 * np.log1p(-u[fire] / prob[fire]), 6.0)
            block = np.zeros((n, d), dtype=np.float16)
            block[fire] = value
            out[r:r + n] = block
    else:  # ViT outputs: dense, channel scales spread, two outlier channels
        scale = np.exp(rng.normal(0, 0.5, d)).astype(np.float32)
        scale[rng.choice(d, 2, replace=False)] *= 30
        for r in range(0, rows, step):
            n = min(step, rows - r)
            out[r:r + n] = rng.standard_normal((n, d), dtype=np.float32) * scale
    return out


class TokenSource:
    """Images of drawn tokens: pool rows in a running permutation (no row repeats within a chunk)."""

    def __init__(self, kind: TokenKind, num_images: int, seed: int):
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.pool = token_pool(kind, min(kind.pool_rows, num_images * kind.num_tokens), self.rng)
        self.order = np.zeros(0, dtype=np.int64)

    def images(self, n: int) -> dict[str, np.ndarray]:
        need = n * self.kind.num_tokens
        while len(self.order) < need:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.pool))])
        rows, self.order = self.order[:need], self.order[need:]
        tokens = self.pool[rows].reshape(n, self.kind.num_tokens, self.kind.dim)
        pooled = (tokens.mean(axis=1, dtype=np.float32) if self.kind.pooled == "mean"
                  else self.rng.standard_normal((n, self.kind.dim), dtype=np.float32))
        logits = self.rng.standard_normal((n, NUM_LOGITS), dtype=np.float32) * 3
        return {"tokens": tokens, "pooled": pooled.astype(np.float16), "logits": logits.astype(np.float16)}


def resolve_codec(kind: TokenKind, codec: str, seed: int) -> dict:
    """The codec `extract --compression codec` would give these tokens (auto: probed on 64 drawn images)."""
    from protocache.stores.layout import choose_compression

    probe = TokenSource(kind, 64, seed + 1).images(64)["tokens"] if codec == "auto" else None
    return choose_compression(codec, probe_tokens=probe)


def write_store(path: Path, kind: TokenKind, num_images: int, codec: str, seed: int) -> tuple[Any, float]:
    """Write the store through FeatureStore.write_shard with a resolved codec; returns (store, seconds)."""
    import pyarrow as pa

    from protocache.stores import FeatureStore, StoreLayout, default_shard_size
    from protocache.stores.metadata import BASE_SCHEMA

    source = TokenSource(kind, num_images, seed)
    shard_size = min(default_shard_size(kind.num_tokens, kind.dim), -(-num_images // 8) * 8)
    layout = StoreLayout(num_images=num_images, grid=kind.grid, dim=kind.dim, num_logits=NUM_LOGITS,
                         shard_size=shard_size, compression=codec)
    names = [str(c) for c in range(NUM_CLASSES)]
    store = FeatureStore.create_or_open(path, layout, {"bench": "scale", "tokens": kind.like, "n": num_images},
                                        {"num_classes": NUM_CLASSES, "class_names": names, "pooled": kind.pooled,
                                         "input_size": [3, 224, 224], "part_names": []})
    seconds = 0.0
    for shard in range(layout.num_shards):
        start, stop = layout.shard_bounds(shard)
        arrays = source.images(stop - start)
        row = np.arange(start, stop, dtype=np.int64)
        label = row % NUM_CLASSES
        table = pa.Table.from_arrays(
            [pa.array(row), pa.array(row.astype(str)), pa.array([""] * len(row)), pa.array(label),
             pa.array(label.astype(str)), pa.array(["train"] * len(row)), pa.array(np.full(len(row), 224)),
             pa.array(np.full(len(row), 224))], schema=BASE_SCHEMA)
        t0 = time.perf_counter()  # drawing the tokens is not the writer's time
        store.write_shard(shard, {"clean": arrays}, table)
        seconds += time.perf_counter() - t0
    return store, seconds


# ----------------------------------------------------------------------------- the epoch (own process)


def protoquant_step(dim: int, grid: tuple[int, int], seed: int):
    """One ProtoQuant training step per batch (cross-entropy of its logits, Adam), on the CPU: the step
    `bench_stages.bench_cache_vs_backbone` times."""
    import torch
    import torch.nn.functional as F

    from .heads import create_head

    torch.manual_seed(seed)
    model = create_head("protoquant", dim=dim, grid=grid, num_classes=NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: dict[str, np.ndarray]) -> None:
        loss = F.cross_entropy(model(torch.from_numpy(batch["tokens"]).float()), torch.from_numpy(batch["label"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _epoch_child(spec_json: str) -> None:
    """Run in a fresh process: the epochs of `spec` over one store; prints one JSON line."""
    import resource

    from protocache.stores import FeatureStore

    import pyarrow.dataset  # noqa: F401  (the first Parquet read imports it: 0.3 s of import, not of reading)

    spec = json.loads(spec_json)
    store = FeatureStore.open(spec["store"])
    step = protoquant_step(store.layout.dim, tuple(store.layout.grid), spec["seed"]) if spec["head"] else None
    files = store_files(spec["store"])
    rss_before = status_kib("VmRSS")
    logical = store.layout.num_tokens * store.layout.dim * 2
    epochs = []
    for phase in spec["phases"]:
        if phase == "cold":
            drop_page_cache(files)
        resident = resident_fraction(token_shard_files(spec["store"]))
        images = batches = 0
        t0 = time.perf_counter()
        for batch in store.iter_batches(None, spec["batch_size"], fields=("tokens", "label"), shuffle=True,
                                        seed=spec["seed"]):
            images += len(batch["label"])
            batches += 1
            if step is not None:
                step(batch)
        seconds = time.perf_counter() - t0
        epochs.append({"phase": phase, "images": images, "batches": batches, "seconds": seconds,
                       "tokens_bytes": images * logical, "images_per_s": images / seconds,
                       "mb_per_s": images * logical / MB / seconds, "resident_at_start": resident})
    peak = status_kib("VmHWM")
    if peak is None:  # ru_maxrss is KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"epochs": epochs, "peak_rss_mib": peak / 1024,
                      "rss_before_mib": None if rss_before is None else rss_before / 1024}))


def run_epochs(store_path: str, phases: list[str], batch_size: int, seed: int, head: bool) -> dict[str, Any]:
    """The epochs of one store in a fresh Python process (its peak RSS is the epoch's, not the writer's)."""
    spec = json.dumps({"store": store_path, "phases": phases, "batch_size": batch_size, "seed": seed, "head": head})
    code = "import sys; from protocache.pipeline.bench_scale import _epoch_child; _epoch_child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench --scale: the epoch process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the benchmark


def _target(name: str, value: float, target: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met}


def measure_store(config: ScaleBenchConfig, kind_name: str, choice: dict, workdir: Path) -> dict[str, Any]:
    """One store: write it, read its shard files cold and warm, stream its epochs in a fresh process."""
    kind = TOKEN_KINDS[kind_name]
    n = config.scale
    path = workdir / f"{kind_name}-{choice['codec'].replace(':', '-')}.zarr"
    store, write_s = write_store(path, kind, n, choice["codec"], config.seed)
    try:
        raw_tokens = n * kind.num_tokens * kind.dim * 2
        on_disk = store.bytes_on_disk()
        tokens_files = token_shard_files(path)
        tokens_on_disk = sum(os.path.getsize(f) for f in tokens_files)
        drop_page_cache(store_files(path))
        resident = resident_fraction(tokens_files)
        disk = sequential_read(tokens_files)  # cold: the disk's own rate
        cached = sequential_read(tokens_files)  # warm: the page cache's
        drop_page_cache(store_files(path))
        read = run_epochs(str(path), ["cold", "warm"], config.batch_size, config.seed, head=False)
        head = run_epochs(str(path), ["cold"], config.batch_size, config.seed, head=True) if config.head else None
    finally:
        shutil.rmtree(path, ignore_errors=True)
    cold, warm = read["epochs"]
    result: dict[str, Any] = {
        "tokens": kind_name, "like": kind.like, "token_shape": [kind.num_tokens, kind.dim],
        "compression": choice["codec"], "compression_choice": choice, "images": n,
        "shard_size": store.layout.shard_size, "raw_tokens_bytes": raw_tokens, "bytes_on_disk": on_disk,
        "tokens_bytes_on_disk": tokens_on_disk, "raw_over_stored": raw_tokens / tokens_on_disk,
        "write": {"seconds": write_s, "mb_per_s": raw_tokens / MB / write_s},
        "resident_after_drop": resident, "disk_read": disk, "page_cache_read": cached,
        "epoch_cold": {**cold, "peak_rss_mib": read["peak_rss_mib"], "rss_before_mib": read["rss_before_mib"]},
        "epoch_warm": warm,
    }
    if head is not None:
        result["head_epoch_cold"] = {**head["epochs"][0], "peak_rss_mib": head["peak_rss_mib"],
                                     "rss_before_mib": head["rss_before_mib"], "head": "protoquant",
                                     "num_classes": NUM_CLASSES}
    over_disk = cold["mb_per_s"] / disk["mb_per_s"]
    if choice["codec"] == "none":
        result["target"] = _target("cold epoch MB/s / disk MB/s (uncompressed)", over_disk, ">= 0.8", over_disk >= 0.8)
    else:
        result["target"] = _target("cold epoch logical MB/s / disk MB/s (compressed)", over_disk, "> 1", over_disk > 1)
    scale = IMAGENET_TRAIN / n
    result["extrapolation"] = {
        "images": IMAGENET_TRAIN, "like": kind.like, "raw_tokens_bytes": raw_tokens * scale,
        "bytes_on_disk": on_disk * scale, "epoch_cold_s": cold["seconds"] * scale,
        "epoch_warm_s": warm["seconds"] * scale,
        "head_epoch_cold_s": None if head is None else head["epochs"][0]["seconds"] * scale,
        "disk_read_s": disk["seconds"] * scale}
    return result


def dropped(run: dict[str, Any]) -> bool:
    """Whether the page cache really was dropped before the cold reads: mincore found <= 1 % of the
    shard files resident, or (where mincore cannot be called) the cold read ran < half the warm rate."""
    resident = [run["resident_after_drop"], run["epoch_cold"]["resident_at_start"]]
    if None not in resident:
        return max(resident) <= 0.01
    return run["disk_read"]["mb_per_s"] < 0.5 * run["page_cache_read"]["mb_per_s"]


def bench_scale(config: ScaleBenchConfig) -> dict[str, Any]:
    """Write and stream one store per token kind and codec; the report of `protocache bench --scale`."""
    from .bench_stages import machine_info

    config.validate()
    kinds, codecs = config.kinds(), config.codecs()
    parent = Path(config.dir) if config.dir else Path(tempfile.gettempdir())
    need = max(config.scale * (TOKEN_KINDS[k].num_tokens + 1) * TOKEN_KINDS[k].dim * 2 for k in kinds) * 1.05
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ProtocacheError(f"bench: --scale {config.scale} needs ~{need / 1e9:.1f} GB free in {parent}, which has "
                              f"{free / 1e9:.1f} GB; choose a smaller --scale or another --dir")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="protocache-scale-", dir=parent))
    runs = []
    try:
        for kind in kinds:
            choices: dict[str, dict] = {}
            for codec in codecs:  # auto may choose a codec also asked for by name (none, on dense tokens)
                choice = resolve_codec(TOKEN_KINDS[kind], codec, config.seed)
                choices.setdefault(choice["codec"], choice)
            runs += [measure_store(config, kind, choice, workdir) for choice in choices.values()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ram = memory_total()
    verified = all(dropped(r) for r in runs)
    larger = ram is not None and all(r["bytes_on_disk"] > ram for r in runs)
    cold = ("dropped: posix_fadvise(POSIX_FADV_DONTNEED) after fsync" if verified else
            "the store is larger than RAM" if larger else
            "NOT cold: dropping the page cache did not work here and the store fits in RAM; use --dir on a real "
            "disk or a --scale larger than RAM")
    return {"machine": machine_info(), "scale": config.scale, "batch_size": config.batch_size,
            "dir": str(parent), "ram_bytes": ram, "cold_cache": {"method": cold, "verified": verified or larger},
            "seconds": time.perf_counter() - started, "runs": runs}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_scale_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; RAM "
             f"{_size(report['ram_bytes'] or 0)}; stores in {report['dir']}",
             f"{report['scale']:,} images per store, batch {report['batch_size']}, page cache: "
             f"{report['cold_cache']['method']} (MB = 10^6 bytes; epoch MB/s are logical float16 token bytes)",
             f"{'tokens':<7} {'codec':<7} {'on disk':>9} {'raw/disk':>8} {'disk MB/s':>9} {'cold img/s':>10} "
             f"{'cold MB/s':>9} {'x disk':>6} {'warm MB/s':>9} {'head img/s':>10} {'peak RSS':>9}  target"]
    lines.append("-" * len(lines[-1]))
    for r in report["runs"]:
        cold, head = r["epoch_cold"], r.get("head_epoch_cold")
        t = r["target"]
        lines.append(f"{r['tokens']:<7} {r['compression']:<7} {_size(r['bytes_on_disk']):>9} "
                     f"{r['raw_over_stored']:>8.2f} {r['disk_read']['mb_per_s']:>9.0f} {cold['images_per_s']:>10.0f} "
                     f"{cold['mb_per_s']:>9.0f} {t['value']:>6.2f} {r['epoch_warm']['mb_per_s']:>9.0f} "
                     f"{head['images_per_s'] if head else float('nan'):>10.0f} {cold['peak_rss_mib']:>6.0f} MiB  "
                     f"{t['target']} {'met' if t['met'] else 'NOT MET'}")
    lines.append(f"extrapolated to {IMAGENET_TRAIN:,} images (ImageNet-1k train):")
    for r in report["runs"]:
        e = r["extrapolation"]
        lines.append(f"  {r['tokens']} {r['compression']} like {e['like']}: {_size(e['bytes_on_disk'])} on disk "
                     f"({_size(e['raw_tokens_bytes'])} of raw tokens); cold epoch {_duration(e['epoch_cold_s'])}, "
                     f"warm {_duration(e['epoch_warm_s'])}, ProtoQuant epoch {_duration(e['head_epoch_cold_s'])}; "
                     f"cat {_duration(e['disk_read_s'])}")
    lines.append(f"({report['seconds']:.0f}s)")
    return "\n".join(lines)
