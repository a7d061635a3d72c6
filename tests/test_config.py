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
