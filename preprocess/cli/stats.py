"""``dm-preprocess stats``: the summary table of a finished folder again, its warnings, the rho
report (per domain and kind, with outliers) and optionally the first rejected records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    st = sub.add_parser("stats", help="summary of a finished folder")
    st.add_argument("path")
    st.add_argument("--rejects", type=int, default=0, help="also list the first N rejected records")
    st.add_argument("--outliers", type=int, default=5, help="rho outliers listed per domain and kind")
    st.add_argument("--rho-above", type=float, default=None, help="high-rho outlier threshold "
                    "(default: twice the paper's rho of the domain)")


def command(a: argparse.Namespace) -> int:
    from rich.console import Console

    from preprocess.pipeline.progress import summary_table
    from preprocess.pipeline.report import run_warnings
    from preprocess.rho_stats import rho_report
    from preprocess.shards import INDEX_FILE, ShardedDataset

    index = json.loads((Path(a.path) / INDEX_FILE).read_text(encoding="utf-8"))
    console = Console()
    console.print(summary_table(index))
    for line in run_warnings(index):
        console.print(line, style="bold red", markup=False, soft_wrap=True)
    for part in rho_report(ShardedDataset(a.path), a.outliers, a.rho_above):
        console.print(part)
    if a.rejects:
        shown = 0
        for shard in index["shards"]:
            path = Path(a.path) / f"{shard['name']}.rejects.jsonl"
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if shown >= a.rejects:
                        return 0
                    r = json.loads(line)
                    console.print(f"{r['file']}:{r['line']}: {r['reason']}: {r['detail']}", markup=False)
                    shown += 1
    return 0
