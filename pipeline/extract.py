"""Extract stage: run a frozen backbone once over a dataset and write a feature store.

Decoding and resizing run in DataLoader worker processes, the forward pass in the main
process, and shard writes in a background thread, so the three overlap. Batches never
straddle shards, so the bytes of a shard do not depend on which shards were extracted
before it, in which process, or whether the run was interrupted.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from protocache.stores import FeatureStore, StoreLayout, default_shard_size
from protocache.stores.errors import ProtocacheError
from protocache.stores.owned import check_extract_out
from protocache.stores.shards import shards_to_write

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneConfig
from .config import check_values
from .datasets import Dataset, create_dataset
from .geometry import input_space_annotations
from .runtime import dask_client, pin_threads
from .transforms import (NOISE_SIGMA, ModelInputTransform, make_view, noise_definition,  # noqa: F401 (make_view is re-exported)
                         noise_sigma_pixels, preprocessing_config, resolve_resize)

VIEWS = ("clean", "hflip", "noise")


@dataclass
class ExtractConfig:
    """One extraction: which dataset through which frozen backbone into which feature store, and how."""

    dataset: str = "digits"
    """Dataset name (see `protocache datasets`)."""
    root: str | None = None
    """Dataset folder, for datasets read from disk."""
    backbone: str = DEFAULT_BACKBONE
    """timm model name."""
    weights: str = "auto"
    """auto | shipped | hub | random | PATH to a checkpoint."""
    out: str | None = None
    """Store path or fsspec URL (default cache/<dataset>_<backbone>.zarr)."""
    batch_size: int = 64
    """Images per forward pass."""
    shard_size: int | None = None
    """Images per shard (default: ~150 MB of tokens)."""
    chunk_size: int = 8
    """Images per inner Zarr chunk."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 where the hardware is fast at it) | fp32 | bf16."""
    limit: int | None = None
    """Only the first N images."""
    views: tuple[str, ...] = ("clean",)
    """Views to cache: clean,hflip,noise (comma-separated; clean is always cached)."""
    resize: str = "auto"
    """auto (stretch for datasets cropped to a bounding box: cub, cars with crop=true; timm otherwise) |
    stretch (resize straight to the input size, no centre crop) | timm (the backbone's eval resize + centre crop)."""
    noise_sigma: float = NOISE_SIGMA
    """Std of the noise view in ImageNet-normalised units (Huang et al.'s 0.2), added in pixel space as
    N(0, (sigma * ImageNet std)^2) per channel, clipped at +-0.25 ImageNet std."""
    on_bad_image: str = "error"
    """error (stop with the path) | skip (record ok=false)."""
    num_workers: int | None = None
    """Decode worker processes (default: cores - 1, at most 4)."""
    threads: int | None = None
    """Torch threads; pin for byte-identical re-runs."""
    compressor: str | None = None
    """none | zstd[:level] for the arrays."""
    overwrite: bool = False
    """Delete an existing store at --out first."""
    repair: bool = False
    """Check every chunk's checksum (and NaN/Inf) of the written shards first and rewrite those that fail
    (without it, only a quick check: truncated or overwritten shard files, checksums of the small arrays)."""
    progress: bool = True
    """Show a progress bar."""
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """KEY=VALUE passed to the dataset (repeatable --dataset-option), e.g. crop=false."""

    def out_path(self) -> Path | str:
        """The store location: a local path, or an fsspec URL kept as given (s3://, gs://, ...)."""
        if self.out:
            return self.out if "://" in self.out else Path(self.out).expanduser()
        return Path("cache") / f"{self.dataset}_{self.backbone}.zarr"

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules) and a shard of whole chunks, before any work."""
        check_values(self, "extract", flags=True)
        if self.shard_size and self.shard_size % self.chunk_size:
            fit = self.chunk_size * max(1, round(self.shard_size / self.chunk_size))
            raise ProtocacheError(f"extract: --shard-size {self.shard_size} must be a multiple of --chunk-size "
                                  f"{self.chunk_size}, e.g. --shard-size {fit}")


@dataclass
class ExtractResult:
    store_path: str
    shards_total: int
    shards_written_now: int
    images_written_now: int
    seconds: float
    images_per_second: float
    nothing_to_do: bool
    bad_images: list[str]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    items = [v.strip() for v in views.split(",")] if isinstance(views, str) else [str(v) for v in views]
    items = [v for v in items if v]
    bad = [v for v in items if v not in VIEWS]
    if bad or not items:
        raise ProtocacheError(f"bad --views value {','.join(items) or '(empty)'!r}: choose from {', '.join(VIEWS)} "
                              "(comma-separated, e.g. clean,hflip,noise)")
    if "clean" not in items:
        items.insert(0, "clean")
    return tuple(dict.fromkeys(items))


def parse_dataset_options(items: Sequence[str]) -> dict[str, str]:
    """['crop=false', 'split_seed=1'] -> {'crop': 'false', 'split_seed': '1'} (datasets parse the values)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ProtocacheError(f"bad --dataset-option {item!r}: use KEY=VALUE, e.g. crop=false")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _load_cropped(dataset: Dataset, index: int):
    """Image `index` as the backbone sees it before its transform: after the record's crop_box."""
    image = dataset.load_image(index)
    box = dataset.records[index].get("crop_box")
    return image.crop(tuple(int(round(v)) for v in box)) if box is not None else image


