"""protocache stages: datasets, backbones, extract, codebook, heads, fit, evaluate, explain, ablate, predict,
export, bench."""

# The stages' entry points and their configs, imported on first use (PEP 562), so that importing a
# light module of this package (the CLI reads config help) does not load torch and timm:
#     from protocache.pipeline import load_model, run_extract, ExtractConfig
_EXPORTS = {
    "run_extract": "extract", "ExtractConfig": "extract",
    "fit_head": "fit", "FitConfig": "fit",
    "evaluate_run": "evaluate", "EvaluateConfig": "evaluate",
    "explain_run": "explain", "ExplainConfig": "explain",
    "run_ablate": "ablate", "AblateConfig": "ablate",
    "run_predict": "predict", "PredictConfig": "predict",
    "export_run": "export", "ExportConfig": "export",
    "load_model": "model", "ProtoModel": "model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
