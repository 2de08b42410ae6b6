"""The paper's four benchmarks read from local JSONL in their common public formats (no downloads).

=========  ===========================================================  =========================
benchmark  fields (one JSON object per line; ``.jsonl`` or ``.jsonl.gz``)  default file under data dir
=========  ===========================================================  =========================
gsm8k      ``question``, ``answer`` ending ``#### N``                    ``gsm8k/test.jsonl``
math500    ``problem``, ``solution``, ``answer`` (``unique_id`` optional)   ``math500/test.jsonl``
humaneval  ``task_id``, ``prompt``, ``test``, ``entry_point``,           ``humaneval/HumanEval.jsonl``
           ``canonical_solution``
mbpp       ``task_id``, ``text``, ``code``, ``test_list``,               ``mbpp/mbpp.jsonl``
           ``test_setup_code`` (test split: task_id 11-510 kept)
=========  ===========================================================  =========================

Every bad record (bad JSON, a missing or mistyped field, a GSM8K answer without ``####``) is
reported as ``file:line: field: problem``; all are collected and raised together, none dropped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from evaluation import prompts, scoring

MBPP_TEST_IDS = range(11, 511)  # the standard MBPP test split (Austin et al. 2021)


class DataError(ValueError):
    """Bad benchmark input; the message names every bad record by file:line."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One benchmark item: where it came from, its prompt, and what scoring needs."""

    benchmark: str
    task_id: str
    source: str      # "file:line"
    prompt: str
    record: dict
    gold: str | None  # math: the gold answer; code: None (the tests are the gold)


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    title: str       # column header in the report (paper's spelling)
    kind: str        # "math" | "code"
    default_path: str
    fields: dict[str, type | tuple[type, ...]]


BENCHMARKS: dict[str, Benchmark] = {
    "humaneval": Benchmark("humaneval", "HumanEval", "code", "humaneval/HumanEval.jsonl",
                           {"task_id": str, "prompt": str, "test": str, "entry_point": str,
                            "canonical_solution": str}),
    "mbpp": Benchmark("mbpp", "MBPP", "code", "mbpp/mbpp.jsonl",
                      {"task_id": int, "text": str, "code": str, "test_list": list,
                       "test_setup_code": str}),
    "gsm8k": Benchmark("gsm8k", "GSM8K", "math", "gsm8k/test.jsonl", {"question": str, "answer": str}),
    "math500": Benchmark("math500", "MATH500", "math", "math500/test.jsonl",
                         {"problem": str, "solution": str, "answer": str}),
}
ORDER = ("humaneval", "mbpp", "gsm8k", "math500")  # the paper's Table 1 column order


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_jsonl(path: Path, errors: list[str]):
    """``(where, record)`` for each non-blank line of a JSONL file (``.gz`` too); a line that is not
    JSON adds ``"file:line: invalid JSON (...)"`` to ``errors`` and is skipped."""
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _check_fields(record: object, fields: dict) -> list[str]:
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected a JSON object"]
    errors = []
    for name, typ in fields.items():
        if name not in record:
            errors.append(f"{name}: missing")
        elif not isinstance(record[name], typ) or isinstance(record[name], bool):
            want = getattr(typ, "__name__", typ)
            errors.append(f"{name}: expected {want}, got {type(record[name]).__name__}")
    if "test_list" in fields and isinstance(record.get("test_list"), list):
        if not all(isinstance(t, str) for t in record["test_list"]) or not record["test_list"]:
            errors.append("test_list: expected a non-empty list of strings")
    return errors


def load_benchmark(name: str, path: str | Path, limit: int | None = None) -> list[Problem]:
    """Read a benchmark file -> problems (MBPP: test split only), first ``limit`` of them."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(ORDER)}")
    bench = BENCHMARKS[name]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: benchmark file {path} not found (expected {bench.default_path} "
                                f"under --data-dir, or pass --{name} PATH)")
    problems: list[Problem] = []
    errors: list[str] = []
    for where, rec in iter_jsonl(path, errors):
        bad = _check_fields(rec, bench.fields)
        if bad:
            errors.extend(f"{where}: {b}" for b in bad)
            continue
        if name == "mbpp" and rec["task_id"] not in MBPP_TEST_IDS:
            continue
        gold = None
        if name == "gsm8k":
            try:
                gold = scoring.gsm8k_gold(rec["answer"])
            except ValueError as e:
                errors.append(f"{where}: answer: {e}")
                continue
        elif name == "math500":
            gold = rec["answer"]
        task_id = str(rec.get("task_id", rec.get("unique_id", f"{name}/{where.rpartition(':')[2]}")))
        problems.append(Problem(name, task_id, where, prompts.PROMPTS[name](rec), rec, gold))
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad record(s) in {path}:\n  {shown}{more}")
    if not problems:
        raise DataError(f"{path}: no {name} problems found" + (" in the test split (task_id 11-510)"
                                                               if name == "mbpp" else ""))
    return problems[:limit] if limit else problems


def reference_completion(problem: Problem) -> str:
    """The benchmark's own answer written as a model would (for self-checks: must score 100 %)."""
    rec = problem.record
    if problem.benchmark == "gsm8k":
        return rec["answer"]
    if problem.benchmark == "math500":
        return f"{rec['solution']}\nThe final answer is $\\boxed{{{rec['answer']}}}$."
    if problem.benchmark == "humaneval":
        return f"```python\n{rec['canonical_solution']}```"
    return f"```python\n{rec['code']}\n```"

