"""Paper-style Table 1 (Markdown) and a grouped bar chart from one or more results JSONs.

Rows are checkpoints (the ``name`` of each results file, in the order given), columns the four
benchmarks in the paper's order plus AVG.  AVG is the mean over the benchmarks a row has; a row
missing some is marked with † so a partial average is never mistaken for the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.benchmarks import BENCHMARKS, ORDER
from evaluation.runner import RESULTS_FORMAT


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a {RESULTS_FORMAT} results file (format={data.get('format')!r})"
                         if isinstance(data, dict) else f"{path}: not a results object")
    for name, b in data.get("benchmarks", {}).items():
        if name not in BENCHMARKS or "score" not in b or "n" not in b:
            raise ValueError(f"{path}: benchmarks.{name}: unknown benchmark or missing score/n")
    return data


Row = tuple[str, list[float | None], float | None, bool]


def table_rows(results: list[dict]) -> tuple[list[str], list[Row]]:
    """-> (columns present in any result, rows of (name, scores per column, avg, partial))."""
    cols = [b for b in ORDER if any(b in r["benchmarks"] for r in results)]
    rows = []
    for r in results:
        scores = [r["benchmarks"][b]["score"] if b in r["benchmarks"] else None for b in cols]
        present = [s for s in scores if s is not None]
        avg = sum(present) / len(present) if present else None
        rows.append((r["name"], scores, avg, len(present) < len(ORDER)))
    return cols, rows


def markdown_table(results: list[dict]) -> str:
    """The paper's Table 1 shape: | Checkpoint | HumanEval | MBPP | GSM8K | MATH500 | AVG |."""
    cols, rows = table_rows(results)
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    head = "| Checkpoint | " + " | ".join(BENCHMARKS[c].title for c in cols) + " | AVG |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, scores, avg, partial in rows:
        mark = "†" if partial else ""
        lines.append(f"| {name} | " + " | ".join(fmt(s) for s in scores) + f" | {fmt(avg)}{mark} |")
    ns = []
    for r in results:
        parts = ", ".join(f"{BENCHMARKS[b].title} {r['benchmarks'][b]['n']}"
                          for b in cols if b in r["benchmarks"])
        ns.append(f"{r['name']}: {parts}")
    lines += ["", "Pass@1 (HumanEval, MBPP) and accuracy (GSM8K, MATH500), in %. Problems evaluated: "
              + "; ".join(ns) + "."]
    if any(p for *_, p in rows):
        lines.append("† average over the benchmarks evaluated for that row, not all four.")
    d = results[0].get("decode", {})
    # kv_cache is left out: it gives the same tokens
    # The prompt format (chat template or not) changes what the model sees as much as decoding does.
    settings = lambda r: ({k: v for k, v in r.get("decode", {}).items() if k != "kv_cache"},
                          r.get("chat_template"))
    differ = [r["name"] for r in results[1:] if settings(r) != settings(results[0])]
    if differ:
        lines.append(f"Warning: decoding settings differ from the first row's for: {', '.join(differ)}.")
    # Scores over different problem sets (e.g. one run with --limit) are not comparable.
    subset = [c for c in cols
              if len({r["benchmarks"][c]["n"] for r in results if c in r["benchmarks"]}) > 1]
    if subset:
        lines.append("Warning: rows were scored on different numbers of problems for: "
                     + ", ".join(BENCHMARKS[c].title for c in subset) + ".")
    if d:
        extra = ""
        if d.get("min_transfer") is not None:
            extra += f", at least {d['min_transfer']} per step"
        if d.get("editing_threshold") is not None:
            extra += f", editing above {d['editing_threshold']} (<= {d.get('max_post_steps')} post steps)"
        lines.append(f"Decoding: gen length {d.get('gen_length')}, block {d.get('block_size')}, "
                     f"{d.get('steps_per_block')} steps/block, temperature {d.get('temperature')}, "
                     f"remasking {d.get('remasking')} (threshold {d.get('threshold')}){extra}.")
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: str | Path) -> Path:
    """Grouped bars: benchmarks (and AVG) on x, one bar per checkpoint; PNG via the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = table_rows(results)
    labels = [BENCHMARKS[c].title for c in cols] + ["AVG"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    for k, (name, scores, avg, _) in enumerate(rows):
        vals = [s if s is not None else 0.0 for s in scores] + [avg or 0.0]
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
