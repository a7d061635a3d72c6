"""The extraction loop: decode, the forward pass in the main thread, shard writes behind it.

On a small CPU every cycle spent outside the forward pass is taken from it, so the loop keeps
that work small and off the forward's way:

- Decoding (load, crop, resize) stops at uint8 HWC pixels (150 KB at 224 px, a quarter of
  float32). With the forward on a CPU, each batch is decoded when it is needed, on a pool of as
  many threads as the forward has (PIL's decoders and resize release the GIL), so the forward then
  has every core to itself: its OpenMP threads already use every core, and a decode process beside
  them preempts one thread while the other waits for it at the next barrier (measured on 2 cores:
  a decode worker's 0.45 s of CPU time slowed the forward of 512 digits by ~0.65 s). With the forward
  on CUDA, DataLoader worker processes decode while the GPU computes (`_default_workers`), and
  send the pixels in shared memory. `--num-workers N` asks for N worker processes anywhere.
- The normalisation runs batched in the main thread (`transforms.BatchNormalizer`), straight into
  the layout the forward wants (channels-last for CNNs), with the very float32 ops of torchvision's
  to_tensor + Normalize, so the values fed to the backbone are bit-identical to the per-image
  transform.
- Each batch's outputs go into the shard's float16 buffers in one torch copy per array, with no
  per-image Python; the metadata rows are built in the writer thread.
- A background thread writes finished shards (zarr's zstd and checksums release the GIL) and
  hands their buffers back for the next shard, so no shard-sized buffer is faulted in twice.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from protocache.stores import FeatureStore, StoreLayout
from protocache.stores.errors import ProtocacheError
from protocache.stores.layout import stored_arrays

from .backbones import Backbone
from .datasets import Dataset
from .geometry import input_space_annotations
from .transforms import BatchNormalizer, ModelInputTransform, make_view, pixels_from_uint8

if TYPE_CHECKING:
    from .extract import ExtractConfig


def _default_workers(device: torch.device | str = "cpu") -> int:
    """Decode processes beside a forward pass: one per core but one, at most 4 (16 on CUDA, where decoding
    is what the GPU waits for)."""
    cap = 16 if torch.device(device).type == "cuda" else 4
    return max(0, min(cap, (os.cpu_count() or 1) - 1))


def decode_plan(num_workers: int | None, device: torch.device | str) -> tuple[str, int]:
    """Where a batch is decoded: ("threads", n) between forward passes, or ("processes", n) DataLoader workers
    (n = 0: in the main thread). `num_workers` None picks threads for a CPU forward, processes for CUDA."""
    if num_workers is not None:
        return "processes", num_workers
    if torch.device(device).type == "cpu":
        return "threads", torch.get_num_threads()
    return "processes", _default_workers(device)


class _ImageViews(torch.utils.data.Dataset):
    """Image i decoded, cropped and resized to the model input, as uint8 [H, W, 3] pixels.

    Returns (index, pixels, noise_pixels, ok, reason, extra): `noise_pixels` is the noise view in
    float [0, 1] pixel space [3, H, W] when that view is cached (else None); every other view is
    made from `pixels` in the main thread (`view_inputs`). `extra` holds the metadata columns the
    image adds (original width/height, annotations in model-input pixels).
    """

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
            pixels = self.transform.pixels_uint8(image)
        except Exception as exc:  # noqa: BLE001 - any decode failure is reported with the image's path
            _, h, w = self.data_config["input_size"]
            noise = torch.zeros(3, h, w) if "noise" in self.views else None
            return index, torch.zeros(h, w, 3, dtype=torch.uint8), noise, False, f"{type(exc).__name__}: {exc}", \
                {"width": -1, "height": -1}
        noise = (make_view(pixels_from_uint8(pixels), "noise", record["image_id"], self.sigma)
                 if "noise" in self.views else None)
        return index, pixels, noise, True, "", {"width": size[0], "height": size[1], **annotations}


def collate_images(items: list[tuple]) -> dict[str, Any]:
    """A batch of `_ImageViews` items: pixels stacked (in shared memory inside a worker), the rest as lists."""
    from torch.utils.data import default_collate

    index, pixels, noise, ok, reasons, extras = zip(*items)
    return {"index": np.asarray(index, dtype=np.int64), "pixels": default_collate(list(pixels)),
            "noise": default_collate(list(noise)) if noise[0] is not None else None,
            "ok": np.asarray(ok, dtype=bool), "reasons": list(reasons), "extras": list(extras)}


def view_inputs(batch: dict[str, Any], view: str, normalize: BatchNormalizer) -> torch.Tensor:
    """The backbone's normalised input of one view of a collated batch."""
    if view == "clean":
        return normalize(batch["pixels"])
    if view == "hflip":  # flipping uint8 pixels then normalising = normalising then flipping
        return normalize(torch.flip(batch["pixels"], dims=[2]))
    if view == "noise":
        return normalize(batch["noise"])
    raise ProtocacheError(f"unknown view {view!r}")


def decoded_batches(source: torch.utils.data.Dataset, batches: list[list[int]], num_workers: int | None,
                    device: torch.device, collate: Callable[[list], Any] = collate_images):
    """Collated batches of `source` (extract's `_ImageViews`, predict's image items), decoded as `decode_plan`
    says."""
    kind, count = decode_plan(num_workers, device)
    if kind == "threads":
        return _decoded_between_forwards(source, batches, count, collate)
    count = min(count, len(batches))
    return torch.utils.data.DataLoader(source, batch_sampler=batches, num_workers=count, collate_fn=collate,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if count else None)


