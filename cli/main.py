"""`protocache` entry point: every command module registers its commands on the shared app."""

from __future__ import annotations

import sys

import typer

from protocache.stores.errors import ProtocacheError

# Each command module registers its commands on the shared app when imported.
from . import ablate_commands  # noqa: F401  (ablate)
from . import bench_commands  # noqa: F401  (bench)
from . import dataset_commands  # noqa: F401  (make-dataset)
from . import eval_commands  # noqa: F401  (evaluate)
from . import explain_commands  # noqa: F401  (explain)
from . import head_commands  # noqa: F401  (fit-head, heads, bench-heads)
from . import store_commands  # noqa: F401  (extract, info, verify, datasets)
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
    except Exception as exc:
        # Usage errors (unknown command or option, bad value) arrive here in non-standalone
        # mode; they are click exceptions that know how to print themselves.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
