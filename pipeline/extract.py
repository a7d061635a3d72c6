"""Extract stage: run a frozen backbone once over a dataset and write a feature store.

Decoding and resizing run in DataLoader worker processes, the forward pass in the main
process, and shard writes in a background thread, so the three overlap (the loop itself is in
`extract_loop`). Batches never
straddle shards, so the bytes of a shard do not depend on which shards were extracted
before it, in which process, or whether the run was interrupted.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from protocache.stores import FeatureStore, StoreLayout, default_shard_size
from protocache.stores.errors import ProtocacheError
from protocache.stores.layout import choose_compression, describe_compression, parse_compression, resumed_compression
from protocache.stores.owned import check_extract_out
from protocache.stores.shards import shards_to_write

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneConfig
from .config import check_values
from .datasets import Dataset, create_dataset
from .extract_loop import extract_shards
from .runtime import check_scheduler, dask_client, pin_threads, pinned_threads
from .transforms import (NOISE_SIGMA, noise_definition,
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
    """Decode worker processes (default: none with the forward on a CPU, where each batch is decoded between
    forward passes on as many threads as the forward has; cores - 1, at most 16, on CUDA)."""
    threads: int | None = None
    """Torch threads; pin for byte-identical re-runs."""
    compression: str = "auto"
    """auto (zstd:1 where probe tokens compress >= 1.3x: ReLU CNNs like lite0 ~9x, not dense ViTs; a resumed store keeps
    its codec) | none | zstd[:level 1-22] | blosc[:cname[:level 0-9]] (byte shuffle; lz4 lz4hc blosclz zstd zlib)."""
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
        parse_compression(self.compression, what="extract")
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


def store_layout_and_attrs(cfg: ExtractConfig, dataset: Dataset, backbone: Backbone,
                           precision_cosine: float, compression: dict | None = None) -> tuple[StoreLayout, dict, dict]:
    import timm

    from protocache.stores import FORMAT_VERSION

    views = parse_views(cfg.views)
    compression = compression or choose_compression(cfg.compression)  # auto without a probe: none
    shard_size = cfg.shard_size or default_shard_size(backbone.grid[0] * backbone.grid[1], backbone.dim,
                                                      cfg.chunk_size)
    if cfg.shard_size:  # a shard past the last image holds nothing but padding (pooled, logits: one chunk a shard)
        shard_size = min(shard_size, -(-len(dataset) // cfg.chunk_size) * cfg.chunk_size)
    if shard_size % cfg.chunk_size:
        raise ProtocacheError(f"--shard-size {shard_size} must be a multiple of the chunk size {cfg.chunk_size}")
    layout = StoreLayout(num_images=len(dataset), grid=backbone.grid, dim=backbone.dim,
                         num_logits=backbone.num_logits, shard_size=shard_size, chunk_size=cfg.chunk_size,
                         views=views, compression=compression["codec"])
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
        "compression": compression,
    }
    return layout, fingerprint, extra


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("protocache")
    except Exception:  # noqa: BLE001 - running from a source tree without install
        return "0+unknown"


def prepare_store(cfg: ExtractConfig, dataset: Dataset | None = None,
                  backbone: Backbone | None = None) -> tuple[FeatureStore, Dataset, Backbone]:
    """Build the dataset and backbone, then create the store (or reopen it if it matches)."""
    cfg.validate()
    check_extract_out(cfg.out_path(), cfg.root, cfg.overwrite)  # before anything is read or written
    if cfg.on_bad_image not in ("error", "skip"):
        raise ProtocacheError(f"--on-bad-image must be error or skip, not {cfg.on_bad_image!r}")
    parse_views(cfg.views)
    resolve_resize(cfg.resize)  # a bad value fails before the backbone loads
    resumed = resumed_compression(cfg.out_path(), cfg.compression, cfg.overwrite)  # before the backbone loads
    measure = resumed is None and parse_compression(cfg.compression) == "auto"
    dataset = dataset or create_dataset(cfg.dataset, cfg.root, **cfg.dataset_options).limit(cfg.limit)
    if len(dataset) == 0:
        raise ProtocacheError(f"dataset {cfg.dataset} has no images")
    backbone = backbone or Backbone(BackboneConfig(cfg.backbone, cfg.weights, cfg.device, cfg.precision))
    cosine = 1.0
    if backbone.precision != "fp32" or measure:  # a few probe images: the bf16 check, auto's compression ratio
        transform = backbone.transform(resolve_resize(cfg.resize, dataset.extract_defaults))
        probe = torch.stack([transform(_load_cropped(dataset, i)) for i in range(min(4, len(dataset)))])
    if backbone.precision != "fp32":
        cosine = backbone.check_precision(probe)
        if backbone.precision == "fp32":
            _log(f"bf16 tokens differ from fp32 (cosine {cosine:.4f} < 0.99): extracting in fp32")
    tokens = backbone.forward(probe)[0].cpu().numpy() if measure else None  # in the store's precision
    compression = choose_compression(cfg.compression, resumed, tokens)
    if measure:
        _log(f"compression {describe_compression(compression['codec'], compression)}")
    layout, fingerprint, extra = store_layout_and_attrs(cfg, dataset, backbone, cosine, compression)
    store = FeatureStore.create_or_open(cfg.out_path(), layout, fingerprint, extra, overwrite=cfg.overwrite)
    return store, dataset, backbone


def _nothing_to_do(store: FeatureStore, started: float) -> ExtractResult:
    total = store.layout.num_shards
    _log(f"{store.path} is complete ({total} shards); nothing to do.")
    return ExtractResult(str(store.path), total, 0, 0, time.perf_counter() - started, 0.0, True, [])


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract a whole dataset into a store; on an existing store only missing shards are written."""
    cfg.validate()
    with pinned_threads(cfg.threads):  # the caller's thread count comes back when extraction ends
        return _extract_here(cfg)


def _extract_here(cfg: ExtractConfig) -> ExtractResult:
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
    cfg.validate()
    check_scheduler(scheduler)
    with dask_client(scheduler, workers) as client:  # a cluster that cannot be reached fails before the store is made
        with pinned_threads(cfg.threads):  # the probe forward here computes as the workers do
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
