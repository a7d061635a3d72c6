"""Load a finished run folder back as a head, and see its store split as the fit did:
what evaluate, explain, ablate and predict read.

`open_run_store` is the one door to a run's store: it refuses a store whose fingerprint is
no longer the one the run was fitted on (re-extracted with other weights, images, views...),
naming the fields that differ, so no head is ever measured or drawn on features it was not
fitted on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protocache.stores import runs as run_files
from protocache.stores.errors import ProtocacheError
from protocache.stores.fingerprint import difference_line

from .heads import Head, StoreInfo, create_head
from .runtime import resolve_device


class Run(NamedTuple):
    """A fitted head (eval mode) with the run's config.json and metrics.json."""

    head: Head
    config: dict[str, Any]
    metrics: dict[str, Any]


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """The head of a finished run, rebuilt from its resolved config and weights; no store is opened."""
    config, metrics = run_files.read_run(run_dir)
    info = StoreInfo.from_json(config["store"]["info"])
    head = create_head(config["head"], info, **config["head_config"])
    head.load_weights(run_files.load_tensors(Path(run_dir) / run_files.WEIGHTS))
    return Run(head.to(resolve_device(device)).eval(), config, metrics)


def store_difference(config: dict[str, Any], store: Any) -> str | None:
    """None when `store` has the fingerprint the run (its config.json) recorded at fit time; otherwise
    one line naming each differing field, its value at fit time and now."""
    recorded = (config.get("store") or {}).get("fingerprint") or {}
    return difference_line(recorded, dict(store.fingerprint), "at fit time")


def check_run_store(run_dir: str | Path, config: dict[str, Any], store: Any) -> None:
    """Raise RunMismatch unless `store` still has the fingerprint run `run_dir` was fitted on."""
    difference = store_difference(config, store)
    fitted_on = (config.get("store") or {}).get("path")
    if difference and fitted_on and Path(str(fitted_on)).resolve() != Path(str(store.path)).resolve():
        raise run_files.RunMismatch(
            f"{run_dir} was fitted on another store ({fitted_on}), not on {store.path} (fingerprint fields that "
            f"differ: {difference}); use a run fitted on {store.path}, or refit the run on it (`protocache fit-head`)")
    if difference:
        raise run_files.RunMismatch(
            f"{run_dir} was fitted on {store.path} before it was re-extracted with other inputs, so its head "
            f"does not fit these features (fingerprint fields that differ: {difference}); refit the run on the "
            "store as it is now (`protocache fit-head`), or point it at the store it was fitted on.")


def open_run_store(run_dir: str | Path, config: dict[str, Any] | None = None, store: Any = None) -> Any:
    """The store run `run_dir` was fitted on (config.json's store path, unless `store` is given),
    checked against the fingerprint the run recorded, and split as the fit saw it ("val" = the
    fit's validation rows). What evaluate, explain and ablate read a run's features through."""
    from protocache.stores import FeatureStore

    config = config if config is not None else run_files.read_json(Path(run_dir) / run_files.CONFIG)
    if store is None:
        path = (config.get("store") or {}).get("path")
        if not path:
            raise ProtocacheError(f"{run_dir}/config.json names no store path; refit the run (`protocache fit-head`)")
        if "://" not in str(path) and not Path(path).exists():  # (a store on object storage says for itself)
            raise ProtocacheError(f"{run_dir} was fitted on the store at {path}, which is not there any more: move "
                                  "the store back there, or refit the run on it where it is now "
                                  "(`protocache fit-head`)")
        store = FeatureStore.open(path)
    check_run_store(run_dir, config, store)
    return run_splits(run_dir, store, config)


def val_rows(run_dir: str | Path, config: dict[str, Any] | None = None) -> np.ndarray | None:
    """The store rows of the run's validation split (sorted), or None when it had none
    (val_fraction 0, or a run fitted before validation splits existed)."""
    config = config if config is not None else run_files.read_json(Path(run_dir) / run_files.CONFIG)
    validation = config.get("validation") or {}
    name = validation.get("rows_file")
    if not name:
        return None
    path = Path(run_dir) / name
    if not path.exists():
        raise ProtocacheError(f"{path} is missing: the run's validation rows are gone; refit the run "
                              "(`protocache fit-head`)")
    rows = run_files.read_run_file(path, Path(run_dir), lambda p: np.load(p, allow_pickle=False))
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise ProtocacheError(f"{path} is damaged (not a list of row numbers); refit the run (`protocache fit-head`)")
    return rows


def run_splits(run_dir: str | Path, store: Any, config: dict[str, Any] | None = None) -> Any:
    """`store` split and labelled as the run's fit saw it: "val" = the run's validation rows, "train" =
    the train rows it fitted on, "test" unchanged; labels = the backbone's top-1 for a target=backbone
    run. The store itself when nothing was carved or relabelled."""
    config = config if config is not None else run_files.read_json(Path(run_dir) / run_files.CONFIG)
    if (config.get("labels") or {}).get("source") == "backbone":  # target=backbone: labels = the backbone's top-1
        from .sources import with_backbone_labels

        store = with_backbone_labels(store)
    if (config.get("validation") or {}).get("source") != "carved":
        return store
    rows = val_rows(run_dir, config)
    return store if rows is None else with_val_rows(store, rows, f"{run_dir}: ")


def with_val_rows(store: Any, rows: np.ndarray, where: str = "") -> Any:
    """A view of `store` whose train rows `rows` form split "val" (the rest of train stays "train")."""
    splits = np.asarray(store.metadata().column("split").to_pylist(), dtype=object)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(splits) or (splits[rows] != "train").any()):
        raise ProtocacheError(f"{where}the validation rows are not train rows of {store.path}; "
                              "was the run fitted on another store?")
    splits[rows] = "val"
    return store.with_splits(splits)


def split_rows(run_dir: str | Path, store: Any, split: str) -> np.ndarray:
    """Store rows of `split` ("train", "val", "test", ...) as the run's fit saw them."""
    rows = run_splits(run_dir, store).split_rows(split)
    if split == "val" and not len(rows):
        raise ProtocacheError(f"{run_dir} has no validation split (fitted with val_fraction 0); "
                              "refit with --val-fraction > 0 or evaluate --split test")
    return rows
