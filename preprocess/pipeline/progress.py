"""Live progress (per task + overall) of a run, and the summary table of a folder.

Each running shard task writes its counters (records, samples, tokens, input bytes read and the
bytes its units cover) to ``<logging dir>/progress/shard_XXXXX.json`` about twice a second
(``ShardJob.report_progress``).  ``LiveProgress`` polls these files from a thread of the driver
process and redraws; only reports of tasks that started in this run count, so neither the live
rates nor the final summary include shards a rerun skipped.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from pathlib import Path
from typing import Any


def read_progress(logging_dir: Path, since: float) -> list[dict[str, Any]]:
    """The task reports written by tasks that started at or after ``since`` (epoch seconds)."""
    out = []
    for p in sorted((Path(logging_dir) / "progress").glob("shard_*.json")):
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):  # replaced while we read it: next poll
            continue
        if state["start"] >= since:
            out.append(state)
    return out


PLAN_FILE = "plan.json"


def write_plan_bytes(logging_dir: Path, todo: dict[int, int]) -> None:
    """Input bytes of each shard this run will build, so the overall ETA covers tasks not started."""
    folder = Path(logging_dir) / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PLAN_FILE).write_text(json.dumps({"time": time.time(), "bytes": todo}))


def _planned_bytes(logging_dir: Path, since: float) -> int | None:
    try:
        plan = json.loads((Path(logging_dir) / "progress" / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return sum(plan["bytes"].values()) if plan["time"] >= since else None


def _rates(s: dict[str, Any], elapsed: float) -> tuple[str, str, str, str, str]:
    el = max(elapsed, 1e-9)
    left = s["bytes_total"] - s["bytes"]
    speed = s["bytes"] / el
    eta = "done" if s.get("done") else (f"{left / speed:,.0f} s" if speed > 0 else "?")
    pct = 100.0 * s["bytes"] / s["bytes_total"] if s["bytes_total"] else 100.0
    return (f"{s['records'] / el:,.0f}", f"{s['tokens'] / el:,.0f}", f"{speed / 1e6:,.1f}",
            f"{min(pct, 100.0):.0f} %", eta)


def progress_table(states: list[dict[str, Any]], now: float, num_shards: int, since: float,
                   planned_bytes: int | None = None) -> Any:
    """Running tasks, one row each, and an overall row (rates over the wall time of this run; its
    ETA over ``planned_bytes``, all the input of the shards this run builds, when known)."""
    from rich.table import Table

    t = Table(title=f"dm-preprocess: {sum(s['done'] for s in states)} of {len(states)} task(s) of this run "
                    f"done ({num_shards} shards)", title_justify="left")
    for col in ("task", "records/s", "tokens/s", "MB/s", "read", "ETA"):
        t.add_column(col, justify="right")
    for s in states:
        if not s["done"]:
            t.add_row(f"shard {s['shard']}", *_rates(s, s["now"] - s["start"]))
    total = {k: sum(s[k] for s in states) for k in ("records", "tokens", "bytes", "bytes_total")}
    if planned_bytes is not None:
        total["bytes_total"] = planned_bytes
    total["done"] = bool(states) and all(s["done"] for s in states) and total["bytes"] >= total["bytes_total"]
    t.add_row("all", *_rates(total, now - since), style="bold")
    return t


class LiveProgress:
    """``with LiveProgress(logging_dir, num_shards):`` redraws the table until the block ends."""

    def __init__(self, logging_dir: Path, num_shards: int, console: Any, every_s: float = 0.5) -> None:
        self.logging_dir, self.num_shards = logging_dir, num_shards
        self.console, self.every_s = console, every_s
        self.since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _render(self) -> Any:
        return progress_table(read_progress(self.logging_dir, self.since), time.time(), self.num_shards,
                              self.since, _planned_bytes(self.logging_dir, self.since))

    def _loop(self) -> None:
        from rich.live import Live

        with Live(self._render(), console=self.console, transient=True, auto_refresh=False) as live:
            while not self._stop.wait(self.every_s):
                live.update(self._render(), refresh=True)

    def __enter__(self) -> LiveProgress:
        if self.console.is_terminal:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _peak_rss_mb() -> float:
    """Peak RSS of this (driver) process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_table(index: dict[str, Any], wall_s: float | None = None,
                  timings: list[dict[str, Any]] | None = None) -> Any:
    """The folder's table; with ``wall_s``/``timings`` (a run), a line about the work of this run."""
    from rich.table import Table

    from preprocess.rho_stats import budget_line

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
    shard_tokens = [s["num_tokens"] for s in index["shards"]]
    balance = max(shard_tokens) * len(shard_tokens) / sum(shard_tokens) if sum(shard_tokens) else 1.0
    caption = ["sup/dense: supervised/info-dense tokens; sel: extracted samples; rho: mean per-sample "
               "dense share of supervised tokens over extracted samples (rho_tok: token-weighted)",
               f"read: {index.get('records_read', 0):,} records, {index.get('blank_lines', 0):,} blank "
               "lines, "
               f"{index.get('bytes_read', 0) / 1e6:,.1f} MB; largest shard {balance:.2f}x the mean in tokens",
               f"rejects: {rejects}",
               f"extractor status: {status}; unmatched spans: {index['unmatched_spans']}",
               f"alignment: {align}"]
    if budget := budget_line(index):
        caption.append(budget)
    if wall_s is not None:
        caption.append(_this_run(index, wall_s, timings or []))
    t.caption = "\n".join(caption)
    return t


def _this_run(index: dict[str, Any], wall_s: float, timings: list[dict[str, Any]]) -> str:
    """Rates over the shards built by this run only (a rerun that skipped everything says so)."""
    if not timings:
        return f"this run: nothing to do, all {index['num_shards']} shards were complete ({wall_s:.1f} s)"
    samples = sum(t["num_samples"] for t in timings)
    tokens = sum(t["num_tokens"] for t in timings)
    mb = sum(t.get("bytes_read", 0) for t in timings) / 1e6
    cpu = sum(t["cpu_s"] for t in timings)
    return (f"this run: {len(timings)} shard(s) built in {wall_s:.1f} s: {samples / wall_s:,.0f} samples/s, "
            f"{tokens / wall_s:,.0f} tokens/s, {mb / wall_s:,.1f} MB/s; {cpu:.1f} CPU s; max worker "
            f"peak RSS {max(t['peak_rss_mb'] for t in timings):,.0f} MB, driver {_peak_rss_mb():,.0f} MB")
