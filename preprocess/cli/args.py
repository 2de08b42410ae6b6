"""Flags and values shared by several subcommands: the inputs with their field mapping and fraction
selection (run, cost, batch), ``K=V`` options, and the one-line form of a rejected record."""

from __future__ import annotations

import argparse
import json
from typing import Any

from preprocess.extractors.base import parse_fractions
from preprocess.records import FieldMap, Reject


def parse_kv(text: str) -> tuple[str, Any]:
    """``K=V`` with V read as JSON (numbers, booleans, lists); anything else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_input_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Input, field mapping (``records.FieldMap``) and fraction selection: shared by run, cost, batch."""
    p.add_argument("--input", action="append", required=required, default=[],
                   help="file, directory, glob or saved HF dataset; repeatable")
    p.add_argument("--hf-split", default="train", help="split of a saved DatasetDict")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default=None, help="chat list field (last turn = response)")
    p.add_argument("--domain-field", default="domain", help="field with code/math/other ('' for none)")
    p.add_argument("--domain", default=None, help="domain of every record (overrides --domain-field)")
    p.add_argument("--id-field", default="id", help="stable sample id field ('' for <file>:<line>)")
    p.add_argument("--fraction", action="append", default=[],
                   help="extracted share per domain, e.g. code=0.1,math=0.5 (default 1.0); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the fraction selection")


def field_map(a: argparse.Namespace) -> FieldMap:
    """The field mapping given by :func:`add_input_args`' flags."""
    return FieldMap(prompt=a.prompt_field, response=a.response_field, messages=a.messages_field,
                    domain_field=a.domain_field or None, domain=a.domain, id_field=a.id_field or None)


def fractions(a: argparse.Namespace) -> dict[str, float]:
    """The ``--fraction`` flags, parsed."""
    return parse_fractions(",".join(a.fraction))


def reject_line(r: Reject) -> str:
    where = f" field {r.field!r}" if r.field else ""
    return f"{r.source}:{r.line}: {r.reason}{where}: {r.detail}"
