"""Fit stage: the generic machinery every head's training recipe uses, and `fit_head`.

A head's recipe (its ``fit(ctx)`` method, in its own file under pipeline/heads/) asks the
``FitContext`` for batch sources over the store and runs the shared training loop;
``fit_head`` builds the head, runs its recipe, measures accuracy and writes the run folder
through ``stores/runs.py``.

Data comes from the store in batches. A split that spans at most `shards_in_memory`
shards is read once and kept (that many shards is the memory bound anyway); a larger
one is streamed from the store every epoch with ``FeatureStore.iter_batches``, so memory
stays flat as the store grows. Per-image features derived from frozen parts (ProtoQuant
presence with frozen codes, ProtoPool slot similarities for last-layer tuning, pooled
features for the probe) are kept in RAM while they fit in `feature_cache_mb`, and
recomputed from the tokens each epoch otherwise.

Validation: `val_fraction` of the store's train split is carved out as split "val"
(stratified by label with scikit-learn's rule, seeded by the fit seed) before the recipe
runs. The recipe sees the store through a view in which "train" is the remaining rows
and "val" the carved ones, so every choice made while fitting (k-means sample, teacher,
pruning, push, the figures recorded before a top-k or a push) uses train and val only;
test only reports. The val rows are written to RUN/val_rows.npy so `evaluate --split val`
measures the same images. A store with its own "val" split (a folder tree with val/
folders) keeps it and nothing is carved. With val_fraction 0 the store is used as it is.

Determinism: the seed fixes torch, numpy, Python's `random`, the k-means sample, the
validation carve-out and the batch order of every epoch; torch runs with deterministic
algorithms. On the CPU, the same seed, store, config and thread count give byte-identical
weights.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import MissingShardError, ProtocacheError

from .heads import Head, StoreInfo, head_class, resolve_config, store_info
from .runs import with_val_rows
from .runtime import pin_threads, resolve_device, seed_everything

RUN_FORMAT = 1
VAL_ROWS = "val_rows.npy"
"""The run file holding the validation rows (store row indices, int64, sorted)."""


@dataclass
class FitConfig:
    """How to fit (the head's own hyper-parameters live in its config)."""

    seed: int = 0
    """Seed of everything random: init, k-means sample, validation carve-out, batch order."""
    val_fraction: float = 0.1
    """Share of each class's train images held out as the validation split every choice made
    while fitting is judged on (stratified, seeded by `seed`); 0 trains on the whole train split."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    epochs: int | None = None
    """Shorthand for the head config's `epochs`."""
    shards_in_memory: int = 2
    """At most this many shards of tokens in RAM."""
    feature_cache_mb: int = 1024
    """Derived per-image features are kept in RAM up to this size, recomputed beyond it."""
    threads: int | None = None
    """Torch threads; pin it for byte-identical CPU re-runs."""
    eval_batch_size: int = 256
    """Images per batch when measuring accuracy."""
    progress: bool = True
    """Show progress bars and log lines on stderr."""


@dataclass
class FitResult:
    run_dir: str
    head: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    model: Head | None = None
    """The fitted head itself (eval mode), so callers need not reload it from the run folder."""


# ----------------------------------------------------------------------------- data sources


class Batches(Protocol):
    num_rows: int

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        ...


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class StoreSplit:
    """One split of a store as batches of the given fields (numpy, float16 arrays)."""

    def __init__(self, store: FeatureStore, split: str, fields: tuple[str, ...], seed: int = 0,
                 shards_in_memory: int = 2):
        self.store, self.split, self.fields, self.seed = store, split, tuple(fields), seed
        self.shards_in_memory = max(1, shards_in_memory)
        rows = store.split_rows(split)
        self.num_rows = int(len(rows))
        shards = np.unique(np.asarray(rows) // store.layout.shard_size)
        self.resident = len(shards) <= self.shards_in_memory
        self._arrays: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            parts: dict[str, list[np.ndarray]] = {f: [] for f in self.fields}
            for b in self.store.iter_batches(self.split, batch_size=4096, fields=self.fields,
                                             shards_in_memory=self.shards_in_memory):
                for f in self.fields:
                    parts[f].append(b[f])
            self._arrays = {f: np.concatenate(v) if v else np.zeros((0,)) for f, v in parts.items()}
        return self._arrays

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        seed = _epoch_seed(self.seed, epoch)
        if not self.resident:
            yield from self.store.iter_batches(self.split, batch_size=batch_size, fields=self.fields,
                                               shuffle=shuffle, seed=seed, shards_in_memory=self.shards_in_memory)
            return
        arrays = self._load()
        order = np.random.default_rng(seed).permutation(self.num_rows) if shuffle else np.arange(self.num_rows)
        for i in range(0, self.num_rows, batch_size):
            idx = order[i:i + batch_size]
            yield {f: v[idx] for f, v in arrays.items()}


class ArraySplit:
    """In-memory per-image arrays with the same batches() interface."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int = 0):
        self.arrays, self.seed = arrays, seed
        self.num_rows = int(len(next(iter(arrays.values()))))

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        order = (np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(self.num_rows)
                 if shuffle else np.arange(self.num_rows))
        for i in range(0, self.num_rows, batch_size):
            idx = order[i:i + batch_size]
            yield {f: v[idx] for f, v in self.arrays.items()}


class MappedSplit:
    """A source whose batches go through `fn` on the fly (derived features too big to keep)."""

    def __init__(self, source: Batches, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
        self.source, self.fn = source, fn
        self.num_rows = source.num_rows

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        for b in self.source.batches(batch_size, epoch=epoch, shuffle=shuffle):
            yield self.fn(b)


def derive(source: Batches, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], budget_mb: float,
           batch_size: int = 256) -> Batches:
    """Per-image features fn(batch) of a whole split: kept in RAM if under budget, else recomputed."""
    parts: dict[str, list[np.ndarray]] = {}
    used = 0
    for b in source.batches(batch_size, shuffle=False):
        out = fn(b)
        used += sum(v.nbytes for v in out.values())
        if used > budget_mb * 2**20:
            return MappedSplit(source, fn)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return ArraySplit({k: np.concatenate(v) for k, v in parts.items()}, seed=getattr(source, "seed", 0))


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        t = t.long() if k in ("label", "row") else t.float()
        out[k] = t.to(device)
    return out


# ----------------------------------------------------------------------------- validation split


@dataclass
class Validation:
    """The validation split of one fit: where it came from and its rows."""

    fraction: float
    seed: int
    source: str
    """carved (from the store's train split) | store (the store's own val split) | none."""
    rows: np.ndarray
    """Store rows of the validation images, sorted."""
    num_train: int
    """Train images left for fitting."""
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "source": self.source, "num_val": int(len(self.rows)),
                "num_train": self.num_train, "rows_file": VAL_ROWS if len(self.rows) else None, "notes": self.notes}


def check_val_fraction(fraction: float) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise ProtocacheError(f"val_fraction must be in [0, 1), got {fraction!r}; e.g. --val-fraction 0.1, "
                              "or 0 to train on the whole train split")
    return value


def carve_validation(train_rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, list[str]]:
    """Validation rows carved from `train_rows` (labels[i] is the label of train_rows[i]): sorted rows, notes.

    scikit-learn's stratified rule (`train_test_split(..., stratify=labels)`, ceil(fraction * n)
    images held out, each class in proportion), seeded by `seed`. A class with a single
    train image keeps it in train; when the held-out count cannot cover every class (or
    leave one of each in train), the rows are drawn uniformly instead. Both are noted.
    """
    from sklearn.model_selection import train_test_split

    train_rows = np.asarray(train_rows, dtype=np.int64)
    labels = np.asarray(labels)
    notes: list[str] = []
    if fraction <= 0 or train_rows.size == 0:
        return np.zeros(0, dtype=np.int64), notes
    classes, counts = np.unique(labels, return_counts=True)
    single = classes[counts < 2]
    if single.size:
        notes.append(f"class(es) {[int(c) for c in single]} have a single train image: kept in train, none in val")
    eligible = ~np.isin(labels, single)
    rows, y = train_rows[eligible], labels[eligible]
    if rows.size == 0:
        raise ProtocacheError("cannot carve a validation split: every class has a single train image; "
                              "pass --val-fraction 0 (fit option val_fraction: 0)")
    state = int(seed) % 2**32
    try:
        _, val = train_test_split(rows, test_size=fraction, random_state=state, stratify=y)
    except ValueError as exc:  # fewer held-out (or kept) images than classes
        notes.append(f"no stratified split possible ({exc}); val drawn uniformly at random instead")
        _, val = train_test_split(rows, test_size=fraction, random_state=state, shuffle=True)
    return np.sort(np.asarray(val, dtype=np.int64)), notes


def validation_split(store: Any, fraction: float, seed: int) -> Validation:
    """The validation split of a fit (see the module docstring)."""
    train = np.asarray(store.split_rows("train"), dtype=np.int64)
    if fraction <= 0:
        return Validation(0.0, seed, "none", np.zeros(0, dtype=np.int64), int(train.size), [])
    own = np.asarray(store.split_rows("val"), dtype=np.int64)
    if own.size:
        return Validation(fraction, seed, "store", own, int(train.size),
                          [f"the store has its own val split ({own.size} images): used as is, nothing carved "
                           "from train"])
    rows, notes = carve_validation(train, store.labels()[train], fraction, seed)
    return Validation(fraction, seed, "carved", rows, int(train.size - rows.size), notes)


def store_with_validation(store: Any, validation: Validation) -> Any:
    """The store as a recipe sees it: split "val" = the carved rows, "train" = the rest."""
    return with_val_rows(store, validation.rows) if validation.source == "carved" else store


# ----------------------------------------------------------------------------- context


class FitContext:
    """What a head's training procedure needs: the store, sources, device, logging, curves.

    `store` is the store as the fit sees it: split "train" holds only the rows fitted on and
    split "val" the validation rows (see the module docstring); a recipe never reads "test".
    """

    def __init__(self, store: FeatureStore, info: StoreInfo, fit: FitConfig, device: torch.device,
                 log: Callable[[str], None], num_val: int = 0):
        self.store, self.info, self.fit, self.device, self.log = store, info, fit, device, log
        self.num_val = num_val
        """Images in split "val" (0: no validation split, val_fraction 0)."""
        self.loss_curve: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._epoch_counter = 0
        self._sources: dict[tuple, StoreSplit] = {}

    def split(self, split: str, fields: tuple[str, ...]) -> StoreSplit:
        """Batches of `fields` over split "train" (the rows fitted on) or "val"."""
        key = (split, tuple(fields))
        if key not in self._sources:
            self._sources[key] = StoreSplit(self.store, split, fields, seed=self.fit.seed,
                                            shards_in_memory=self.fit.shards_in_memory)
        return self._sources[key]

    def derive(self, source: Batches, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Batches:
        """Per-image features fn(batch) of a source, kept in RAM within `feature_cache_mb`."""
        return derive(source, fn, self.fit.feature_cache_mb)

    def accuracy(self, head: Head, source: Batches) -> float:
        """Top-1 accuracy (fraction) of `head` on `source`."""
        return accuracy(head, source, self.device)

    def val_accuracy(self, head: Head) -> float | None:
        """Top-1 accuracy (fraction) of `head` on the validation split; None without one (val_fraction 0)."""
        if not self.num_val:
            return None
        return accuracy(head, self.split("val", head_fields(head)), self.device)

    @staticmethod
    def val_text(value: float | None) -> str:
        """A recorded validation accuracy for a log line ("no val split" for None)."""
        return val_text(value)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return to_torch(batch, self.device)

    def numpy_rng(self, salt: int) -> np.random.Generator:
        """A numpy generator of its own for a recipe's random draws (e.g. mixup), seeded by the fit seed."""
        return np.random.default_rng(_epoch_seed(self.fit.seed, salt))

    def next_epoch(self) -> int:
        """A fresh epoch number for batch shuffling (distinct across stages)."""
        self._epoch_counter += 1
        return self._epoch_counter

    def torch_generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(_epoch_seed(self.fit.seed, 10_000 + salt))

    def progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                    disable=not self.fit.progress, dynamic_ncols=True)

    def train(self, stage: str, source: Batches, optimizer: torch.optim.Optimizer, epochs: int, batch_size: int,
              step: Callable[[dict[str, torch.Tensor], float], torch.Tensor],
              after_step: Callable[[], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> None:
        """The shared loop: step(batch, epoch_progress) -> loss; records a loss per epoch."""
        steps = math.ceil(source.num_rows / batch_size)
        started = time.perf_counter()
        with self.progress(epochs * steps, stage) as bar:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for i, b in enumerate(source.batches(batch_size, epoch=self.next_epoch(), shuffle=True)):
                    batch = to_torch(b, self.device)
                    loss = step(batch, epoch + i / steps)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if after_step is not None:
                        after_step()
                    n = len(batch["label"])
                    total += float(loss.detach()) * n
                    count += n
                    bar.update(1)
                mean = total / max(count, 1)
                self.loss_curve.append({"stage": stage, "epoch": epoch, "loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}")
                if after_epoch is not None:
                    after_epoch(epoch)
        self.log(f"{stage}: {epochs} epoch(s), {epochs * steps} steps of batch {batch_size}, "
                 f"final loss {self.loss_curve[-1]['loss']:.4f} ({time.perf_counter() - started:.1f}s)")


# ----------------------------------------------------------------------------- accuracy


@torch.no_grad()
def accuracy(head: Head, source: Batches, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) of the head on a source of tokens/pooled + labels."""
    was_training = head.training
    head.eval()
    correct = total = 0
    for b in source.batches(batch_size, shuffle=False):
        batch = to_torch(b, device)
        logits = head(batch.get("tokens"), pooled=batch.get("pooled"))
        correct += int((logits.argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    head.train(was_training)
    return correct / max(total, 1)


def val_text(value: float | None) -> str:
    """A recorded validation accuracy for a log line."""
    return "no val split" if value is None else f"val accuracy {value:.4f}"


def head_fields(head: Head) -> tuple[str, ...]:
    """The store fields a head's forward pass reads, with the labels."""
    return tuple(head.inputs) + ("label",)


# ----------------------------------------------------------------------------- entry point


def open_complete_store(path: str | Path) -> FeatureStore:
    store = FeatureStore.open(path)
    missing = store.missing_shards()
    if missing:
        raise MissingShardError(f"{store.path}: shard(s) {missing} are not written; finish `protocache extract` "
                                "before fitting a head.")
    return store


def write_val_rows(run_dir: Path, rows: np.ndarray) -> None:
    """RUN/val_rows.npy (int64 store rows) through a temporary file; removed when there is no val split."""
    path = Path(run_dir) / VAL_ROWS
    if not len(rows):
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, np.asarray(rows, dtype=np.int64), allow_pickle=False)
    tmp.replace(path)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("protocache")
    except Exception:  # noqa: BLE001 - source tree without install
        return "0+unknown"


def fit_head(name: str, store_path: str | Path, out: str | Path, head_config: dict[str, Any] | None = None,
             fit: FitConfig | None = None, *, store: Any = None,
             extra_config: dict[str, Any] | None = None) -> FitResult:
    """Fit head `name` on the store and write RUN/ (weights, config, metrics, log).

    `store` may be an already opened store (or a wrapper with the same API, e.g. the
    ablation's shared reader); `extra_config` is merged into config.json.
    """
    fit = fit or FitConfig()
    head_class(name)  # unknown names fail before any work
    overrides = dict(head_config or {})
    if fit.epochs is not None:
        overrides["epochs"] = fit.epochs
    if store is None:
        store = open_complete_store(store_path)
    elif store.missing_shards():
        raise MissingShardError(f"{store.path}: shard(s) {store.missing_shards()} are not written; "
                                "finish `protocache extract` before fitting a head.")
    info = store_info(store)
    config = resolve_config(name, info, overrides)  # unknown keys fail before the run folder is touched
    validation = validation_split(store, check_val_fraction(fit.val_fraction), fit.seed)
    run_dir = run_files.prepare_run_dir(out, store.path, store.fingerprint)
    echo = (lambda m: print(m, file=sys.stderr, flush=True)) if fit.progress else None
    log = run_files.RunLog(run_dir, echo=echo)
    pin_threads(fit.threads)
    seed_everything(fit.seed)
    device = resolve_device(fit.device)
    started = time.perf_counter()
    log(f"fit-head {name} on {store.path} ({info.num_train} train images, {info.num_classes} classes, "
        f"tokens {info.num_tokens} x {info.dim}) -> {run_dir}; device {device}, seed {fit.seed}, "
        f"{torch.get_num_threads()} threads")
    log(f"head config: {asdict(config)}")
    if validation.source == "none":
        log("validation: none (val_fraction 0): choices made while fitting see only the train split")
    else:
        log(f"validation: {len(validation.rows)} images ({validation.source}, fraction {validation.fraction}, "
            f"seed {validation.seed}); {validation.num_train} train images left for fitting")
    for note in validation.notes:
        log(f"validation: {note}")
    head = head_class(name)(info, config).to(device)
    head.train()
    ctx = FitContext(store_with_validation(store, validation), info, fit, device, log, num_val=len(validation.rows))
    head.fit(ctx)
    head.eval()
    fields = head_fields(head)
    train_acc = accuracy(head, ctx.split("train", fields), device, fit.eval_batch_size)
    val_acc = accuracy(head, ctx.split("val", fields), device, fit.eval_batch_size) if ctx.num_val else None
    test_acc = accuracy(head, ctx.split("test", fields), device, fit.eval_batch_size)
    seconds = time.perf_counter() - started
    metrics = {
        "head": name,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "num_train": ctx.split("train", ("label",)).num_rows,
        "num_val": ctx.num_val,
        "num_test": ctx.split("test", ("label",)).num_rows,
        "prototype_count": head.prototype_count,
        "loss_curve": ctx.loss_curve,
        "seconds": seconds,
        **head.extra_metrics(),
        **ctx.extra,
    }
    config_json = {
        "format": RUN_FORMAT,
        "head": name,
        "head_config": asdict(config),
        "fit": asdict(fit),
        "validation": validation.to_json(),
        "store": {"path": str(Path(store.path).resolve()), "fingerprint": store.fingerprint,
                  "info": info.to_json()},
        "versions": {"protocache": _package_version(), "torch": torch.__version__.split("+")[0]},
        **(extra_config or {}),
    }
    run_files.save_tensors(run_dir / run_files.WEIGHTS, head.state_dict(),
                           metadata={"head": name, "format": str(RUN_FORMAT)})
    run_files.write_json(run_dir / run_files.CONFIG, config_json)
    write_val_rows(run_dir, validation.rows)  # before metrics.json: a finished run always has its val rows
    run_files.write_json(run_dir / run_files.METRICS, metrics)
    log(f"{name}: train accuracy {train_acc:.4f}, {val_text(val_acc)}, test accuracy {test_acc:.4f}, "
        f"{head.prototype_count} prototypes, {seconds:.1f}s")
    return FitResult(str(run_dir), name, metrics, config_json, head)
