"""``dm-evaluate``: evaluate a checkpoint on the paper's benchmarks and build the Table 1 report.

    dm-evaluate run --model tiny --benchmarks gsm8k,mbpp --limit 8 --gen-length 64 --out outputs/eval
    dm-evaluate run --model runs/ours/hf --name "Ours (w=2)"    # all four benchmarks, paper settings
    dm-evaluate report outputs/eval/Original.json outputs/eval/Baseline.json outputs/eval/Ours_w_2.json
    dm-evaluate selfcheck --benchmarks gsm8k,mbpp       # reference answers must score 100 %
    dm-evaluate score --completions vllm_mbpp.jsonl --benchmark mbpp   # completions made elsewhere
    dm-evaluate sandbox-info                            # which isolation layers are active here

Completions for ``score``: one JSON object per line, ``{"task_id": ..., "completion": "..."}``, with the
benchmark file's task ids (GSM8K and MATH500 lines without one are numbered ``<benchmark>/<line>``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from evaluation.benchmarks import BENCHMARKS, ORDER, DataError
from evaluation.sandbox import SandboxLimits, SandboxUnavailable, sandbox_layers
from trainer.families import LAYOUTS
from trainer.generation import DECODING_PRESETS, REMASKING, DecodeConfig
from trainer.masking import BLOCK_SIZE


def _benchmarks(text: str) -> tuple[str, ...]:
    names = tuple(b.strip().lower() for b in text.split(",") if b.strip())
    if names == ("all",):
        return ORDER
    bad = [b for b in names if b not in BENCHMARKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {bad}; choose from {', '.join(ORDER)} "
                                         "or 'all'")
    return names


def _editing_threshold(text: str) -> float | str:
    if text.lower() == "off":
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability or 'off', got {text!r}") from None


def _decode_settings(args: argparse.Namespace) -> dict:
    """Decoding settings: the ``--decoding`` preset's, overridden by each flag given explicitly."""
    settings = dict(DECODING_PRESETS.get(args.decoding, {}))
    for key in ("threshold", "max_post_steps", "min_transfer"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.editing_threshold is not None:
        settings["editing_threshold"] = None if args.editing_threshold == "off" else args.editing_threshold
    return settings


def _add_data_args(p: argparse.ArgumentParser, single: bool = False) -> None:
    if single:
        p.add_argument("--benchmark", choices=ORDER, required=True, help="which benchmark the file answers")
    else:
        p.add_argument("--benchmarks", type=_benchmarks, default=ORDER,
                       help=f"comma list of {','.join(ORDER)} or 'all' (default all)")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                   help="folder holding <benchmark>/<file>.jsonl (default ../shared/data, relative to CWD)")
    for name, b in BENCHMARKS.items():
        p.add_argument(f"--{name}", type=Path, default=None, metavar="PATH",
                       help=f"{b.title} JSONL file (default <data-dir>/{b.default_path})")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--workers", type=int, default=2, help="programs run in parallel in the sandbox")
    _add_sandbox_args(p)


def _add_sandbox_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (MiB)")
    p.add_argument("--sandbox-python", default="",
                   help="interpreter for the programs (default: this one's base install, outside any venv)")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="run programs WITHOUT kernel isolation (rlimits and an audit hook only), for "
                        "trusted code where the kernel refuses namespaces; see docs/sandbox.md")


def _paths(args: argparse.Namespace) -> dict[str, Path]:
    paths = {}
    for name in getattr(args, "benchmarks", None) or (args.benchmark,):
        given = getattr(args, name)
        path = given if given is not None else args.data_dir / BENCHMARKS[name].default_path
        if not path.is_file():
            hint = f"--{name} {given}" if given is not None else \
                f"--data-dir {args.data_dir} (looked for {path}); pass --data-dir or --{name} PATH"
            raise FileNotFoundError(f"{BENCHMARKS[name].title} data not found: {hint}")
        paths[name] = path
    return paths


