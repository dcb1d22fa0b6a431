"""How every jaxvpr command ends on a user error: one line ``error: ...`` on stderr, exit status 1.

A user error is something the user can fix: a missing, empty or unreadable folder, a malformed
``@`` image name, a corrupt image, an unknown or mistyped config field, a checkpoint that does not
fit the model, a pickle that would run code, a non-finite loss. The project's error classes say so
by their base class, so this module imports none of them:

- ``ValueError``: ``DatasetError`` (and ``ImageNameError``, ``ConversionError``), ``ConfigError``,
  ``CheckpointError``, ``CheckpointFormatError``, ``CheckpointMismatchError``,
  ``BenchmarkConfigError``, ``ImageSizeMismatchError`` and the checks of command-line values;
- ``OSError``: ``CorruptImageError``, a missing file or folder, a permission refused;
- ``ImportError``: an optional extra that is not installed (torch, kapture);
- ``FloatingPointError``: ``NonFiniteLossError``;
- ``SystemExit("message")`` and absl's ``UsageError``: a command's own refusal.

The message already names the file, field or folder and what to do; a message of several lines is
joined into one. An error raised inside a Grain worker process reaches the command as the same
class with the same message (the classes pickle their arguments); an error wrapped by another
(``raise X from error``) is reported as the first user error of the chain. Anything else is a
bug and keeps its Python traceback. ``--debug`` (accepted by every command) or ``JAXVPR_DEBUG=1``
shows the traceback of a user error too.

    @cli.command                       # argparse commands: main(argv) -> exit status
    def main(argv=None) -> int:
        parser = cli.ArgumentParser(prog="python -m jaxvpr.x")
        ...

    if __name__ == "__main__":
        cli.run_absl(main)             # absl commands (jaxvpr.main, jaxvpr.evaluate)
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import sys
from typing import Callable, Sequence

USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
DEBUG_HELP = "show the Python traceback of an error (or set JAXVPR_DEBUG=1)"


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``JAXVPR_DEBUG`` set to anything but "" or "0"."""
    return "--debug" in argv or os.environ.get("JAXVPR_DEBUG", "") not in ("", "0")


def user_error(error: BaseException, extra: tuple[type, ...] = ()) -> BaseException | None:
    """The user error that ``error`` is, or else the first one it wraps (its ``__cause__``, or its
    ``__context__`` unless suppressed by ``from None``); None when it is a bug. ``SystemExit`` counts
    only with a message (not a status)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS + extra) or (isinstance(error, SystemExit) and isinstance(error.code, str)):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (``SystemExit``: its message)."""
    text = error.code if isinstance(error, SystemExit) else str(error)
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or type(error).__name__


def report(error: BaseException) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)


def _guarded(fn: Callable, debug: bool, extra: tuple[type, ...], *args):
    """``fn(*args)``; a user error is reported and gives 1 (re-raised with ``debug``)."""
    try:
        status = fn(*args)
    except BaseException as e:
        error = user_error(e, extra)
        if error is None or debug:
            raise
        report(error)
        return 1
    leave_distributed()
    return status


def leave_distributed() -> None:
    """A finished multi-process run enters JAX's distributed shutdown barrier now, while the interpreter
    is whole. Left to ``atexit``, process 0 can drop the coordination service while a peer is still
    leaving Python, and the peer aborts (SIGABRT, "Terminating process because the JAX distributed
    service detected fatal errors") after its work is done."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        jax.distributed.shutdown()


def command(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Wraps an argparse command's ``main(argv) -> exit status``: ``--debug`` is taken out of ``argv``
    (default ``sys.argv[1:]``) and a user error is reported on one line with status 1."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        argv = [a for a in argv if a != "--debug"]
        return _guarded(main, debug, (), argv)

    return run


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--debug`` listed and usage errors as ``error: ...`` on the last line (status 2).

    Subcommand parsers (``add_subparsers``) are of this class too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_absl(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """``absl.app.run(main)`` with the user errors of flag parsing and of ``main`` on one line.

    Covers what absl and ml_collections would print as a traceback or a multi-line "FATAL Flags
    parsing error": an unknown ``--config.field`` (the message lists the fields beside it), a value
    of the wrong type, a config file that is missing or whose ``get_config`` refuses its argument.
    """
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    debug = debug_requested(argv[1:])
    if "debug" not in flags.FLAGS:
        flags.DEFINE_boolean("debug", False, DEBUG_HELP)

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except Exception as e:  # noqa: BLE001 - any failure of parsing is the command line's
            if debug:
                raise
            print(f"error: {_flag_error(e, args)}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(lambda args: _guarded(main, debug, (app.UsageError,), args), argv=argv, flags_parser=parse)


def _flag_error(error: Exception, argv: Sequence[str]) -> str:
    """One line for a failure of absl flag parsing (see :func:`run_absl`)."""
    from absl import flags

    unknown = _unknown_config_field(argv)
    if unknown:
        return unknown
    text = str(error)
    if "Traceback (most recent call last)" in text:  # ml_collections pastes the config file's traceback
        first = text.strip().splitlines()[0].strip()
        return f"{first} {text.strip().splitlines()[-1].strip()}"
    if isinstance(error, USER_ERRORS + (flags.Error,)):
        return one_line(error)
    return f"{type(error).__name__}: {one_line(error)}"


def _unknown_config_field(argv: Sequence[str]) -> str | None:
    """The first ``--<config flag>.a.b=value`` naming a field its config does not have, explained
    (ml_collections says only "'b'"); None when every override names a field."""
    from absl import flags
    from ml_collections import ConfigDict

    for arg in argv:
        name, *path = (arg[2:].split("=", 1)[0] if arg.startswith("--") else "").split(".")
        if not path or name not in flags.FLAGS:
            continue
        try:  # the config file, loaded again (the flag holds no value when an override failed)
            node = flags.FLAGS[name].parser.parse(_flag_argument(argv, name))
        except Exception:  # noqa: BLE001 - the config file itself failed: reported as such
            return None
        for depth, key in enumerate(path):
            where = ".".join([name, *path[:depth]])
            if not isinstance(node, ConfigDict):
                return f"{arg.split('=', 1)[0]}: {where} is a value ({type(node).__name__}), not a group of fields"
            if key not in node:
                known = sorted(node.keys())
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {where}.{close[0]}? " if close else ""
                return (f"{arg.split('=', 1)[0]}: {where} has no field {key!r}; {hint}its fields: "
                        f"{', '.join(known)} (every field is listed in the config file or jaxvpr/train/config.py)")
            node = node[key]
    return None


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None
