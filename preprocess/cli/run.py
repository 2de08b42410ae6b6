"""``dm-preprocess run``: preprocess inputs into a shard folder (resumable, idempotent); with
``--dry-run``, the LLM cost of what it would request."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from preprocess.assets import TOKENIZER_DIR
from preprocess.cli.args import add_input_args, field_map, fractions, parse_kv, reject_line
from preprocess.extractors.base import parse_fractions


def add_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="preprocess inputs into a shard folder (resumable, idempotent)")
    add_input_args(r)
    r.add_argument("--output", required=True, help="output folder")
    r.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="HF tokenizer name or folder")
    r.add_argument("--extractor", default="rules",
                   help="rules | llm | confidence | none (registered extractors)")
    r.add_argument("--extractor-option", action="append", type=parse_kv, default=[], metavar="K=V",
                   help="extractor option (JSON value or string); repeatable")
    r.add_argument("--max-rho", action="append", default=[],
                   help="rho budget per domain, e.g. code=0.25,math=0.31: keep the highest-scoring spans "
                        "up to that share of supervised tokens (docs/extractors.md); repeatable")
    r.add_argument("--max-length", type=int, default=2048, help="reject samples with more tokens")
    r.add_argument("--num-shards", type=int, default=8,
                   help="fixed shard count (output independent of workers)")
    r.add_argument("--workers", type=int, default=-1, help="concurrent local tasks (-1: all cores)")
    r.add_argument("--executor", choices=("local", "slurm"), default="local")
    r.add_argument("--strict", action="store_true", help="fail at the first bad record")
    r.add_argument("--no-chat-template", dest="use_chat_template", action="store_false",
                   help="use the raw prompt text instead of the chat template's user turn")
    r.add_argument("--batch-size", type=int, default=512)
    r.add_argument("--overwrite", action="store_true", help="replace shards made with another configuration")
    r.add_argument("--retry-failed", action="store_true",
                   help="rebuild the finished shards holding samples the extractor failed to answer")
    r.add_argument("--dry-run", action="store_true",
                   help="llm extractor: print the cost of the samples not cached yet; write nothing")
    s = r.add_argument_group("slurm (datatrove SlurmPipelineExecutor)")
    s.add_argument("--slurm-partition", default=None)
    s.add_argument("--slurm-time", default="04:00:00")
    s.add_argument("--slurm-cpus-per-task", type=int, default=1)
    s.add_argument("--slurm-mem-per-cpu-gb", type=int, default=4)
    s.add_argument("--slurm-job-name", default="dm-preprocess")
    s.add_argument("--slurm-qos", default=None)
    s.add_argument("--slurm-max-concurrent", type=int, default=-1, help="array tasks at once (-1: no limit)")
    s.add_argument("--slurm-venv", default=None, help="activate script sourced in the job")
    s.add_argument("--slurm-env-command", default=None, help="shell line preparing the job environment")
    s.add_argument("--slurm-sbatch-arg", action="append", type=parse_kv, default=[], metavar="K=V",
                   help="extra #SBATCH --K=V line; repeatable")
    s.add_argument("--logging-dir", default=None, help="datatrove logs/markers (default <output>/logs)")


def config_from_args(a: argparse.Namespace) -> Any:
    from preprocess.pipeline.config import PreprocessConfig, SlurmOptions

    slurm = SlurmOptions(partition=a.slurm_partition, time=a.slurm_time, cpus_per_task=a.slurm_cpus_per_task,
                         mem_per_cpu_gb=a.slurm_mem_per_cpu_gb, job_name=a.slurm_job_name, qos=a.slurm_qos,
                         max_concurrent=a.slurm_max_concurrent, venv_path=a.slurm_venv,
                         env_command=a.slurm_env_command,
                         sbatch_args={k: str(v) for k, v in a.slurm_sbatch_arg},
                         logging_dir=a.logging_dir)
    return PreprocessConfig(
        inputs=a.input, output_dir=a.output, tokenizer=a.tokenizer, extractor=a.extractor,
        extractor_options=dict(a.extractor_option), fractions=fractions(a),
        max_rho=parse_fractions(",".join(a.max_rho), "--max-rho"), seed=a.seed,
        max_length=a.max_length, num_shards=a.num_shards, workers=a.workers, executor=a.executor, slurm=slurm,
        strict=a.strict, use_chat_template=a.use_chat_template, fields=field_map(a), hf_split=a.hf_split,
        batch_size=a.batch_size, overwrite=a.overwrite, retry_failed=a.retry_failed)


def command(a: argparse.Namespace) -> int:
    from rich.console import Console

    from preprocess.pipeline.driver import run_pipeline
    from preprocess.pipeline.progress import LiveProgress, summary_table
    from preprocess.pipeline.report import extractor_counters, run_warnings
    from preprocess.pipeline.steps import read_timings

    cfg = config_from_args(a)
    if a.dry_run or str(cfg.extractor_options.get("dry_run", "")).lower() in ("1", "true", "yes"):
        return dry_run(cfg)
    console = Console()
    t0 = time.perf_counter()
    started = time.time()
    with LiveProgress(cfg.logging_dir, cfg.num_shards, console):
        out = run_pipeline(cfg)
    wall = time.perf_counter() - t0
    index_path = Path(out) / "index.json"
    if not index_path.is_file():  # SLURM: jobs submitted, merge job writes index.json later
        console.print(f"submitted; {index_path} appears when the merge job has run")
        return 0
    timings = [t for t in read_timings(cfg) if (cfg.logging_dir / "timing" / f"shard_{t['shard']:05d}.json")
               .stat().st_mtime >= started]
    index = json.loads(index_path.read_text(encoding="utf-8"))
    console.print(summary_table(index, wall, timings))
    counters = extractor_counters(timings)
    if counters:
        console.print(counters, markup=False, soft_wrap=True)
    for line in run_warnings(index):
        console.print(line, style="bold red", markup=False, soft_wrap=True)
    console.print(f"output: {out}")
    return 0


def dry_run(cfg: Any) -> int:
    """``run --dry-run``: the LLM cost of what the run would request; no folder, no cache file."""
    from preprocess.pipeline.report import dry_run as plan_dry_run

    d = plan_dry_run(cfg)
    print(f"dry run: {d.selected:,} samples selected, {d.cached:,} already in the cache (free)")
    print(d.estimate.format() if d.estimate is not None else "nothing to request")
    for r in d.rejects[:20]:
        print(f"invalid record: {reject_line(r)}", file=sys.stderr)
    return 1 if d.rejects else 0