class _ImageViews(torch.utils.data.Dataset):
    """Decodes image i, resizes it to the model input, and stacks the requested views, each normalised."""

    def __init__(self, dataset: Dataset, transform: ModelInputTransform, views: tuple[str, ...], sigma: float):
        self.dataset, self.transform, self.views, self.sigma = dataset, transform, views, sigma
        self.data_config = transform.data_config

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        record = self.dataset.records[index]
        try:
            image = self.dataset.load_image(index)
            image.load()
            size = image.size  # original width, height
            if record.get("crop_box") is not None:  # e.g. CUB's bounding-box crop
                image = image.crop(tuple(int(round(v)) for v in record["crop_box"]))
            annotations = input_space_annotations(record, image.size, self.data_config)
            pixels = self.transform.pixels(image)
        except Exception as exc:  # noqa: BLE001 - any decode failure is reported with the image's path
            _, h, w = self.data_config["input_size"]
            blank = torch.zeros(len(self.views), 3, h, w)
            return index, blank, False, f"{type(exc).__name__}: {exc}", json.dumps({"width": -1, "height": -1})
        stacked = torch.stack([self.transform.normalize(make_view(pixels, v, record["image_id"], self.sigma))
                               for v in self.views])
        extra = {"width": size[0], "height": size[1], **annotations}
        return index, stacked, True, "", json.dumps(extra)


