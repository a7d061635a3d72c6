"""Export stage: a trained run (backbone + head) as one program that loads with plain torch.

`protocache export RUN --out model.pt2` traces `load_model(RUN)` (pipeline/model.py): the
program takes preprocessed images [N, 3, H, W] (float32, any N) and returns logits [N, C],
computed as the cached path computes them (the store's precision, float16-rounded
features). It is a `torch.export` program (`torch.export.export` + `torch.export.save`);
only where export cannot trace the model does it fall back to TorchScript
(`torch.jit.trace` + `torch.jit.save`), and says so. Beside it, `OUT.json` (and the same
JSON inside the archive, as the extra file `protocache.json`) holds the class names, the
preprocessing config (resize rule, input size, interpolation, mean, std), the program's
format and how to load it:

    import torch
    program = torch.export.load("model.pt2").module()   # TorchScript: torch.jit.load("model.pt2")
    logits = program(images)

Loading needs neither protocache nor timm. Both files are written through hidden
temporary siblings and renamed into place.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocache.stores.errors import ProtocacheError
from protocache.stores.owned import read_json_dict, replace_file

from .config import check_values

FORMATS = ("auto", "export", "torchscript")
EXTRA_FILE = "protocache.json"


@dataclass
class ExportConfig:
    """A run (backbone + head) as one program plain torch loads: preprocessed images -> logits."""

    run: str = ""
    """A run folder written by `protocache fit-head`."""
    out: str = "model.pt2"
    """The program file; its metadata (class names, preprocessing) goes beside it as OUT.json."""
    format: str = "auto"
    """auto (torch.export, TorchScript only where export fails) | export | torchscript."""
    device: str = "cpu"
    """Device the program is traced on; its weights stay there (auto | cpu | cuda | cuda:N)."""
    weights: str | None = None
    """Backbone weights (a checkpoint path) where the run's store was extracted from a local file;
    their SHA-256 must equal the store's (default: the weights source the store recorded)."""

    def validate(self) -> None:
        check_values(self, "export", flags=True)
        if not self.run:
            raise ProtocacheError("export: name a run folder (written by `protocache fit-head`)")
        if self.format not in FORMATS:
            raise ProtocacheError(f"export: --format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        out = Path(self.out).expanduser()
        if out.is_dir() or self.out.endswith(("/", os.sep)):
            raise ProtocacheError(f"export: --out {self.out} is a folder; name the program file, e.g. "
                                  f"--out {Path(self.out) / 'model.pt2'}")
        for path, ours in ((out, is_exported_program), (sidecar_path(out), is_export_sidecar)):
            if path.exists() and not ours(path):  # a re-export replaces only what export wrote
                raise ProtocacheError(f"export: {path} exists and was not written by `protocache export`, so it "
                                      "is not replaced; choose another --out (or move that file away)")
        folder = out.absolute().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ProtocacheError(f"export: cannot write --out {self.out} ({folder} is not a folder this process "
                                  "may write in); choose another --out")


@dataclass
class ExportResult:
    path: str
    """The program file."""
    metadata_path: str
    """The JSON sidecar."""
    format: str
    """torch.export or torchscript."""
    fallback_reason: str | None
    """Why torch.export was not used (None when it was)."""
    max_abs_difference: float
    """Largest |logit difference| of the saved program, loaded back, against load_model on example images."""
    seconds: float


def sidecar_path(out: Path) -> Path:
    """OUT.json: the program's metadata beside it."""
    return out.with_name(out.name + ".json")


def is_exported_program(path: Path) -> bool:
    """A program file export wrote: a zip archive (torch.export and TorchScript alike) holding EXTRA_FILE."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == EXTRA_FILE for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def is_export_sidecar(path: Path) -> bool:
    """An OUT.json export wrote: a JSON object with its "format", "load" and "class_names"."""
    data = read_json_dict(path)
    return data is not None and {"format", "load", "class_names"} <= data.keys()


def example_images(model, n: int = 2) -> torch.Tensor:
    """Seeded normalised-range images at the model's input size (tracing does not depend on values)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, *model.input_size, generator=generator).to(model.device)


def metadata(model, fmt: str, fallback_reason: str | None) -> dict[str, Any]:
    """What a user of the program needs besides torch: classes, preprocessing, how to load it."""
    load = "torch.export.load(PATH).module()" if fmt == "torch.export" else "torch.jit.load(PATH)"
    return {
        "format": fmt,
        "fallback_reason": fallback_reason,
        "load": f"import torch; program = {load}; logits = program(images)",
        "input": {"shape": ["N", 3, *model.input_size], "dtype": "float32",
                  "preprocessing": "decode to 8-bit RGB, resize by `preprocessing.resize` (timm: the backbone's eval "
                                   "resize + centre crop; stretch: straight to the input size), scale to [0, 1], "
                                   "then (x - mean) / std per channel"},
        "output": {"shape": ["N", model.num_classes], "meaning": "logits; softmax gives class probabilities"},
        "class_names": list(model.class_names),
        "preprocessing": dict(model.preprocessing),
        "head": model.run_config["head"],
        "backbone": model.fingerprint["backbone"],
        "weights_source": model.fingerprint["weights_source"],
        "weights_sha256": model.weights_sha256,
        "precision": model.precision,
        "run": str(model.run_dir.resolve()),
        "torch": torch.__version__,
    }


def _torch_export(model, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})


