"""The one config door: field docstrings as help, YAML and --set values, unknown keys and types."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from protocache.pipeline import config as C
from protocache.pipeline.fit import FitConfig
from protocache.pipeline.heads import ProtoQuantConfig
from protocache.stores.errors import ProtocacheError


@dataclass
class Example:
    """An example config."""

    size: int = 3
    """How many, at most."""
    rate: float | None = None
    """A rate; None: derived
    from the data."""
    undocumented: str = "x"


def test_field_docstrings_are_the_help():
    docs = C.field_docs(Example)
    assert docs == {"size": "How many, at most.", "rate": "A rate; None: derived from the data."}
    described = C.describe_fields(Example)
    assert described["size"] == {"default": 3, "type": "int", "help": "How many, at most."}
    assert described["rate"]["type"] == "float | None"
    assert C.field_default(Example, "undocumented") == "x"
    # every field of the real configs is documented
    for cls in (FitConfig, ProtoQuantConfig):
        assert set(C.field_docs(cls)) == set(cls.__dataclass_fields__)


def test_parse_overrides_reads_yaml_scalars():
    got = C.parse_overrides(["epochs=3", "tau=0.05", "train_codes=false", "init=orthogonal", "xs=[1, 2]", "l1=1e-4"])
    assert got == {"epochs": 3, "tau": 0.05, "train_codes": False, "init": "orthogonal", "xs": [1, 2], "l1": 1e-4}
    with pytest.raises(ProtocacheError, match="key=value"):
        C.parse_overrides(["epochs"])


def test_build_config_checks_keys_and_types():
    assert C.build_config(Example, {"size": 5, "rate": 1}, "example") == Example(size=5, rate=1.0)
    with pytest.raises(ProtocacheError, match=r"unknown config key\(s\) 'sise' for example \(did you mean 'size'\?\); "
                                              r"valid keys: size, rate, undocumented"):
        C.build_config(Example, {"sise": 5}, "example")
    with pytest.raises(ProtocacheError, match="example config key 'size' expects int, got 'many'"):
        C.build_config(Example, {"size": "many"}, "example")


def test_config_file_splits_head_keys_and_fit_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tau: 0.2\nl1: 1e-4\nfit:\n  seed: 3\n")
    assert C.read_config_file(path, FitConfig) == ({"tau": 0.2, "l1": 1e-4}, {"seed": 3})
    path.write_text("fit:\n  sed: 3\n")
    with pytest.raises(ProtocacheError, match=r"unknown fit option\(s\) \['sed'\] \(did you mean 'seed'\?\)"):
        C.read_config_file(path, FitConfig)
    path.write_text("[1, 2]\n")
    with pytest.raises(ProtocacheError, match="must hold a mapping"):
        C.read_config_file(path, FitConfig)
    with pytest.raises(ProtocacheError, match="does not exist"):
        C.read_config_file(tmp_path / "missing.yaml", FitConfig)


# ----------------------------------------------------------------------------- values by meaning


def all_config_classes() -> list[type]:
    from protocache.pipeline.ablate import AblateConfig
    from protocache.pipeline.bench import BenchConfig
    from protocache.pipeline.evaluate import EvaluateConfig
    from protocache.pipeline.explain.config import ExplainConfig
    from protocache.pipeline.extract import ExtractConfig
    from protocache.pipeline.heads import head_class, list_heads
    from protocache.pipeline.metrics import MetricConfig

    return [ExtractConfig, FitConfig, EvaluateConfig, MetricConfig, ExplainConfig, AblateConfig, BenchConfig,
            *(head_class(h).config_class for h in list_heads())]


def test_every_numeric_field_of_every_config_has_a_range():
    """A new numeric field must be given a meaning in VALUE_RULES (or a name that already has one)."""
    import dataclasses
    import typing

    missing = []
    for cls in all_config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            scalar = C._scalar_types(hints[f.name])
            if scalar and (int in scalar or float in scalar) and C.value_rule(f.name) is None:
                missing.append(f"{cls.__name__}.{f.name}")
        cls_default = cls(**({"store": "s", "grid_file": "g", "out": "o"} if "grid_file" in hints else
                             {"store": "s"} if "store" in hints else {}))
        C.check_values(cls_default, cls.__name__)  # every default is valid
    assert missing == []


@pytest.mark.parametrize("name, good, bad", [
    # hand-picked edges of each rule: the last allowed value and the first refused one
    ("epochs", [1], [0, -3]),
    ("codebook_epochs", [0], [-1]),            # a stage's own epochs: 0 skips the stage
    ("batch_size", [1], [0, -4]),
    ("shard_size", [16], [0, -16]),
    ("lr", [0.0, 1e-3], [-1.0, -1e-9]),
    ("tau", [1e-6], [0.0, -0.1]),
    ("val_fraction", [0.0, 0.99], [1.0, -0.1]),  # at least one train image is left
    ("patch_min_fraction", [0.0, 1.0], [1.01]),
    ("num_workers", [0], [-1]),
    ("topk_per_class", [0], [-1]),
    ("slots_per_class", [1], [0]),
])
def test_value_rules_by_name(name, good, bad):
    rule = C.value_rule(name)
    assert all(rule.ok(v) for v in good) and not any(rule.ok(v) for v in bad)


@dataclass
class Sized:
    """A config with rule-bearing names."""

    batch_size: int = 64
    """Images per batch."""
    lr: float | None = None
    """Learning rate; None: derived."""
    val_fraction: float = 0.1
    """Share held out."""
    rate: float = 0.5
    """No rule: any finite number."""
    flag: bool = False
    """Booleans are not numbers here."""


def test_check_values_messages_name_the_field_and_the_fix():
    C.check_values(Sized(), "x")
    C.check_values(Sized(rate=-5.0, flag=True), "x")  # no rule for `rate`: any finite number
    with pytest.raises(ProtocacheError, match=r"^x config key 'batch_size' must be an integer >= 1, got 0; "
                                              r"e.g. batch_size=64 \(the default\)$"):
        C.check_values(Sized(batch_size=0), "x")
    with pytest.raises(ProtocacheError, match=r"^tool: --batch-size must be an integer >= 1, got -4; "
                                              r"e.g. --batch-size 64 \(the default\)$"):
        C.check_values(Sized(batch_size=-4), "tool", flags=True)
    with pytest.raises(ProtocacheError, match=r"^fit option 'lr' must be a number >= 0, got -1.0; "
                                              r"leave it unset for the default$"):
        C.check_values(Sized(lr=-1.0), "fit", noun="option")
    with pytest.raises(ProtocacheError, match=r"'val_fraction' must be a number in \[0, 1\), got 1.0"):
        C.check_values(Sized(val_fraction=1.0), "x")
    with pytest.raises(ProtocacheError, match=r"'rate' must be a finite number, got nan"):
        C.check_values(Sized(rate=float("nan")), "x")
    with pytest.raises(ProtocacheError, match=r"'lr' must be a number >= 0, got inf"):  # non-finite: never
        C.check_values(Sized(lr=float("inf")), "x")
    with pytest.raises(ProtocacheError, match=r"^tool: --batch-size expects int, got '8'$"):
        C.check_values(Sized(batch_size="8"), "tool", flags=True)  # type: ignore[arg-type]
    # build_config checks the values too (`--set batch_size=0` no longer falls back to a default)
    with pytest.raises(ProtocacheError, match="config key 'batch_size' must be an integer >= 1, got 0"):
        C.build_config(Sized, {"batch_size": 0}, "head 'x'")


def test_configs_validate_before_work():
    from protocache.pipeline.extract import ExtractConfig

    FitConfig().validate()
    with pytest.raises(ProtocacheError, match=r"fit option 'epochs' must be an integer >= 1, got 0"):
        FitConfig(epochs=0).validate()
    with pytest.raises(ProtocacheError, match=r"--shard-size 12 must be a multiple of --chunk-size 8, "
                                              r"e.g. --shard-size 16"):
        ExtractConfig(shard_size=12).validate()  # 12 / 8 = 1.5 rounds to 2 chunks = 16 images


def test_check_writable(tmp_path):
    C.check_writable(tmp_path / "new" / "deeper", "--out")  # created later through the existing tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProtocacheError, match=r"--out .*file/report: .*file is a file, not a folder"):
        C.check_writable(tmp_path / "file" / "report", "--out")
    with pytest.raises(ProtocacheError, match=r"exists and is not a folder"):
        C.check_writable(tmp_path / "file", "--out")
    C.check_writable("s3://bucket/x", "--out")  # left to the remote filesystem
