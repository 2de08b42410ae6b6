"""The ``dm-preprocess`` entry point: one parser with a subparser per command module, the dispatch,
and every error as one line (``--debug`` for the traceback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocess import cli
from preprocess.cli import batch, cost, inspect_samples, run, split_input, stats, verify

COMMANDS = {"run": run, "verify": verify, "inspect": inspect_samples, "stats": stats, "cost": cost,
            "batch": batch, "split-input": split_input}
"""Subcommand -> its module (``add_parser(sub)``, ``command(args) -> exit status``), in help order."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dm-preprocess", description=(cli.__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; any error is one line on stderr (exit 2), ``--debug`` re-raises it."""
    import logging

    # Warnings of the library code (a failed request, a skipped line) reach the terminal as one line each.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command].command(a)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; errors without a location of their own (bugs, library
    errors) get where they were raised."""
    from preprocess.extractors.base import ExtractorError
    from preprocess.pipeline.config import RejectError, ShardTaskError
    from preprocess.shards import ConfigMismatchError

    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, RejectError):
        return f"(--strict) {msg}"
    if isinstance(e, (ConfigMismatchError, ShardTaskError, ExtractorError, FileNotFoundError, ValueError,
                      KeyError, PermissionError)):
        return msg
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}; --debug for the traceback)" \
        if tb is not None else ""
    return f"{type(e).__name__}: {msg}{where}"
