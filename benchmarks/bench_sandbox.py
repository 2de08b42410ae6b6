"""Per-program cost of the kernel-isolated sandbox against the sandbox it replaced, side by side.

Run from the repo root (needs git: the previous sandbox is loaded from the commit that still had it):

    python benchmarks/bench_sandbox.py                  # fixture HumanEval + MBPP references, 5 rounds
    python benchmarks/bench_sandbox.py --rounds 10 --workers 2

The same reference solutions (tests/data/eval HumanEval and MBPP fixtures, plus the full MBPP test
split when ``--mbpp PATH`` is given) are scored by both: the previous sandbox (one ``python -I``
process under ``unshare -n`` with an audit hook, tests in the same process) and the current one
(bubblewrap namespaces + seccomp for the solution, tests run by the harness over a pipe).  Rounds
alternate old/new so that a busy machine slows both alike.  Prints the median wall time per program
of each, and their ratio (goal: < 2x).  ``--unsafe`` adds the current protocol without isolation,
to split the cost between bubblewrap and the two-process protocol.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.benchmarks import load_benchmark, reference_completion  # noqa: E402
from evaluation.sandbox import SandboxLimits, run_programs, sandbox_layers  # noqa: E402
from evaluation.scoring import PROGRAM_BUILDERS  # noqa: E402

PREVIOUS = "ec69244"  # last commit with the audit-hook sandbox (evaluation/sandbox.py)
FIXTURES = REPO / "tests" / "data" / "eval"


def load_previous_sandbox():
    """The previous ``evaluation/sandbox.py``, imported from git history as its own module."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{PREVIOUS}:evaluation/sandbox.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-sandbox-")) / "previous_sandbox.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("previous_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def single_file(program) -> str:
    """The previous sandbox's one-process form of a program: solution, then the tests after it."""
    tail = f"\ncheck({program.entry_point})\n" if program.entry_point else "\n"
    return f"{program.solution}\n{program.tests}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="programs in parallel (1 = per-program latency)")
    ap.add_argument("--mbpp", type=Path, default=None,
                    help="also the first --limit problems of this MBPP file")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--unsafe", action="store_true", help="also time the protocol without isolation")
    args = ap.parse_args()

    problems = load_benchmark("humaneval", FIXTURES / "humaneval_mini.jsonl") + \
        load_benchmark("mbpp", FIXTURES / "mbpp_mini.jsonl")
    if args.mbpp:
        problems += load_benchmark("mbpp", args.mbpp, args.limit)
    programs = [PROGRAM_BUILDERS[p.benchmark](p.record, reference_completion(p)) for p in problems]
    old = load_previous_sandbox()
    old_limits = old.SandboxLimits(timeout_s=20)
    new_limits = SandboxLimits(timeout_s=20)
    old_layers = {k: v for k, v in old.sandbox_layers(old_limits).items() if k != "limits"}
    print(f"old layers: {old_layers}")
    print(f"new layers: {sandbox_layers(new_limits)['isolation']}, seccomp, verdict by the harness")
    sides = {"old": lambda: old.run_programs([single_file(p) for p in programs], old_limits, args.workers),
             "new": lambda: run_programs(programs, new_limits, args.workers)}
    if args.unsafe:
        unsafe = SandboxLimits(timeout_s=20, isolation=False)
        sides["new --unsafe-no-isolation"] = lambda: run_programs(programs, unsafe, args.workers)
    for name, fn in sides.items():  # warm-up, and every reference must pass on both
        bad = [i for i, r in enumerate(fn()) if not r.passed]
        if bad:
            print(f"{name}: reference solutions failed: {[problems[i].task_id for i in bad]}")
            return 1
    per_program: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            per_program[name].append((time.perf_counter() - start) / len(programs))
    med = {name: statistics.median(ts) for name, ts in per_program.items()}
    print(f"\n{len(programs)} programs x {args.rounds} rounds, {args.workers} worker(s); "
          "median wall time per program:")
    for name, t in med.items():
        print(f"  {name:28s} {1000 * t:8.1f} ms   ratio to old {t / med['old']:.2f}x")
    ratio = med["new"] / med["old"]
    print(f"\nnew / old = {ratio:.2f}x (goal < 2x): {'OK' if ratio < 2 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