def _loaded_difference(path: Path, fmt: str, model, example: torch.Tensor) -> float:
    with torch.inference_mode(), open(path, "rb") as fh:  # (an open file: torch.export.load warns on names not *.pt2)
        program = torch.export.load(fh).module() if fmt == "torch.export" else torch.jit.load(fh)
        got = program(example)
        want = model(example)
    return float((got.float() - want.float()).abs().max())


def export_run(cfg: ExportConfig) -> ExportResult:
    """Trace load_model(cfg.run) into one program file and write its JSON metadata beside it."""
    from .model import load_model

    started = time.perf_counter()
    cfg.validate()
    out = Path(cfg.out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProtocacheError(f"export: cannot create {out.parent} for --out ({exc.strerror}); "
                              "choose another --out") from None
    model = load_model(cfg.run, device=cfg.device, weights=cfg.weights)
    example = example_images(model)
    fmt, reason, program = "torch.export", None, None
    if cfg.format in ("auto", "export"):
        try:
            program = _torch_export(model, example)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: fall back (auto) or report it (export)
            reason = f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if cfg.format == "export":
                raise ProtocacheError(f"export: {reason}; try --format torchscript") from None
    with warnings.catch_warnings():
        # TorchScript's deprecation notices (the fallback is announced by ExportResult), and the archive's
        # note on channels-last weights sharing storage groups (they are saved whole: checked by loading back).
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the load-back check below judges
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        if program is None:
            fmt = "torchscript"
            reason = reason or "asked for with --format torchscript"
            with torch.no_grad():
                program = torch.jit.trace(model, example, check_trace=False)
        info = metadata(model, fmt, reason)
        text = json.dumps(info, indent=2)
        if fmt == "torch.export":  # (its temporary file ends in .pt2, the suffix torch.export.save expects)
            replace_file(out, lambda tmp: torch.export.save(program, str(tmp), extra_files={EXTRA_FILE: text}),
                         suffix=".pt2")
        else:
            replace_file(out, lambda tmp: torch.jit.save(program, str(tmp), _extra_files={EXTRA_FILE: text}))
        sidecar = sidecar_path(out)
        replace_file(sidecar, lambda tmp: tmp.write_text(text))
        difference = _loaded_difference(out, fmt, model, example_images(model, 3))  # another batch size
    return ExportResult(str(out), str(sidecar), fmt, reason if fmt != "torch.export" else None, difference,
                        time.perf_counter() - started)
