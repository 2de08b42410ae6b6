"""``dm-preprocess split-input``: rewrite one big (compressed) JSONL file into many parts, so that
the parts can be read by many tasks at once (``docs/preprocess.md``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("split-input", help="rewrite one big (compressed) JSONL file into many parts")
    sp.add_argument("file")
    sp.add_argument("--parts", type=int, required=True, help="number of files (>= --num-shards of the run)")
    sp.add_argument("--output", required=True, help="folder for the parts")


def command(a: argparse.Namespace) -> int:
    from preprocess.splits import split_input

    parts = split_input(a.file, a.output, a.parts)
    print(f"wrote {len(parts)} files to {a.output} ({parts[0].name} ... {parts[-1].name}); "
          f"pass --input {a.output} to run")
    return 0
