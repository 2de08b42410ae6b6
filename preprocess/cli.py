"""``dm-preprocess`` / ``python launch/preprocess.py``: run, verify, inspect, stats, cost, batch, split-input.

    dm-preprocess run --input data.jsonl --output out/ --extractor rules --fraction code=0.1,math=0.5
    dm-preprocess verify out/              # exit status 1 and one line per problem if damaged
    dm-preprocess inspect out/ --index 3   # sample 3 with info-dense tokens highlighted
    dm-preprocess stats out/ --rejects 5   # the summary table again, plus the first rejects
    dm-preprocess cost --input data.jsonl --model gpt-4o --fraction code=0.1,math=0.5   # LLM dry run
    dm-preprocess batch submit|status|collect --input data.jsonl --option cache_dir=c   # Batch API
    dm-preprocess split-input big.jsonl.zst --parts 256 --output parts/  # one stream -> 256 files

``run`` flags mirror ``PreprocessConfig`` field by field (see ``docs/preprocess.md``).  Every
command that reads records (run, cost, batch) reads them through ``preprocess.records`` with the
same field-mapping flags.

Over 400 lines: one parser and one function per subcommand, sharing the input flags; splitting
them apart would scatter one command line over several files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from preprocess.assets import TOKENIZER_DIR
from preprocess.extractors.base import (
    fraction_for,
    fraction_selected,
    parse_fractions,
    read_inputs,
)
from preprocess.records import FieldMap, Reject


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def _add_input_args(p: argparse.ArgumentParser, required: bool = True) -> None:
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


def _fields(a: argparse.Namespace) -> FieldMap:
    return FieldMap(prompt=a.prompt_field, response=a.response_field, messages=a.messages_field,
                    domain_field=a.domain_field or None, domain=a.domain, id_field=a.id_field or None)


def _fractions(a: argparse.Namespace) -> dict[str, float]:
    return parse_fractions(",".join(a.fraction))


def _reject_line(r: Reject) -> str:
    where = f" field {r.field!r}" if r.field else ""
    return f"{r.source}:{r.line}: {r.reason}{where}: {r.detail}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dm-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="preprocess inputs into a shard folder (resumable, idempotent)")
    _add_input_args(r)
    r.add_argument("--output", required=True, help="output folder")
    r.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="HF tokenizer name or folder")
    r.add_argument("--extractor", default="rules",
                   help="rules | llm | confidence | none (registered extractors)")
    r.add_argument("--extractor-option", action="append", type=_kv, default=[], metavar="K=V",
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
    s.add_argument("--slurm-sbatch-arg", action="append", type=_kv, default=[], metavar="K=V",
                   help="extra #SBATCH --K=V line; repeatable")
    s.add_argument("--logging-dir", default=None, help="datatrove logs/markers (default <output>/logs)")

    v = sub.add_parser("verify", help="re-check checksums, offsets, flags and token ranges")
    v.add_argument("path")
    v.add_argument("--quick", action="store_true", help="sizes and offsets only (no sha256, no token scan)")

    i = sub.add_parser("inspect", help="print samples with info-dense tokens highlighted")
    i.add_argument("path")
    i.add_argument("--index", type=int, action="append", default=None, help="global sample index; repeatable")
    i.add_argument("--key", default=None, help="sample id to look up")
    i.add_argument("--count", type=int, default=1, help="samples from --index on (default 1)")
    i.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in index.json")

    st = sub.add_parser("stats", help="summary of a finished folder")
    st.add_argument("path")
    st.add_argument("--rejects", type=int, default=0, help="also list the first N rejected records")
    st.add_argument("--outliers", type=int, default=5, help="rho outliers listed per domain and kind")
    st.add_argument("--rho-above", type=float, default=None, help="high-rho outlier threshold "
                    "(default: twice the paper's rho of the domain)")

    c = sub.add_parser("cost", help="LLM extractor cost estimate, before spending anything")
    _add_input_args(c)
    c.add_argument("--model", default="gpt-4o")
    c.add_argument("--mode", choices=["online", "batch", "both"], default="both")
    c.add_argument("--prices", default=None, help="IN,OUT USD per 1M tokens (online); overrides the table")
    c.add_argument("--output-ratio", type=float, default=None, help="dense share of the answer (model)")
    c.add_argument("--max-output-tokens", type=int, default=4096)
    c.add_argument("--scale", type=_parse_counts, default=None,
                   help="project to a corpus of DOMAIN=N samples, e.g. code=436000,math=7473")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--allow-invalid", action="store_true", help="exit 0 even if some records are invalid")

    sp = sub.add_parser("split-input", help="rewrite one big (compressed) JSONL file into many parts")
    sp.add_argument("file")
    sp.add_argument("--parts", type=int, required=True, help="number of files (>= --num-shards of the run)")
    sp.add_argument("--output", required=True, help="folder for the parts")

    b = sub.add_parser("batch", help="LLM extractor through the Batch API: submit, status, collect")
    b.add_argument("action", choices=["submit", "status", "collect"])
    _add_input_args(b, required=False)
    b.add_argument("--option", action="append", default=[], help="extractor option k=v (model, base_url ...)")
    return p


def _parse_counts(value: str) -> dict[str, int]:
    try:
        return {k.strip(): int(float(v)) for k, v in (p.split("=", 1) for p in value.split(",") if p.strip())}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--scale {value!r}: expected 'code=436000,math=7473'") from e


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
        extractor_options=dict(a.extractor_option), fractions=_fractions(a),
        max_rho=parse_fractions(",".join(a.max_rho), "--max-rho"), seed=a.seed,
        max_length=a.max_length, num_shards=a.num_shards, workers=a.workers, executor=a.executor, slurm=slurm,
        strict=a.strict, use_chat_template=a.use_chat_template, fields=_fields(a), hf_split=a.hf_split,
        batch_size=a.batch_size, overwrite=a.overwrite, retry_failed=a.retry_failed)


def cmd_run(a: argparse.Namespace) -> int:
    from rich.console import Console

    from preprocess.pipeline.driver import run_pipeline
    from preprocess.pipeline.progress import LiveProgress, summary_table
    from preprocess.pipeline.report import extractor_counters, run_warnings
    from preprocess.pipeline.steps import read_timings

    cfg = config_from_args(a)
    if a.dry_run or str(cfg.extractor_options.get("dry_run", "")).lower() in ("1", "true", "yes"):
        return cmd_dry_run(cfg)
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


def cmd_dry_run(cfg: Any) -> int:
    """``run --dry-run``: the LLM cost of what the run would request; no folder, no cache file."""
    from preprocess.pipeline.report import dry_run

    d = dry_run(cfg)
    print(f"dry run: {d.selected:,} samples selected, {d.cached:,} already in the cache (free)")
    print(d.estimate.format() if d.estimate is not None else "nothing to request")
    for r in d.rejects[:20]:
        print(f"invalid record: {_reject_line(r)}", file=sys.stderr)
    return 1 if d.rejects else 0


def cmd_split_input(a: argparse.Namespace) -> int:
    from preprocess.splits import split_input

    parts = split_input(a.file, a.output, a.parts)
    print(f"wrote {len(parts)} files to {a.output} ({parts[0].name} ... {parts[-1].name}); "
          f"pass --input {a.output} to run")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from preprocess.shards_verify import verify

    problems = verify(a.path, deep=not a.quick)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {a.path}" if problems else f"OK: {a.path}")
    return 1 if problems else 0


def _styled_runs(tokens: Any, flags: Any) -> list[tuple[list[int], str]]:
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


def cmd_inspect(a: argparse.Namespace) -> int:
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
        for ids, style in _styled_runs(s.tokens, s.flags):
            text.append(tok.decode(ids, skip_special_tokens=False), style=style or None)
        console.print(text)
    console.print(Text("legend: ", style="bold") + Text("prompt", style="dim") + Text(" / response / ")
                  + Text("info-dense", style="bold black on yellow"))
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
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


def cmd_cost(a: argparse.Namespace) -> int:
    from preprocess.extractors.llm.cost import estimate_cost

    rejects: list[Reject] = []
    items = read_inputs(a.input, _fields(a), rejects, a.hf_split)
    est = estimate_cost(items, a.model, _fractions(a), a.prices,
                        "online" if a.mode == "both" else a.mode, seed=a.seed,
                        output_ratio=a.output_ratio, max_output_tokens=a.max_output_tokens)
    errors = [_reject_line(r) for r in rejects]
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


def cmd_batch(a: argparse.Namespace) -> int:
    """Submit / status / collect without running the whole preprocessing pipeline."""
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
    fr = _fractions(a)
    items = [it for it in read_inputs(a.input, _fields(a), rejects, a.hf_split)
             if fraction_selected(it.key, fraction_for(fr, it.domain), a.seed)]
    for r in rejects:
        print(f"invalid record: {_reject_line(r)}", file=sys.stderr)
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


COMMANDS = {"run": cmd_run, "verify": cmd_verify, "inspect": cmd_inspect, "stats": cmd_stats,
            "cost": cmd_cost, "batch": cmd_batch, "split-input": cmd_split_input}


def main(argv: list[str] | None = None) -> int:
    """Run one command; any error is one line on stderr (exit 2), ``--debug`` re-raises it."""
    import logging

    # Warnings of the library code (a failed request, a skipped line) reach the terminal as one line each.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; errors without a location of their own (bugs, library
    errors) get where they were raised."""
    from preprocess.extractors.base import ExtractorError
    from preprocess.pipeline.config import RejectError, ShardTaskError
    from preprocess.shards import ConfigMismatchError

    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, RejectError):
        return f"(--strict) {msg}"
    if isinstance(e, (ConfigMismatchError, ShardTaskError, ExtractorError, FileNotFoundError, ValueError,
                      KeyError, PermissionError)):
        return msg
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}; --debug for the traceback)" \
        if tb is not None else ""
    return f"{type(e).__name__}: {msg}{where}"


if __name__ == "__main__":
    sys.exit(main())
