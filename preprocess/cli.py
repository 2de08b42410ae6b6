"""``dm-preprocess`` / ``python launch/preprocess.py``: run, verify, inspect, stats.

    dm-preprocess run --input data.jsonl --output out/ --extractor rules --fraction code=0.1,math=0.5
    dm-preprocess verify out/              # exit status 1 and one line per problem if damaged
    dm-preprocess inspect out/ --index 3   # sample 3 with info-dense tokens highlighted
    dm-preprocess stats out/ --rejects 5   # the summary table again, plus the first rejects

``run`` flags mirror ``PreprocessConfig`` field by field (see ``docs/readme/preprocess.md``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from preprocess.assets import TOKENIZER_DIR


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dm-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="preprocess inputs into a shard folder (resumable, idempotent)")
    r.add_argument("--input", action="append", required=True,
                   help="file, directory, glob or saved HF dataset; repeatable")
    r.add_argument("--output", required=True, help="output folder")
    r.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="HF tokenizer name or folder")
    r.add_argument("--extractor", default="rules", help="rules | llm | none (registered extractors)")
    r.add_argument("--extractor-option", action="append", type=_kv, default=[], metavar="K=V",
                   help="extractor option (JSON value or string); repeatable")
    r.add_argument("--fraction", default="", help="extracted share per domain, e.g. code=0.1,math=0.5 "
                   "(default 1.0)")
    r.add_argument("--seed", type=int, default=0, help="seed of the fraction selection")
    r.add_argument("--max-length", type=int, default=2048, help="reject samples with more tokens")
    r.add_argument("--num-shards", type=int, default=8,
                   help="fixed shard count (output independent of workers)")
    r.add_argument("--workers", type=int, default=-1, help="concurrent local tasks (-1: all cores)")
    r.add_argument("--executor", choices=("local", "slurm"), default="local")
    r.add_argument("--strict", action="store_true", help="fail at the first bad record")
    r.add_argument("--no-chat-template", dest="use_chat_template", action="store_false",
                   help="use the raw prompt text instead of the chat template's user turn")
    r.add_argument("--prompt-field", default="prompt")
    r.add_argument("--response-field", default="response")
    r.add_argument("--messages-field", default=None, help="chat list field (last turn = response)")
    r.add_argument("--domain-field", default="domain", help="field with code/math/other ('' for none)")
    r.add_argument("--domain", default=None, help="domain of every record (overrides --domain-field)")
    r.add_argument("--id-field", default="id", help="stable sample id field ('' for <file>:<line>)")
    r.add_argument("--hf-split", default="train", help="split of a saved DatasetDict")
    r.add_argument("--batch-size", type=int, default=512)
    r.add_argument("--overwrite", action="store_true", help="replace shards made with another configuration")
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
    return p


def config_from_args(a: argparse.Namespace) -> Any:
    from preprocess.pipeline import PreprocessConfig, SlurmOptions, parse_fractions

    slurm = SlurmOptions(partition=a.slurm_partition, time=a.slurm_time, cpus_per_task=a.slurm_cpus_per_task,
                         mem_per_cpu_gb=a.slurm_mem_per_cpu_gb, job_name=a.slurm_job_name, qos=a.slurm_qos,
                         max_concurrent=a.slurm_max_concurrent, venv_path=a.slurm_venv,
                         env_command=a.slurm_env_command,
                         sbatch_args={k: str(v) for k, v in a.slurm_sbatch_arg},
                         logging_dir=a.logging_dir)
    return PreprocessConfig(
        inputs=a.input, output_dir=a.output, tokenizer=a.tokenizer, extractor=a.extractor,
        extractor_options=dict(a.extractor_option), fractions=parse_fractions(a.fraction), seed=a.seed,
        max_length=a.max_length, num_shards=a.num_shards, workers=a.workers, executor=a.executor, slurm=slurm,
        strict=a.strict, use_chat_template=a.use_chat_template, prompt_field=a.prompt_field,
        response_field=a.response_field, messages_field=a.messages_field, domain_field=a.domain_field or None,
        domain=a.domain, id_field=a.id_field or None, hf_split=a.hf_split, batch_size=a.batch_size,
        overwrite=a.overwrite)


def _peak_rss_mb() -> float:
    """Peak RSS of this (driver) process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_table(index: dict[str, Any], wall_s: float | None = None,
                  timings: list[dict[str, Any]] | None = None) -> Any:
    from rich.table import Table

    t = Table(title=f"{index['num_samples']:,} samples, {index['num_tokens']:,} tokens in "
                    f"{index['num_shards']} shards ({index['token_dtype']}); extractor "
                    f"{index['extractor']['name']} v{index['extractor']['version']}")
    # Short headers so the table fits 80 columns: sup = supervised tokens, dense = info-dense tokens,
    # sel = extracted (selected) samples, rho = per-sample mean share, rho_tok = token-weighted share.
    for col in ("domain", "samples", "tokens", "sup", "dense", "sel", "rho", "rho_tok"):
        t.add_column(col, justify="right" if col != "domain" else "left")
    for name, d in index["domains"].items():
        t.add_row(name, f"{d['samples']:,}", f"{d['tokens']:,}", f"{d['supervised_tokens']:,}",
                  f"{d['dense_tokens']:,}", f"{d['selected_samples']:,}", f"{d['rho']:.3f}",
                  f"{d['rho_tokens']:.3f}")
    rejects = ", ".join(f"{k}: {v:,}" for k, v in index["rejects"].items()) or "none"
    status = ", ".join(f"{k}: {v:,}" for k, v in index["extract_status"].items()) or "-"
    align = ", ".join(f"{k}: {v:,}" for k, v in index["alignment"].items()) or "-"
    caption = ["sup/dense: supervised/info-dense tokens; sel: extracted samples; rho: mean per-sample "
               "dense share of supervised tokens over extracted samples (rho_tok: token-weighted)",
               f"rejects: {rejects}",
               f"extractor status: {status}; unmatched spans: {index['unmatched_spans']}",
               f"alignment: {align}"]
    if wall_s is not None:
        caption.append(f"wall {wall_s:.1f} s: {index['num_samples'] / wall_s:,.0f} samples/s, "
                       f"{index['num_tokens'] / wall_s:,.0f} tokens/s; "
                       f"driver peak RSS {_peak_rss_mb():,.0f} MB")
    if timings:
        cpu = sum(t["cpu_s"] for t in timings)
        caption.append(f"{len(timings)} shard task(s) built now: {cpu:.1f} CPU s, "
                       f"max worker peak RSS {max(t['peak_rss_mb'] for t in timings):,.0f} MB")
    t.caption = "\n".join(caption)
    return t


