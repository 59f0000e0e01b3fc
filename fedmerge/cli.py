"""The ``fedmerge`` console script.

Each subcommand lives in ``fedmerge.commands.<name>`` and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed namespace, returning an exit code). Errors become one line on stderr and
exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fedmerge.logs import configure_logging

COMMAND_MODULES: tuple[str, ...] = ("data", "merge", "train", "deploy", "simulate", "privacy", "recommend", "evaluate")  # each helper module adds its name here


class LazyHelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``description`` may be a callable, called only when help is printed (so a command
    can describe a registry that lives in a heavy module without importing it for every ``--help``)."""

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge", description="Data-isolated cross-domain recommendation by federated model merging."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also show framework logs (fedmerge INFO, Flower, alembic, Ray worker output)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=LazyHelpParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedmerge.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, debug=args.debug)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not as an error at interpreter exit
        return code
    except KeyboardInterrupt:
        print("fedmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI boundary: one line unless --debug
        if args.debug:
            raise
        stdout_error = release_stdout()
        if isinstance(exc, BrokenPipeError) and isinstance(stdout_error, BrokenPipeError):
            return 141  # the reader closed the pipe (`| head`): quiet, like a process that SIGPIPE ended
        print(f"fedmerge {args.command}: error: {exc}", file=sys.stderr)
        return 1


def release_stdout() -> OSError | None:
    """Flush stdout; when that fails (a reader that closed the pipe, a full disk) point it at /dev/null, so that what
    is still buffered cannot fail again at interpreter exit, and return the error (None when stdout is fine: another
    pipe or file broke)."""
    try:
        sys.stdout.flush()
        return None
    except OSError as exc:
        error = exc
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # a stdout without a file descriptor (an in-process caller's stream)
        pass
    return error


if __name__ == "__main__":
    sys.exit(main())
