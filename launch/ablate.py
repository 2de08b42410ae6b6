"""Run an ablation grid (configurations x seeds) through the normal trainer, then tabulate and plot it.

    python launch/ablate.py launch/ablations/small.yaml              # run what is missing, then report
    python launch/ablate.py launch/ablations/small.yaml --dry-run    # list the runs and their state
    python launch/ablate.py launch/ablations/small.yaml --report     # only rebuild table and plot
    python launch/ablate.py launch/ablations/small.yaml --jobs 2     # two runs at a time (CPU)

Each run is one ``launch/train.py`` process (or the grid's ``launcher``, e.g. ``deepspeed --num_gpus 8``)
with the grid's overrides, writing ``<output>/runs/<label>/seed<k>/``; the trainer itself scores the
built-in task (``eval.json``), and a grid may add an evaluation command (the paper grid's
benchmarks).  A run is finished when its ``result.json`` exists (written last, atomically); finished
runs are skipped, so rerunning the command resumes the grid, and an interrupted run resumes from its
own checkpoint.  ``--jobs N`` runs N runs at once, each with ``OMP_NUM_THREADS`` = cores / N (so they
share the cores without oversubscribing them).  Runs without their own ``data.path`` share one data
folder per distinct ``task.*`` setting under ``<output>/data/``.  The table (mean ± 95 % interval
over seeds, per metric) goes to ``<output>/results.md`` and ``.json``, the plot (first metric vs w) to
``<output>/results.png``.

Exit codes: 0 all runs finished; 1 some run failed (the others still ran; see its train.log);
2 bad grid file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from evaluation.ablation import Grid, RunSpec, load_grid, summarise, write_reports  # noqa: E402

DATA_KEYS = ("task.name", "task.extractor", "task.fraction", "task.train_size", "task.seed")
"""The overrides that change what is preprocessed into data.path (trainer.config.TaskConfig)."""


def data_dir(grid: Grid, run: RunSpec) -> str:
    """The run's data.path: its own, or one folder per distinct setting of the DATA_KEYS."""
    if "data.path" in run.overrides:
        return str(run.overrides["data.path"])
    task = {k: v for k, v in sorted(run.overrides.items()) if k in DATA_KEYS}
    name = ",".join(f"{k[5:]}={v}" for k, v in task.items()) or "default"
    return str(grid.output / "data" / name)


def ensure_data(grid: Grid, run: RunSpec) -> None:
    """Build the run's shared data folder from its ``task.*`` settings if it is missing (the trainer
    itself builds only the default folders, so that a misspelt data.path is never filled)."""
    path = Path(data_dir(grid, run))
    if "data.path" in run.overrides or (path / "index.json").is_file():
        return
    from tasks.builtin import build_data
    from trainer.config import TaskConfig

    build_data(TaskConfig(**{k[5:]: v for k, v in run.overrides.items() if k.startswith("task.")}), path)


def train_command(grid: Grid, run: RunSpec) -> list[str]:
    cmd = [*(grid.launcher or [sys.executable]), str(REPO / "launch/train.py"), "--deepspeed", grid.deepspeed]
    overrides = {**run.overrides, "data.path": data_dir(grid, run),
                 "checkpoint.output_dir": str(run.dir(grid.output)), "metrics.progress": False}
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)]
    return cmd


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def collect(grid: Grid, run_dir: Path) -> dict[str, float]:
    """A finished run's metrics: eval.json numbers, the last logged losses, the extra evaluation's."""
    out: dict[str, float] = {}
    ev = run_dir / "eval.json"
    if ev.is_file():
        out.update({k: v for k, v in json.loads(ev.read_text(encoding="utf-8")).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "heldout"})
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        last = [r for r in lines if "loss_dense" in r]
        if last:
            out.update({k: last[-1][k] for k in ("loss", "loss_dense", "loss_other")})
    if grid.evaluate:
        res = Path(str(grid.evaluate["results"]).format(run_dir=run_dir))
        data = json.loads(res.read_text(encoding="utf-8"))
        out.update({name: float(_dig(data, path)) for name, path in grid.evaluate["metrics"].items()})
    return out


def run_one(grid: Grid, run: RunSpec, threads: int | None = None) -> bool:
    """Train (and evaluate) one run; write its result.json.  False if a step failed.

    ``threads``: OMP_NUM_THREADS of the run's processes (None: inherit)."""
    run_dir = run.dir(grid.output)
    if (run_dir / "result.json").is_file():  # stale (other overrides): keep it aside, start afresh
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.stale-{int(time.time())}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.perf_counter()
    cpu = 0.0
    steps = [train_command(grid, run)]
    if grid.evaluate:
        steps.append([str(a).format(run_dir=run_dir) for a in grid.evaluate["command"]])
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        for cmd in steps:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            # wait4: this child's own CPU time (with its waited-for descendants), also when runs overlap
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            if rc != 0:
                print(f"[ablate] {run.label} seed {run.seed}: exit {rc}; see {run_dir / 'train.log'}",
                      flush=True)
                return False
    result = {"label": run.label, "seed": run.seed, "overrides": run.overrides,
              "metrics": collect(grid, run_dir), "wall_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round(cpu, 1), "threads": threads}
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "result.json")
    return True


def load_results(grid: Grid) -> dict[tuple[str, int], dict[str, float]]:
    """(label, seed) -> metrics of every finished run made with the grid's current overrides (a
    result from an edited grid is stale: it is redone, and its old folder is archived first)."""
    out = {}
    for run in grid.runs():
        path = run.dir(grid.output) / "result.json"
        if path.is_file():
            result = json.loads(path.read_text(encoding="utf-8"))
            if result.get("overrides") == json.loads(json.dumps(run.overrides)):
                out[(run.label, run.seed)] = result["metrics"]
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, help="grid YAML (launch/ablations/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are finished")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    p.add_argument("--output", type=Path, default=None, help="override the grid's output folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (each with OMP_NUM_THREADS = cores / jobs; default 1: one at a time)")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output is not None:
        grid.output = args.output
    runs = grid.runs()
    done = load_results(grid)
    print(f"[ablate] {args.grid}: {len(grid.configs)} configurations x {len(grid.seeds)} seeds = "
          f"{len(runs)} runs, {len(done)} finished, output {grid.output}", flush=True)
    if args.dry_run:
        for run in runs:
            state = "done" if (run.label, run.seed) in done else "todo"
            print(f"  {state}  {run.label}  seed {run.seed}")
        return 0
    if args.jobs < 1:
        print(f"error: --jobs: must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    failed = 0
    if not args.report:
        todo = [r for r in runs if (r.label, r.seed) not in done]
        for run in todo:  # shared data folders first, once each, before runs may overlap
            ensure_data(grid, run)
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

        def one(item: tuple[int, RunSpec]) -> bool:
            i, run = item
            print(f"[ablate] run {i}/{len(todo)}: {run.label} seed {run.seed}", flush=True)
            return run_one(grid, run, threads)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            failed = sum(not ok for ok in pool.map(one, enumerate(todo, 1)))
        done = load_results(grid)
    paths = write_reports(grid, summarise(grid, done), grid.output / "results")
    print(f"[ablate] wrote {', '.join(str(p) for p in paths)}")
    print((grid.output / "results.md").read_text(encoding="utf-8"), end="")
    if failed:
        print(f"[ablate] {failed} run(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
