"""What protocache owns on disk, and how it replaces what it owns.

Every folder protocache writes carries a mark that says so:

    feature store   zarr.json whose attributes hold "protocache"
    run folder      config.json with the run "format" key
    exported model  a zip archive holding protocache.json, and OUT.json beside it (files, not folders)
    sweep folder    sweep.json
    report folder   report.json

A replacing write (``extract --overwrite``, a re-fit, a re-explain) replaces only a folder
that carries its mark; anything else is refused with what was found there, and nothing
is deleted.

A folder that replaces a previous one is built in a hidden sibling (``.NAME.partial``)
and swapped in by rename once complete (an atomic exchange where the system has one), so
a failed or killed write leaves the previous folder whole, and the retry removes the
leftover sibling and starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from .errors import ProtocacheError

SWEEP_MARKER = "sweep.json"
STORE_ATTRS_KEY = "protocache"  # == layout.ATTRS_KEY (kept here so this module imports nothing heavy)
# A store's own top-level entries (any other Zarr node inside it counts as its own too).
STORE_ENTRIES = ("zarr.json", "meta", "views", "tokens", "pooled", "logits")


def staging_path(final: str | Path) -> Path:
    """The hidden sibling a replacement of `final` is built in."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _old_path(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def restore_interrupted(final: str | Path) -> None:
    """Finish a swap cut short between its two renames (systems without an atomic exchange):
    the previous folder, parked as `.NAME.old`, goes back in place if `final` is missing."""
    final = Path(final)
    old = _old_path(final)
    if old.is_dir():
        if not final.exists():
            old.rename(final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def fresh_staging(final: str | Path) -> Path:
    """An empty staging folder for a replacement of `final` (leftovers of a killed write removed)."""
    final = Path(final)
    restore_interrupted(final)
    staging = staging_path(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(staging: str | Path, final: str | Path) -> None:
    """Put the complete folder `staging` in place of `final` (which may be missing).

    At every moment `final` is either the whole previous folder or the whole new one
    (without an atomic exchange: a kill between the two renames parks the previous folder
    as `.NAME.old`, which `restore_interrupted` puts back)."""
    staging, final = Path(staging), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        staging.rename(final)
        return
    if _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    old = _old_path(final)
    if old.exists():
        shutil.rmtree(old)
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def replace_file(path: str | Path, write, suffix: str | None = None) -> None:
    """Write a file through a hidden temporary sibling: `write(tmp_path)` then rename over `path`.
    The sibling keeps the suffix (`.model.tmp.pt2`), or ends in `suffix`, for writers that look at it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix if suffix is None else suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_contents(names: Iterable[str], limit: int = 4) -> str:
    """'notes.txt, thesis/' or 'a.png, b.png, c.png, d.png and 92 more' (hidden names left out)."""
    names = sorted(n for n in names if not n.startswith("."))
    if not names:
        return "only hidden files"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _entries(path: Path) -> list[str]:
    return [p.name + ("/" if p.is_dir() else "") for p in path.iterdir()]


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# ----------------------------------------------------------------------------- the marks


def read_json_dict(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_folder(path: str | Path) -> bool:
    """A run folder protocache wrote: config.json holding the run format key."""
    config = read_json_dict(Path(path) / "config.json")
    return bool(config) and "format" in config and "head" in config


def is_sweep_folder(path: str | Path) -> bool:
    return (Path(path) / SWEEP_MARKER).is_file()


def foreign_store_entries(fs: Any, root: str) -> list[str] | None:
    """None when `root` is not a protocache store; else the entries in it that are not the store's own
    (zarr.json, meta/, views/, hidden leftovers of writes, and Zarr nodes such as tokens/)."""
    try:
        attrs = json.loads(fs.cat(f"{root}/zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if STORE_ATTRS_KEY not in attrs:
        return None
    foreign = []
    for entry in fs.ls(root, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name in STORE_ENTRIES or name.startswith("."):
            continue
        if not fs.exists(f"{root}/{name}/zarr.json"):
            foreign.append(name + ("/" if fs.isdir(f"{root}/{name}") else ""))
    return foreign


def check_store_replaceable(fs: Any, root: str, where: str) -> None:
    """Refuse (naming what is there) unless `root` is missing, an empty folder or a protocache store
    holding nothing but its own files: the only things `extract --overwrite` may delete."""
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise ProtocacheError(f"--overwrite: {where} is a file, not a feature store; nothing was deleted. "
                              "Choose another --out.")
    names = [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] + ("/" if e.get("type") == "directory" else "")
             for e in fs.ls(root, detail=True)]
    if not names:
        return
    foreign = foreign_store_entries(fs, root)
    if foreign is None:
        raise ProtocacheError(f"--overwrite: {where} is not a protocache feature store (it holds "
                              f"{describe_contents(names)}); nothing was deleted. Choose another --out, "
                              "or empty that folder yourself.")
    if foreign:
        raise ProtocacheError(f"--overwrite: the feature store {where} also holds files that are not its own "
                              f"({describe_contents(foreign)}); nothing was deleted. Move them out first, "
                              "or choose another --out.")


def remove_store(fs: Any, root: str) -> None:
    """Delete a store `check_store_replaceable` accepted, its zarr.json last: a kill part-way leaves a
    folder that is still recognised as a store, so `extract --overwrite` can finish the job."""
    for entry in fs.ls(root, detail=False):
        if str(entry).rstrip("/").rsplit("/", 1)[-1] != "zarr.json":
            fs.rm(entry, recursive=True)
    if fs.exists(f"{root}/zarr.json"):
        fs.rm(f"{root}/zarr.json")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def check_extract_out(out: str | Path, root: str | Path | None, overwrite: bool) -> None:
    """extract's checks of --out, before anything is read or written: not the dataset folder, not
    inside it, and with --overwrite nothing but a store of ours (or an empty folder) to replace."""
    import fsspec

    check_out_outside_root(out, root)
    if overwrite:
        fs, path = fsspec.core.url_to_fs(str(out))
        check_store_replaceable(fs, path, str(out))


def check_out_outside_root(out: str | Path, root: str | Path | None, option: str = "--out") -> None:
    """Refuse an output folder equal to, inside, or holding the dataset folder (checked before any work)."""
    if root is None or "://" in str(out) or "://" in str(root):
        return
    o = Path(out).expanduser().resolve()
    r = Path(root).expanduser().resolve()
    if o == r or r in o.parents:
        raise ProtocacheError(f"{option} {out} is {'the dataset folder' if o == r else 'inside the dataset folder'} "
                              f"--root {root}; write the store outside the dataset (e.g. cache/...).")
    if o in r.parents:
        raise ProtocacheError(f"{option} {out} holds the dataset folder --root {root}; write the store to a folder "
                              "of its own outside the dataset.")


def check_new_folder_place(path: Path, kind: str, option: str = "--out") -> None:
    """Refuse a folder to be written under a file or inside a feature store (whose files `verify` and
    `--overwrite` treat as the store's own)."""
    for parent in Path(path).expanduser().absolute().parents:
        if parent.is_file():
            raise ProtocacheError(f"{option} {path}: {parent} is a file, so no {kind} can be written under it; "
                                  f"choose another {option}")
        if foreign_store_entries(_local_fs(), str(parent)) is not None:
            raise ProtocacheError(f"{option} {path} is inside the feature store {parent}; write the {kind} to a "
                                  f"folder of its own (e.g. runs/...)")


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def refuse_foreign_folder(path: Path, kind: str, option: str = "--out") -> None:
    """The error for a non-empty folder that is not a `kind` protocache wrote."""
    raise ProtocacheError(f"{path} exists, is not empty and is not a {kind} (it holds "
                          f"{describe_contents(_entries(path))}); nothing was changed. Choose another {option}.")