def _decoded_between_forwards(source: torch.utils.data.Dataset, batches: list[list[int]], threads: int,
                              collate: Callable[[list], Any]):
    """Each batch decoded when it is needed, by `threads` threads of this process."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for rows in batches:
            yield collate(list(pool.map(source.__getitem__, rows)))


def shard_batches(layout: StoreLayout, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches for the given shards; a batch never crosses a shard boundary."""
    batches = []
    for shard in shards:
        start, stop = layout.shard_bounds(shard)
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
    return batches


class _ShardWriter(threading.Thread):
    """Writes finished shards in the background and recycles their buffers; the first error stops the extraction."""

    def __init__(self, store: FeatureStore, dataset: Dataset):
        super().__init__(daemon=True)
        self.store, self.dataset = store, dataset
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # written shards' buffers, for the next shard
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    shard, arrays, start, ok, reasons, extras = job
                    self.store.write_shard(shard, arrays, self.metadata_rows(start, ok, reasons, extras))
                    self.free.put(arrays)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def metadata_rows(self, start: int, ok: np.ndarray, reasons: list[str], extras: list[dict]) -> list[dict]:
        rows = []
        for k, extra in enumerate(extras):
            record = dict(self.dataset.records[start + k])
            record["row"] = start + k
            record["ok"] = bool(ok[k])
            record["reason"] = reasons[k]
            record.update(extra)
            rows.append(record)
        return rows

    def buffers(self, layout: StoreLayout, rows: int) -> dict[str, dict[str, np.ndarray]]:
        """Float16 buffers for a shard of `rows` images: a written shard's when one of that size is free.

        Every row is overwritten (each batch fills its rows, bad images are zeroed), so no zeroing."""
        while True:
            try:
                arrays = self.free.get_nowait()
            except queue.Empty:
                break
            if arrays["clean"]["tokens"].shape[0] == rows:
                return arrays
        shapes = {"tokens": (rows, layout.num_tokens, layout.dim), "pooled": (rows, layout.dim),
                  "logits": (rows, layout.num_logits)}
        return {v: {name: np.empty(shapes[name], np.float16) for name in stored_arrays(layout)} for v in layout.views}

    def put(self, job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _Shard:
    """The shard being filled: its float16 buffers and the per-image metadata of its rows."""

    def __init__(self, index: int, layout: StoreLayout, writer: _ShardWriter):
        self.index = index
        self.start, stop = layout.shard_bounds(index)
        self.rows = stop - self.start
        self.arrays = writer.buffers(layout, self.rows)
        self.ok = np.zeros(self.rows, dtype=bool)
        self.reasons: list[str] = [""] * self.rows
        self.extras: list[dict] = [{}] * self.rows
        self.filled = 0

    def add(self, view: str, lo: int, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> None:
        """Store one batch's (tokens, pooled, logits) of a view at shard rows lo.. (float16, in one copy each)."""
        for name, value in zip(("tokens", "pooled", "logits"), outputs):
            if name in self.arrays[view]:
                target = self.arrays[view][name][lo:lo + value.shape[0]]
                torch.from_numpy(target).copy_(value)  # float -> float16 (round to nearest even, as numpy)


def extract_shards(store: FeatureStore, dataset: Dataset, backbone: Backbone, shards: Sequence[int],
                   cfg: "ExtractConfig") -> dict[str, Any]:
    """Extract and write the given shards (whole shards only). Returns counts and bad images."""
    from tqdm.auto import tqdm

    layout = store.layout
    views = layout.views
    batches = shard_batches(layout, shards, cfg.batch_size)
    transform = ModelInputTransform(store.fingerprint["preprocessing"])
    normalize = BatchNormalizer(transform.mean, transform.std, backbone.device, backbone.channels_last)
    loader = decoded_batches(_ImageViews(dataset, transform, views, cfg.noise_sigma), batches, cfg.num_workers,
                             backbone.device)
    total = sum(layout.shard_bounds(s)[1] - layout.shard_bounds(s)[0] for s in shards)
    writer = _ShardWriter(store, dataset)
    writer.start()
    bad: list[str] = []
    current: _Shard | None = None
    bar = tqdm(total=total, unit="img", desc=f"extract {store.name}", disable=not cfg.progress,
               mininterval=1.0, file=sys.stderr)
    try:
        for batch in loader:
            index, ok = batch["index"], batch["ok"]
            if current is None or current.index != index[0] // layout.shard_size:
                current = _Shard(int(index[0] // layout.shard_size), layout, writer)
            lo, hi = int(index[0]) - current.start, int(index[-1]) + 1 - current.start
            failed = np.flatnonzero(~ok)
            for k in failed:
                path = dataset.records[int(index[k])]["path"]
                if cfg.on_bad_image == "error":
                    raise ProtocacheError(
                        f"cannot read image {path} ({batch['reasons'][k]}). Fix or remove the file, or pass "
                        "--on-bad-image skip to record it as bad and carry on; shards already written are kept.")
                bad.append(path)
            for view in views:
                current.add(view, lo, backbone.forward(view_inputs(batch, view, normalize)))
                if failed.size:  # a bad image keeps zero features in every view
                    for array in current.arrays[view].values():
                        array[lo + failed] = 0
            current.ok[lo:hi] = ok
            current.reasons[lo:hi] = batch["reasons"]
            current.extras[lo:hi] = batch["extras"]
            current.filled += hi - lo
            bar.update(hi - lo)
            if current.filled == current.rows:
                writer.put((current.index, current.arrays, current.start, current.ok, current.reasons,
                            current.extras))
                current = None
    finally:
        bar.close()
        writer.close()
    return {"images": total, "shards": len(shards), "bad_images": bad}
