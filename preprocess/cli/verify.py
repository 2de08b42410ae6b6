"""``dm-preprocess verify``: re-check a shard folder (checksums, offsets, flags, token ranges);
exit status 1 and one line per problem if it is damaged."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    v = sub.add_parser("verify", help="re-check checksums, offsets, flags and token ranges")
    v.add_argument("path")
    v.add_argument("--quick", action="store_true", help="sizes and offsets only (no sha256, no token scan)")


def command(a: argparse.Namespace) -> int:
    from preprocess.shards_verify import verify

    problems = verify(a.path, deep=not a.quick)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {a.path}" if problems else f"OK: {a.path}")
    return 1 if problems else 0
