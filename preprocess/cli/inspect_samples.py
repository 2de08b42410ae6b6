"""``dm-preprocess inspect``: print samples of a shard folder with their info-dense tokens highlighted."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    i = sub.add_parser("inspect", help="print samples with info-dense tokens highlighted")
    i.add_argument("path")
    i.add_argument("--index", type=int, action="append", default=None, help="global sample index; repeatable")
    i.add_argument("--key", default=None, help="sample id to look up")
    i.add_argument("--count", type=int, default=1, help="samples from --index on (default 1)")
    i.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in index.json")


def styled_runs(tokens: Any, flags: Any) -> list[tuple[list[int], str]]:
    """Group consecutive tokens with the same style so multi-byte characters decode whole."""
    from preprocess.shards import FLAG_INFO_DENSE, FLAG_SUPERVISED

    runs: list[tuple[list[int], str]] = []
    for tok, fl in zip(tokens.tolist(), flags.tolist()):
        style = ("bold black on yellow" if fl & FLAG_INFO_DENSE else "" if fl & FLAG_SUPERVISED else "dim")
        if runs and runs[-1][1] == style:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], style))
    return runs


def command(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text
    from transformers import AutoTokenizer

    from preprocess.shards import Domain, ShardedDataset

    ds = ShardedDataset(a.path)
    tok = AutoTokenizer.from_pretrained(a.tokenizer or ds.index["tokenizer"]["name_or_path"])
    if a.key is not None:
        hit = ds.find(a.key)
        if hit is None:
            print(f"no sample with id {a.key!r}", file=sys.stderr)
            return 1
        indices = [hit]
    else:
        start = (a.index or [0])
        indices = start if len(start) > 1 else list(range(start[0], min(len(ds), start[0] + a.count)))
    console = Console()
    for i in indices:
        s = ds[i]
        n_sup = int(s.supervised.sum())
        n_dense = int(s.info_dense.sum())
        console.rule(f"sample {i}  id={s.sample_id}  domain={Domain(s.domain).name.lower()}  "
                     f"tokens={len(s.tokens)}  supervised={n_sup}  info-dense={n_dense}  "
                     f"selected={s.selected}")
        text = Text()
        for ids, style in styled_runs(s.tokens, s.flags):
            text.append(tok.decode(ids, skip_special_tokens=False), style=style or None)
        console.print(text)
    console.print(Text("legend: ", style="bold") + Text("prompt", style="dim") + Text(" / response / ")
                  + Text("info-dense", style="bold black on yellow"))
    return 0
