"""``dm-preprocess cost``: what the LLM extractor would cost on the given inputs, before spending
anything (online and Batch API prices, optionally projected to a corpus size)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from preprocess.cli.args import add_input_args, field_map, fractions, reject_line
from preprocess.extractors.base import read_inputs
from preprocess.records import Reject


def parse_counts(value: str) -> dict[str, int]:
    """``--scale code=436000,math=7473`` -> ``{"code": 436000, "math": 7473}``."""
    try:
        return {k.strip(): int(float(v)) for k, v in (p.split("=", 1) for p in value.split(",") if p.strip())}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--scale {value!r}: expected 'code=436000,math=7473'") from e


def add_parser(sub: Any) -> None:
    c = sub.add_parser("cost", help="LLM extractor cost estimate, before spending anything")
    add_input_args(c)
    c.add_argument("--model", default="gpt-4o")
    c.add_argument("--mode", choices=["online", "batch", "both"], default="both")
    c.add_argument("--prices", default=None, help="IN,OUT USD per 1M tokens (online); overrides the table")
    c.add_argument("--output-ratio", type=float, default=None, help="dense share of the answer (model)")
    c.add_argument("--max-output-tokens", type=int, default=4096)
    c.add_argument("--scale", type=parse_counts, default=None,
                   help="project to a corpus of DOMAIN=N samples, e.g. code=436000,math=7473")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--allow-invalid", action="store_true", help="exit 0 even if some records are invalid")


def command(a: argparse.Namespace) -> int:
    from preprocess.extractors.llm.cost import estimate_cost

    rejects: list[Reject] = []
    items = read_inputs(a.input, field_map(a), rejects, a.hf_split)
    est = estimate_cost(items, a.model, fractions(a), a.prices,
                        "online" if a.mode == "both" else a.mode, seed=a.seed,
                        output_ratio=a.output_ratio, max_output_tokens=a.max_output_tokens)
    errors = [reject_line(r) for r in rejects]
    shown = [est] + ([est.scaled(a.scale)] if a.scale else [])
    if a.json:
        print(json.dumps([e.to_dict() for e in shown] + [{"invalid_records": len(errors)}], indent=1))
    else:
        for e in shown:
            print(e.format())
            print()
    for msg in errors[:20]:
        print(f"invalid record: {msg}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} invalid record(s) not counted", file=sys.stderr)
        return 0 if a.allow_invalid else 1
    return 0
