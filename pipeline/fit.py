"""Fit stage: the generic machinery every head's training recipe uses, and `fit_head`.

A head's recipe (its ``fit(ctx)`` method, in its own file under pipeline/heads/) asks the
``FitContext`` for batch sources over the store and runs the shared training loop;
``fit_head`` builds the head, runs its recipe, measures accuracy and writes the run folder
through ``stores/runs.py``.

Data comes from the store in batches (pipeline/sources.py): memory stays bounded by
`shards_in_memory` shards of tokens plus `feature_cache_mb` of derived per-image features
(ProtoQuant presence with frozen codes, ProtoPool slot similarities for last-layer tuning,
pooled features for the probe).

Validation (pipeline/validation.py): `val_fraction` of the store's train split is carved out as split "val"
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
from typing import Any, Callable, Mapping

import numpy as np
import torch

from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import MissingShardError, ProtocacheError

from .config import build_config, check_values
from .heads import Head, StoreInfo, head_class, resolve_config, store_info
from .runtime import fit_settings, resolve_device, seed_everything
# (ArraySplit, MappedSplit and Validation are re-exported: the recipe-facing names of the fit stage)
from .sources import ArraySplit, Batches, MappedSplit, StoreSplit, derive, epoch_seed, to_torch  # noqa: F401
from .sources import backbone_labelled, with_backbone_labels
from .validation import VAL_ROWS, Validation, check_val_fraction, store_with_validation, validation_split  # noqa: F401

RUN_FORMAT = run_files.RUN_FORMAT


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

    def validate(self) -> None:
        """Every option of its type and in its range (pipeline/config.py's rules), before any work."""
        if isinstance(self.val_fraction, (int, float)) and not isinstance(self.val_fraction, bool):
            check_val_fraction(self.val_fraction)  # its own message: what 0 means
        check_values(self, "fit", noun="option")


@dataclass
class FitResult:
    run_dir: str
    head: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    model: Head | None = None
    """The fitted head itself (eval mode), so callers need not reload it from the run folder."""


# ----------------------------------------------------------------------------- context


class FitContext:
    """What a head's training procedure needs: the store, sources, device, logging, curves.

    `store` is the store as the fit sees it: split "train" holds only the rows fitted on and
    split "val" the validation rows (see the module docstring); a recipe never reads "test".
    """

    def __init__(self, store: FeatureStore, info: StoreInfo, fit: FitConfig, device: torch.device,
                 log: Callable[[str], None], num_val: int = 0, group: Any = None):
        self.store, self.info, self.fit, self.device, self.log = store, info, fit, device, log
        self.num_val = num_val
        """Images in split "val" (0: no validation split, val_fraction 0)."""
        self.group = group
        """The ablation read pass this fit trains in (pipeline/ablate_vectorised.py), or None."""
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
        return np.random.default_rng(epoch_seed(self.fit.seed, salt))

    def next_epoch(self) -> int:
        """A fresh epoch number for batch shuffling (distinct across stages)."""
        self._epoch_counter += 1
        return self._epoch_counter

    def torch_generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(epoch_seed(self.fit.seed, 10_000 + salt))

    def progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                    disable=not self.fit.progress, dynamic_ncols=True)

    def train(self, stage: str, source: Batches, optimizer: torch.optim.Optimizer, epochs: int, batch_size: int,
              step: Callable[[dict[str, torch.Tensor], float], torch.Tensor],
              after_step: Callable[[], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> None:
        """The shared loop: step(batch, epoch_progress) -> loss; records a loss per epoch.

        In an ablation read pass the group runs this loop together with the same loop of its other
        heads (one read of each batch for all, vectorised where the step is a StackedStep)."""
        if self.group is not None:
            return self.group.train(self, stage, source, optimizer, epochs, batch_size, step,
                                    after_step=after_step, after_epoch=after_epoch)
        steps = math.ceil(source.num_rows / batch_size)
        started = time.perf_counter()
        with self.progress(epochs * steps, stage) as bar:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for i, b in enumerate(source.batches(batch_size, epoch=self.next_epoch(), shuffle=True)):
                    batch = to_torch(b, self.device)
                    loss = step(batch, epoch + i / steps)
                    value = float(loss.detach())
                    if not math.isfinite(value):  # stop before the weights take a NaN step; no run is written
                        raise loss_diverged(stage, value, epoch, i)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if after_step is not None:
                        after_step()
                    n = len(batch["label"])
                    total += value * n
                    count += n
                    bar.update(1)
                mean = total / max(count, 1)
                self.loss_curve.append({"stage": stage, "epoch": epoch, "loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}")
                if after_epoch is not None:
                    after_epoch(epoch)
        self.log(f"{stage}: {epochs} epoch(s), {epochs * steps} steps of batch {batch_size}, "
                 f"final loss {self.loss_curve[-1]['loss']:.4f} ({time.perf_counter() - started:.1f}s)")


def loss_diverged(stage: str, value: float, epoch: int, step: int) -> ProtocacheError:
    """The error that stops a fit whose loss became NaN/Inf (epoch and step counted from 0)."""
    return ProtocacheError(
        f"{stage}: the loss is {value} at epoch {epoch + 1}, step {step + 1}: training diverged "
        "and was stopped, nothing was written. Lower the learning rate (e.g. --set lr=...), "
        "and check the store with `protocache verify`.")


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
             extra_config: dict[str, Any] | None = None, replace: bool = False, group: Any = None) -> FitResult:
    """Fit head `name` on the store and write RUN/ (weights, config, metrics, log).

    The run is written into a hidden sibling and renamed into place when complete, so a
    failed or killed re-fit leaves the previous run whole. `replace` lets the fit replace a
    run fitted on another store (ablate re-training a stale point); fit-head refuses that.

    `store` may be an already opened store (or a wrapper with the same API, e.g. the
    ablation's shared reader); `extra_config` is merged into config.json; `group` is the
    ablation read pass whose heads train together (FitContext.train).
    """
    if isinstance(fit, Mapping):  # the options as a dict, as a YAML `fit:` block holds them
        fit = build_config(FitConfig, dict(fit), "fit_head: fit", noun="option")
    fit = fit or FitConfig()
    if not isinstance(fit, FitConfig):
        raise ProtocacheError(f"fit_head: fit is a FitConfig (or a dict of its options), got {type(fit).__name__}")
    if head_config is not None and not isinstance(head_config, Mapping):
        raise ProtocacheError(f"fit_head: head_config is a dict of the head's config keys, got {head_config!r}")
    if not isinstance(out, (str, Path)) or not str(out):
        raise ProtocacheError(f"fit_head: out is the run folder to write (a path), got {out!r}")
    fit.validate()
    resolve_device(fit.device)  # a device this machine lacks fails before the run folder is touched
    try:
        with fit_settings(fit.threads):  # the caller's thread count and kernel choice come back after the fit
            return _fit_head(name, store_path, out, head_config, fit, store=store, extra_config=extra_config,
                             replace=replace, group=group)
    finally:
        run_files.end_run(out)  # (a no-op after finish_run; after a failure the staging folder is unlocked)


def _fit_head(name: str, store_path: str | Path, out: str | Path, head_config: dict[str, Any] | None,
              fit: FitConfig, *, store: Any, extra_config: dict[str, Any] | None, replace: bool,
              group: Any) -> FitResult:
    head_class(name)  # unknown names fail before any work
    overrides = dict(head_config or {})
    if fit.epochs is not None:
        overrides["epochs"] = fit.epochs
    requested = build_config(head_class(name).config_class, overrides, f"head {name!r}")  # checked before the store
    if store is None:
        store = open_complete_store(store_path)
    elif store.missing_shards():
        raise MissingShardError(f"{store.path}: shard(s) {store.missing_shards()} are not written; "
                                "finish `protocache extract` before fitting a head.")
    if getattr(requested, "target", "labels") == "backbone" and not backbone_labelled(store):
        store = with_backbone_labels(store)  # explain the backbone: its top-1 is the label
    info = store_info(store)
    config = resolve_config(name, info, overrides)  # unknown keys fail before the run folder is touched
    validation = validation_split(store, check_val_fraction(fit.val_fraction), fit.seed)
    run_dir = run_files.prepare_run_dir(out, store.path, store.fingerprint, replace=replace)
    staging = run_files.begin_run(run_dir)  # written here, renamed to run_dir when complete
    echo = (lambda m: print(m, file=sys.stderr, flush=True)) if fit.progress else None
    log = run_files.RunLog(staging, echo=echo)
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
    ctx = FitContext(store_with_validation(store, validation), info, fit, device, log, num_val=len(validation.rows),
                     group=group)
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
    if (store.attrs.get("labels") or {}).get("source") == "backbone":  # labels = the backbone's top-1
        metrics.update(backbone_agreement=test_acc, backbone_agreement_val=val_acc)
    config_json = {
        "format": RUN_FORMAT,
        "head": name,
        "head_config": asdict(config),
        "fit": asdict(fit),
        "validation": validation.to_json(),
        "labels": store.attrs.get("labels") or {"source": "dataset"},
        "store": {"path": str(Path(store.path).resolve()), "fingerprint": store.fingerprint,
                  "info": info.to_json()},
        "versions": {"protocache": _package_version(), "torch": torch.__version__.split("+")[0]},
        **(extra_config or {}),
    }
    run_files.save_tensors(staging / run_files.WEIGHTS, head.state_dict(),
                           metadata={"head": name, "format": str(RUN_FORMAT)})
    run_files.write_json(staging / run_files.CONFIG, config_json)
    write_val_rows(staging, validation.rows)  # before metrics.json: a finished run always has its val rows
    run_files.write_json(staging / run_files.METRICS, metrics)
    log(f"{name}: train accuracy {train_acc:.4f}, {val_text(val_acc)}, test accuracy {test_acc:.4f}, "
        f"{head.prototype_count} prototypes, {seconds:.1f}s")
    run_files.finish_run(staging, run_dir)
    return FitResult(str(run_dir), name, metrics, config_json, head)
