"""`protocache` entry point: every command module registers its commands on the shared app."""

from __future__ import annotations

import sys

import typer

from protocache.stores.errors import ProtocacheError

from . import store_commands  # noqa: F401  (registers extract, info, verify, datasets)
from . import dataset_commands  # noqa: F401
from .app import app


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except ProtocacheError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