def _limits(args: argparse.Namespace) -> SandboxLimits:
    if args.unsafe_no_isolation:
        print("dm-evaluate: WARNING: --unsafe-no-isolation: programs run without kernel isolation "
              "(trusted code only; see docs/sandbox.md)", file=sys.stderr)
    return SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb, python=args.sandbox_python,
                         isolation=not args.unsafe_no_isolation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dm-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate + score one checkpoint; writes results JSON, table, chart")
    run.add_argument("--model", default="tiny", help="'tiny' (built-in default) or an HF model folder")
    run.add_argument("--name", default="", help="row label in the table (default: model folder name)")
    _add_data_args(run)
    run.add_argument("--gen-length", type=int, default=512, help="max new tokens (paper: 512)")
    run.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                     help=f"tokens per block; match training (default {BLOCK_SIZE}, as the paper)")
    run.add_argument("--steps-per-block", type=int, default=32, help="max model calls per block (paper: 32)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper)")
    run.add_argument("--decoding", choices=sorted(DECODING_PRESETS), default=None,
                     help="LLaDA2.1's published modes (threshold / editing threshold): llada2.1-quality "
                          "0.7 / 0.5, llada2.1-speed 0.5 / off; flags given below override the preset "
                          "(default: the paper's LLaDA2.0 settings)")
    run.add_argument("--threshold", type=float, default=None,
                     help="accept tokens above this confidence at once (remasking=threshold; default 0.95 "
                          "or the preset's)")
    run.add_argument("--editing-threshold", type=_editing_threshold, default=None,
                     help="LLaDA2.1 editing: replace a written token of the current block when another token "
                          "is predicted above this probability; 'off' (default) disables it")
    run.add_argument("--max-post-steps", type=int, default=None,
                     help="with editing: steps allowed after a block's last mask is filled (default 16)")
    run.add_argument("--min-transfer", type=int, default=None,
                     help="LLaDA2.1: accept at least this many masks per step with no step limit, instead "
                          "of the --steps-per-block schedule (default: the schedule)")
    run.add_argument("--remasking", choices=REMASKING, default="threshold",
                     help="threshold (LLaDA2, default) or low_confidence (LLaDA)")
    run.add_argument("--kv-cache", choices=["auto", "on", "off"], default="auto",
                     help="cache finished blocks' keys/values (same tokens, fewer FLOPs); auto = on where "
                          "the model's family and the layout allow it (not Dream; layout block only)")
    run.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto",
                     help="attention while decoding: block (block-causal) or full (whole canvas); auto = the "
                          "run's objective.layout when known, else the family's default")
    run.add_argument("--no-chat-template", action="store_true", help="feed the bare prompt")
    run.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    run.add_argument("--seed", type=int, default=0, help="model init for 'tiny' and sampling noise")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    run.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder")

    rep = sub.add_parser("report", help="merge results JSONs into one table (.md) and chart (.png)")
    rep.add_argument("results", nargs="+", type=Path)
    rep.add_argument("--out", type=Path, default=Path("outputs/eval/table"),
                     help="output stem: writes <out>.md and <out>.png")

    chk = sub.add_parser("selfcheck", help="score the benchmarks' reference answers (must be 100 %%)")
    _add_data_args(chk)
    chk.add_argument("--out", type=Path, default=None, help="also write the records as JSON here")

    sc = sub.add_parser("score", help="score completions/answers produced elsewhere (vLLM, SGLang, ...)")
    sc.add_argument("--completions", type=Path, required=True, help="JSONL: task_id and completion per line")
    _add_data_args(sc, single=True)
    sc.add_argument("--name", default="", help="row label in the table (default: the completions file name)")
    sc.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder")

    info = sub.add_parser("sandbox-info", help="print the sandbox's active layers and limits as JSON")
    _add_sandbox_args(info)
    return parser


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def cmd_run(args: argparse.Namespace) -> int:
    from evaluation.report import bar_chart, markdown_table
    from evaluation.runner import EvalConfig, run_evaluation, write_results

    decode = DecodeConfig(gen_length=args.gen_length, block_size=args.block_size,
                          steps_per_block=args.steps_per_block, temperature=args.temperature,
                          remasking=args.remasking, kv_cache=args.kv_cache == "on",
                          layout="block" if args.layout == "auto" else args.layout, **_decode_settings(args))
    cfg = EvalConfig(model=args.model, name=args.name, benchmarks=args.benchmarks, paths=_paths(args),
                     limit=args.limit, decode=decode, batch_size=args.batch_size, seed=args.seed,
                     use_chat_template=not args.no_chat_template, sandbox=_limits(args), workers=args.workers,
                     device=args.device, dtype=args.dtype, kv_cache_auto=args.kv_cache == "auto",
                     layout_auto=args.layout == "auto")
    stem = args.out / _slug(cfg.name)
    results = run_evaluation(cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
                             on_benchmark=lambda r: write_results(r, stem.with_suffix(".json")))
    table = markdown_table([results])
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    bar_chart([results], stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluation.report import bar_chart, load_results, markdown_table

    results = [load_results(p) for p in args.results]
    table = markdown_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    bar_chart(results, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from evaluation.runner import EvalConfig, self_check

    cfg = EvalConfig(benchmarks=args.benchmarks, paths=_paths(args), limit=args.limit, sandbox=_limits(args),
                     workers=args.workers)
    summary = self_check(cfg)
    failed = 0
    for name, s in summary.items():
        print(f"{BENCHMARKS[name].title}: {s['score']:.2f} % ({s['correct']}/{s['n']}) "
              f"in {s['scoring_s']:.1f} s")
        for r in s["records"]:
            if not r["passed"]:
                failed += 1
                why = r.get("stderr", "")[-200:]
                print(f"  FAIL {r['source']} task {r['task_id']}: {r['status']} {why!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 1 if failed else 0


def cmd_score(args: argparse.Namespace) -> int:
    from evaluation.benchmarks import load_benchmark
    from evaluation.report import bar_chart, markdown_table
    from evaluation.runner import score_completions, write_results

    if not args.completions.is_file():
        raise FileNotFoundError(f"completions file {args.completions} not found")
    problems = load_benchmark(args.benchmark, _paths(args)[args.benchmark], args.limit)
    results, errors = score_completions(args.benchmark, problems, args.completions, _limits(args),
                                        args.workers, label=args.name)
    for e in errors:
        print(f"dm-evaluate: skipped line: {e}", file=sys.stderr)
    summary = results["benchmarks"][args.benchmark]
    stem = args.out / _slug(results["name"])
    write_results(results, stem.with_suffix(".json"))
    table = markdown_table([results])
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    bar_chart([results], stem.with_suffix(".png"))
    print(table)
    print(f"{summary['missing']} problem(s) without a completion (scored 0), "
          f"{len(errors)} bad line(s) skipped")
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "selfcheck":
            return cmd_selfcheck(args)
        if args.command == "score":
            return cmd_score(args)
        print(json.dumps(sandbox_layers(_limits(args)), indent=1))
        return 0
    except SandboxUnavailable as e:
        print(f"dm-evaluate: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DataError, ValueError) as e:
        print(f"dm-evaluate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
