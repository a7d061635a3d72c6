"""`protocache` entry point: every command module registers its commands on the shared app."""

from __future__ import annotations

import errno
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
from . import predict_commands  # noqa: F401  (predict, export)
from . import store_commands  # noqa: F401  (extract, info, verify, datasets)
from .app import app

# File-system refusals the user can act on (a folder they cannot write, a file where a folder should
# be, a full or read-only disk): one `error:` line naming the path, like a ProtocacheError.
USER_OS_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system", errno.ENOTDIR: "not a folder",
                  errno.EISDIR: "is a folder", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded"}


def os_error_line(exc: OSError) -> str | None:
    """The one-line message of a file-system refusal (None for other OSErrors, which stay tracebacks)."""
    if exc.errno not in USER_OS_ERRORS or not exc.filename:
        return None
    return (f"cannot write or read {exc.filename}: {USER_OS_ERRORS[exc.errno]}; choose a path you can write to "
            "(or free space) and run the command again")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's time limit, `kill`): unwound like Ctrl-C, so staging folders are removed and
    a shard being written is finished before the process exits."""


_signals: list[int] = []  # SIGTERMs received (typer turns the interrupt into exit code 130, the cause lost)


def _terminated(signum, frame) -> None:
    _signals.append(signum)
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except ProtocacheError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except OSError as exc:
        line = os_error_line(exc)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except Exception as exc:
        # Usage errors (unknown command or option, bad value) arrive here in non-standalone
        # mode; they are click exceptions that know how to print themselves.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:  # Ctrl-C, or SIGTERM (typer returns 130 for both)
        typer.echo("terminated" if _signals else "aborted", err=True)
        sys.exit(143 if _signals else 130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