def shard_batches(layout: StoreLayout, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches for the given shards; a batch never crosses a shard boundary."""
    batches = []
    for shard in shards:
        start, stop = layout.shard_bounds(shard)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
    return batches


def store_layout_and_attrs(cfg: ExtractConfig, dataset: Dataset, backbone: Backbone,
                           precision_cosine: float) -> tuple[StoreLayout, dict, dict]:
    import timm

    from protocache.stores import FORMAT_VERSION

    views = parse_views(cfg.views)
    shard_size = cfg.shard_size or default_shard_size(backbone.grid[0] * backbone.grid[1], backbone.dim,
                                                      cfg.chunk_size)
    if shard_size % cfg.chunk_size:
        raise ProtocacheError(f"--shard-size {shard_size} must be a multiple of the chunk size {cfg.chunk_size}")
    layout = StoreLayout(num_images=len(dataset), grid=backbone.grid, dim=backbone.dim,
                         num_logits=backbone.num_logits, shard_size=shard_size, chunk_size=cfg.chunk_size,
                         views=views, compressor=cfg.compressor)
    data_config = preprocessing_config(backbone.data_config, resolve_resize(cfg.resize, dataset.extract_defaults))
    fingerprint = {
        "dataset": dataset.name,
        "manifest_sha256": dataset.manifest_sha256(),
        "num_images": len(dataset),
        "backbone": backbone.name,
        "weights_source": backbone.weights_source,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": data_config,
        "precision": backbone.precision,
        "dtype": "float16",
        "views": list(views),
        "noise_sigma": cfg.noise_sigma if "noise" in views else None,
        "noise": noise_definition(cfg.noise_sigma) if "noise" in views else None,
        "versions": {"protocache": _package_version(), "torch": torch.__version__.split("+")[0],
                     "timm": timm.__version__},
    }
    extra = {
        "store_format": FORMAT_VERSION,
        "grid": list(backbone.grid),
        "input_size": list(backbone.input_size),
        "token_boxes": backbone.token_boxes(),
        "token_order": "row-major (token t = row t // W, column t % W)",
        "pooled": "cls" if (not backbone.is_cnn and backbone.has_cls_token) else "mean",
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "part_names": dataset.part_names,
        "dataset_options": dataset.options,
        "dataset_root": str(Path(cfg.root).expanduser().resolve()) if cfg.root else None,
        "backbone": backbone.describe(),
        "bf16_cosine_to_fp32": precision_cosine,
        "noise": noise_definition(cfg.noise_sigma),
        "noise_sigma_pixels": noise_sigma_pixels(cfg.noise_sigma),
    }
    return layout, fingerprint, extra


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("protocache")
    except Exception:  # noqa: BLE001 - running from a source tree without install
        return "0+unknown"


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def prepare_store(cfg: ExtractConfig, dataset: Dataset | None = None,
                  backbone: Backbone | None = None) -> tuple[FeatureStore, Dataset, Backbone]:
    """Build the dataset and backbone, then create the store (or reopen it if it matches)."""
    cfg.validate()
    check_extract_out(cfg.out_path(), cfg.root, cfg.overwrite)  # before anything is read or written
    if cfg.on_bad_image not in ("error", "skip"):
        raise ProtocacheError(f"--on-bad-image must be error or skip, not {cfg.on_bad_image!r}")
    parse_views(cfg.views)
    resolve_resize(cfg.resize)  # a bad value fails before the backbone loads
    pin_threads(cfg.threads)
    dataset = dataset or create_dataset(cfg.dataset, cfg.root, **cfg.dataset_options).limit(cfg.limit)
    if len(dataset) == 0:
        raise ProtocacheError(f"dataset {cfg.dataset} has no images")
    backbone = backbone or Backbone(BackboneConfig(cfg.backbone, cfg.weights, cfg.device, cfg.precision))
    cosine = 1.0
    if backbone.precision != "fp32":
        transform = backbone.transform(resolve_resize(cfg.resize, dataset.extract_defaults))
        probe = torch.stack([transform(_load_cropped(dataset, i)) for i in range(min(4, len(dataset)))])
        cosine = backbone.check_precision(probe)
        if backbone.precision == "fp32":
            _log(f"bf16 tokens differ from fp32 (cosine {cosine:.4f} < 0.99): extracting in fp32")
    layout, fingerprint, extra = store_layout_and_attrs(cfg, dataset, backbone, cosine)
    store = FeatureStore.create_or_open(cfg.out_path(), layout, fingerprint, extra, overwrite=cfg.overwrite)
    return store, dataset, backbone


class _ShardWriter(threading.Thread):
    """Writes finished shards in the background; the first error stops the extraction."""

    def __init__(self, store: FeatureStore):
        super().__init__(daemon=True)
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self.store.write_shard(*job)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def put(self, job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def extract_shards(store: FeatureStore, dataset: Dataset, backbone: Backbone, shards: Sequence[int],
                   cfg: ExtractConfig) -> dict[str, Any]:
    """Extract and write the given shards (whole shards only). Returns counts and bad images."""
    layout = store.layout
    views = layout.views
    batches = shard_batches(layout, shards, cfg.batch_size)
    source = _ImageViews(dataset, ModelInputTransform(store.fingerprint["preprocessing"]), views, cfg.noise_sigma)
    workers = _default_workers() if cfg.num_workers is None else cfg.num_workers
    loader = torch.utils.data.DataLoader(source, batch_sampler=batches, num_workers=workers,
                                         pin_memory=backbone.device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    total = sum(layout.shard_bounds(s)[1] - layout.shard_bounds(s)[0] for s in shards)
    writer = _ShardWriter(store)
    writer.start()
    bad: list[str] = []
    t, d, c = layout.num_tokens, layout.dim, layout.num_logits
    current: dict[str, Any] | None = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc=f"extract {store.name}", disable=not cfg.progress,
               mininterval=1.0, file=sys.stderr)
    try:
        for indices, images, ok, reasons, extras in loader:
            indices = indices.tolist()
            shard = indices[0] // layout.shard_size
            if current is None or current["shard"] != shard:
                start, stop = layout.shard_bounds(shard)
                current = {"shard": shard, "start": start, "filled": 0, "rows": [None] * (stop - start),
                           "arrays": {v: {"tokens": np.zeros((stop - start, t, d), np.float16),
                                          "pooled": np.zeros((stop - start, d), np.float16),
                                          **({"logits": np.zeros((stop - start, c), np.float16)} if c else {})}
                                      for v in views}}
            for k, index in enumerate(indices):
                if not bool(ok[k]):
                    path = dataset.records[index]["path"]
                    if cfg.on_bad_image == "error":
                        raise ProtocacheError(
                            f"cannot read image {path} ({reasons[k]}). Fix or remove the file, or pass "
                            "--on-bad-image skip to record it as bad and carry on; shards already written are kept.")
                    bad.append(path)
            for v, view in enumerate(views):
                tokens, pooled, logits = backbone.forward(images[:, v])
                rel = [i - current["start"] for i in indices]
                lo, hi = rel[0], rel[-1] + 1
                arrs = current["arrays"][view]
                arrs["tokens"][lo:hi] = tokens.cpu().numpy()
                arrs["pooled"][lo:hi] = pooled.cpu().numpy()
                if c:
                    arrs["logits"][lo:hi] = logits.cpu().numpy()
                for k in range(len(indices)):
                    if not bool(ok[k]):  # a bad image keeps zero features in every view
                        arrs["tokens"][rel[k]] = 0
                        arrs["pooled"][rel[k]] = 0
                        if c:
                            arrs["logits"][rel[k]] = 0
            for k, index in enumerate(indices):
                record = {kk: vv for kk, vv in dataset.records[index].items()}
                record["row"] = index
                record["ok"] = bool(ok[k])
                record["reason"] = reasons[k]
                record.update(json.loads(extras[k]))
                current["rows"][index - current["start"]] = record
            current["filled"] += len(indices)
            bar.update(len(indices))
            if current["filled"] == len(current["rows"]):
                writer.put((current["shard"], current["arrays"], current["rows"]))
                current = None
    finally:
        bar.close()
        writer.close()
    return {"images": total, "shards": len(shards), "bad_images": bad}


def _nothing_to_do(store: FeatureStore, started: float) -> ExtractResult:
    total = store.layout.num_shards
    _log(f"{store.path} is complete ({total} shards); nothing to do.")
    return ExtractResult(str(store.path), total, 0, 0, time.perf_counter() - started, 0.0, True, [])


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract a whole dataset into a store; on an existing store only missing shards are written."""
    started = time.perf_counter()
    store, dataset, backbone = prepare_store(cfg)
    todo = shards_to_write(store, cfg.repair, _log)  # missing + damaged (see stores/shards.py)
    total = store.layout.num_shards
    if not todo:
        return _nothing_to_do(store, started)
    if len(todo) < total:
        _log(f"{store.path}: {total - len(todo)} of {total} shards already written; extracting the other {len(todo)}.")
    store.remove_partial_writes()
    t0 = time.perf_counter()
    counts = extract_shards(store, dataset, backbone, todo, cfg)
    seconds = time.perf_counter() - t0
    return ExtractResult(str(store.path), total, counts["shards"], counts["images"],
                         time.perf_counter() - started, counts["images"] / max(seconds, 1e-9), False,
                         counts["bad_images"])


def config_dict(cfg: ExtractConfig) -> dict[str, Any]:
    return asdict(cfg)


# ---------------------------------------------------------------------------- dask.distributed
# One backbone and one dataset manifest per worker process, reused by every task it runs.
_WORKER_CACHE: dict[tuple, Any] = {}


def _worker_inputs(cfg: ExtractConfig) -> tuple[Dataset, Backbone]:
    key = (cfg.dataset, cfg.root, cfg.limit, repr(sorted(cfg.dataset_options.items())),
           cfg.backbone, cfg.weights, cfg.device, cfg.precision)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        dataset = create_dataset(cfg.dataset, cfg.root, **cfg.dataset_options).limit(cfg.limit)
        backbone = Backbone(BackboneConfig(cfg.backbone, cfg.weights, cfg.device, cfg.precision))
        _WORKER_CACHE[key] = (dataset, backbone)
    return _WORKER_CACHE[key]


def extract_shard_task(cfg: ExtractConfig, shard: int) -> dict[str, Any]:
    """A dask task: extract and write one whole shard of an existing store.

    The worker recomputes the fingerprint from its own dataset and backbone and refuses
    to write into a store made from other inputs.
    """
    pin_threads(cfg.threads)
    dataset, backbone = _worker_inputs(cfg)
    store = FeatureStore.open(cfg.out_path(), mode="r+")
    backbone.precision = store.fingerprint["precision"]  # the store decides; every worker computes alike
    _, fingerprint, _ = store_layout_and_attrs(cfg, dataset, backbone, 1.0)
    differ = [k for k in fingerprint if k != "versions" and fingerprint[k] != store.fingerprint.get(k)]
    if differ:
        raise ProtocacheError(f"worker inputs differ from the store's fingerprint in {differ}; "
                              "every worker needs the same dataset files, backbone weights and packages")
    if store.shard_exists(shard):  # a retried or duplicated task: the shard is already complete
        return {"shard": shard, "images": 0, "bad_images": []}
    counts = extract_shards(store, dataset, backbone, [shard], replace(cfg, progress=False, num_workers=0))
    return {"shard": shard, "images": counts["images"], "bad_images": counts["bad_images"]}


def run_extract_distributed(cfg: ExtractConfig, scheduler: str | None = None, workers: int | None = None,
                            retries: int = 2) -> ExtractResult:
    """Extract on a dask.distributed cluster: the store is created here, each task writes whole shards.

    `scheduler` is the address of a running cluster (tcp://HOST:PORT); otherwise a LocalCluster
    of `workers` single-threaded worker processes is started and closed again.
    """
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    started = time.perf_counter()
    store, _, _ = prepare_store(cfg)
    todo = shards_to_write(store, cfg.repair, _log)  # missing + damaged (see stores/shards.py)
    total = store.layout.num_shards
    if not todo:
        return _nothing_to_do(store, started)
    store.remove_partial_writes()
    # Workers open the store by path, so it must be one they can all reach.
    task_cfg = replace(cfg, out=str(store.path.resolve()) if store.is_local else store.location, overwrite=False,
                       root=str(Path(cfg.root).expanduser().resolve()) if cfg.root else None)
    bad: list[str] = []
    images = 0
    with dask_client(scheduler, workers) as client:
        t0 = time.perf_counter()
        futures = client.map(extract_shard_task, [task_cfg] * len(todo), todo, retries=retries, pure=False)
        with tqdm(total=len(todo), unit="shard", desc=f"extract {store.name}", disable=not cfg.progress,
                  file=sys.stderr) as bar:
            for future in as_completed(futures):
                out = future.result()
                images += out["images"]
                bad.extend(out["bad_images"])
                bar.update(1)
    seconds = time.perf_counter() - t0
    return ExtractResult(str(store.path), total, len(todo), images, time.perf_counter() - started,
                         images / max(seconds, 1e-9), False, bad)
