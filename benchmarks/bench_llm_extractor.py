"""LLM extractor throughput against a local OpenAI-compatible stub, and the paper's cost estimate.

    python benchmarks/bench_llm_extractor.py [--samples 2000] [--latency 0.05] [--concurrency 1,8,64]

Part 1 runs the real ``openai`` client through ``LLMExtractor.extract_batch`` against the stub
server (``tests/openai_stub_server.py``) started in a *separate process* (so server and client do
not share a GIL), with a fixed per-request latency standing in for the model.  It prints requests/s
per concurrency side by side with the ideal ``concurrency / latency`` and the ratio to
concurrency 1, then a rerun on the warm cache (zero requests) and a dry run.

Part 2 estimates the paper's extraction cost with GPT-4o: average tokens per sample measured on
our bundled data (MBPP for code, GSM8K train for math), scaled to the paper's ~450K mix.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.assets import SAMPLE_PATH  # noqa: E402
from preprocess.extractors.base import read_inputs  # noqa: E402
from preprocess.extractors.llm.cost import estimate_cost  # noqa: E402
from preprocess.extractors.registry import get_extractor  # noqa: E402
from preprocess.records import FieldMap  # noqa: E402

# Paper §3: OPC-SFT-Stage2 (code) + GSM8K (math), "around 450K samples".
PAPER_CODE = 436_347  # OPC-SFT-Stage2 rows
PAPER_MATH = 7_473  # GSM8K train rows (one copy)


def _serve(latency: float, q: mp.Queue, stop: mp.Event) -> None:
    sys.path.insert(0, str(REPO))
    from tests.openai_stub_server import StubOpenAI

    with StubOpenAI(latency=latency, max_requests=100_000, lifetime=900) as s:
        q.put(s.base_url)
        stop.wait(900)


def _counts(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.replace("/v1", "/stub/counts"), timeout=10) as r:
        return json.load(r)


def throughput(items: list, latency: float, concurrencies: list[int]) -> None:
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(latency, q, stop), daemon=True)
    proc.start()
    base_url = q.get(timeout=60)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-real-key")
    print(f"# Part 1: {len(items)} samples, stub latency {latency * 1000:.0f} ms/request, "
          f"server in its own process, {os.cpu_count()} CPUs")
    print(f"{'concurrency':>11} {'samples':>8} {'seconds':>8} {'req/s':>8} {'ideal req/s':>12} "
          f"{'of ideal':>9} {'vs c=1':>7}")
    base_rate = None
    with tempfile.TemporaryDirectory() as tmp:
        for c in concurrencies:
            # concurrency 1 would take samples x latency seconds: measure it on a slice
            n = min(len(items), max(100, int(20 / latency))) if c == 1 else len(items)
            x = get_extractor("llm", base_url=base_url, cache_dir=f"{tmp}/c{c}", max_concurrency=c,
                              limits_dir=f"{tmp}/limits")
            before = _counts(base_url)["chat"] if c != concurrencies[0] else 0
            t0 = time.perf_counter()
            res = x.extract_batch(items[:n])
            dt = time.perf_counter() - t0
            sent = _counts(base_url)["chat"] - before
            # connection errors never reach the server (they are retried and counted)
            assert sent == x.stats["requests"] - x.stats["connection_errors"], (sent, x.stats)
            bad = sum(r.status != "ok" for r in res)
            rate = sent / dt
            base_rate = base_rate or rate
            ideal = c / latency
            print(f"{c:>11} {n:>8} {dt:>8.2f} {rate:>8.1f} {ideal:>12.0f} {rate / ideal:>8.0%} "
                  f"{rate / base_rate:>6.1f}x" + (f"  ({bad} not ok)" if bad else ""))
        c = concurrencies[-1]
        before = _counts(base_url)["chat"]
        t0 = time.perf_counter()
        y = get_extractor("llm", base_url=base_url, cache_dir=f"{tmp}/c{c}", max_concurrency=c,
                          limits_dir=f"{tmp}/limits")
        y.extract_batch(items)
        dt = time.perf_counter() - t0
        sent = _counts(base_url)["chat"] - before
        print(f"rerun on warm cache: {len(items)} samples in {dt:.2f} s ({len(items) / dt:,.0f} samples/s), "
              f"{sent} requests sent")
        t0 = time.perf_counter()
        z = get_extractor("llm", base_url=base_url, cache_dir=f"{tmp}/dry", dry_run=True)
        z.extract_batch(items)
        dt = time.perf_counter() - t0
        print(f"dry run: {len(items)} samples counted in {dt:.2f} s ({len(items) / dt:,.0f} samples/s), "
              f"{_counts(base_url)['chat'] - before - sent} requests sent")
    stop.set()
    proc.join(10)


def paper_cost(all_items: list) -> None:
    print("\n# Part 2: GPT-4o cost of the paper's extraction (code 10 %, math 50 %)")
    print(f"assumptions: corpus = {PAPER_CODE:,} code (OPC-SFT-Stage2) + {PAPER_MATH:,} math (GSM8K train);"
          " code answers modelled by MBPP, math by GSM8K train (bundled sample); output length modelled"
          " from the paper's dense ratios; list prices $2.50/$10 per 1M in/out, batch half.")
    # Per-sample averages over *all* bundled samples (the hash selection is unbiased, and 474 code
    # samples average better than the ~50 a 10 % selection keeps), then scaled with the fractions.
    measured = estimate_cost(all_items, "gpt-4o", fractions="code=1,math=1")
    print(measured.format())
    for label, frac in (("paper setting (code 10 %, math 50 %)", {"code": 0.1, "math": 0.5}),
                        ("everything (code 100 %, math 100 %)", {"code": 1.0, "math": 1.0})):
        measured.fractions = frac
        est = measured.scaled({"code": PAPER_CODE, "math": PAPER_MATH})
        print(f"\n## {label}, scaled to the paper's corpus")
        print(est.format())
    # Sensitivity: OPC-SFT-Stage2 answers are longer than MBPP's; price 100 more answer tokens.
    sel_code = round(PAPER_CODE * 0.1)
    extra_in, extra_out = 100, 100 * 0.25 * 2.5  # dense share x (text + JSON framing per span)
    extra = sel_code * (extra_in * 2.5 + extra_out * 10.0) / 1e6
    print(f"\nsensitivity: each +100 tokens of average code answer adds about ${extra:,.0f} online "
          f"(${extra / 2:,.0f} batch) for {sel_code:,} selected code samples")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rejects: list = []
    all_items = list(read_inputs([SAMPLE_PATH], FieldMap(), rejects))
    assert not rejects, rejects[:3]
    items = (all_items * (args.samples // len(all_items) + 1))[:args.samples]
    if args.samples > len(all_items):  # distinct keys and content, so nothing is deduplicated
        from preprocess.extractors.base import ExtractInput

        items = [ExtractInput(f"{it.key}#{i}", it.prompt + f" (copy {i})", it.response, it.domain)
                 for i, it in enumerate(items)]
    if not args.skip_throughput:
        throughput(items, args.latency, [int(c) for c in args.concurrency.split(",")])
    paper_cost(all_items)


if __name__ == "__main__":
    main()
