"""The typer app shared by the command modules, and small output helpers."""

from __future__ import annotations

import json

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache a frozen backbone's patch tokens once; train interpretable heads on the cache.")


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def option(cls: type, name: str, *param_decls: str, **kwargs):
    """A typer option whose default is config dataclass `cls`'s field `name` and whose help is
    that field's docstring, so the CLI never restates a default. `default=None` keeps an option
    unset unless given (where a config file's value must win over the dataclass default)."""
    from protocache.pipeline.config import field_default, field_docs

    kwargs.setdefault("help", field_docs(cls).get(name) or None)
    default = kwargs.pop("default") if "default" in kwargs else field_default(cls, name)
    return typer.Option(default, *param_decls, **kwargs)