def cmd_run(a: argparse.Namespace) -> int:
    from rich.console import Console

    from preprocess.pipeline import RejectError, read_timings, run_pipeline

    cfg = config_from_args(a)
    t0 = time.perf_counter()
    started = time.time()
    try:
        out = run_pipeline(cfg)
    except RejectError as e:
        print(f"error (--strict): {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    console = Console()
    index_path = Path(out) / "index.json"
    if not index_path.is_file():  # SLURM: jobs submitted, merge job writes index.json later
        console.print(f"submitted; {index_path} appears when the merge job has run")
        return 0
    timings = [t for t in read_timings(cfg) if (cfg.logging_dir / "timing" / f"shard_{t['shard']:05d}.json")
               .stat().st_mtime >= started]
    console.print(summary_table(json.loads(index_path.read_text(encoding="utf-8")), wall, timings))
    console.print(f"output: {out}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from preprocess.shards import verify

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

    from preprocess.shards import ShardedDataset
    from preprocess.spans import Domain

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

    from preprocess.shards import INDEX_FILE

    index = json.loads((Path(a.path) / INDEX_FILE).read_text(encoding="utf-8"))
    console = Console()
    console.print(summary_table(index))
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


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return {"run": cmd_run, "verify": cmd_verify, "inspect": cmd_inspect, "stats": cmd_stats}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
