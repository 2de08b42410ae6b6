"""``dm-preprocess batch submit|status|collect``: the LLM extractor through the Batch API, without
running the whole preprocessing pipeline (answers land in the extractor's cache, where ``run``
finds them)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from preprocess.cli.args import add_input_args, field_map, fractions, reject_line
from preprocess.extractors.base import fraction_for, fraction_selected, read_inputs
from preprocess.records import Reject


def add_parser(sub: Any) -> None:
    b = sub.add_parser("batch", help="LLM extractor through the Batch API: submit, status, collect")
    b.add_argument("action", choices=["submit", "status", "collect"])
    add_input_args(b, required=False)
    b.add_argument("--option", action="append", default=[], help="extractor option k=v (model, base_url ...)")


def command(a: argparse.Namespace) -> int:
    import logging

    import openai

    from preprocess.extractors.llm.answers import request_key
    from preprocess.extractors.llm.batch import BatchRunner
    from preprocess.extractors.llm.client import LLMExtractor
    from preprocess.extractors.llm.config import resolve_api_key

    logging.basicConfig(level=logging.INFO)
    opts = dict(o.split("=", 1) for o in a.option)
    opts["mode"] = "batch"
    x = LLMExtractor(**opts)
    if x.cache is None:
        print("cache_dir is required for batch mode", file=sys.stderr)
        return 2
    if a.action == "status":
        for b in x.cache.batches():
            print(f"{b.batch_id}\t{b.status}\t{b.n_requests}\t{'collected' if b.collected else 'open'}")
        return 0
    rejects: list[Reject] = []
    fr = fractions(a)
    items = [it for it in read_inputs(a.input, field_map(a), rejects, a.hf_split)
             if fraction_selected(it.key, fraction_for(fr, it.domain), a.seed)]
    for r in rejects:
        print(f"invalid record: {reject_line(r)}", file=sys.stderr)
    bodies = {request_key(b): b for b in (x.request_body(it) for it in items)}
    cached = x.cache.get_many(bodies)
    todo = {k: b for k, b in bodies.items() if k not in cached}
    c = x.config
    client = openai.OpenAI(api_key=resolve_api_key(c), base_url=c.base_url, timeout=c.timeout,
                           max_retries=c.max_retries)
    runner = BatchRunner(x, client, x.cache)
    ids = runner.submit(todo)
    print(f"{len(items)} selected, {len(cached)} cached, {len(todo)} in {len(ids)} batch(es): {ids}")
    if a.action == "collect":
        errs = runner.wait(ids, c.batch_max_wait)
        print(f"collected; {len(errs)} request(s) failed (rerun 'submit' to retry them)")
    client.close()
    return 1 if rejects else 0
