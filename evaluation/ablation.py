"""Ablation grids: expand a YAML grid into runs, collect each run's metrics, tabulate and plot.

The grid file (see ``launch/ablations/*.yaml``; ``launch/ablate.py`` runs it)::

    output: runs/ablate-small          # everything of the grid goes here
    seeds: [0, 1, 2]                   # each configuration is trained once per seed (train.seed)
    base: {train.max_steps: 60}        # dotted trainer overrides shared by every run
    configs:                           # each entry: dotted overrides; a list value is an axis, and an
      - {masking.mode: uniform}        # entry expands to the cartesian product of its axes
      - {masking.mode: soft, masking.weight: [0.5, 2, 10], masking.complementary: [true, false]}
    metrics: [accuracy_after, loss_dense]   # columns of the table; the first one is plotted

A configuration's label is its own overrides, short keys first-seen order (``mode=soft,weight=2,
complementary=false``); labels are unique within a grid (two identical entries are an error).

Statistics: per configuration and metric, the mean over seeds and the half-width of its 95 %
confidence interval, ``t(0.975, n - 1) * s / sqrt(n)`` with the sample standard deviation ``s``
(Student's t, as seeds are few); with one seed the interval is unknown (``None``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)
"""Student's t 0.975 quantiles for 1..30 degrees of freedom (three decimals, standard tables)."""
_Z975 = 1.959964


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One training run of the grid."""

    label: str
    """The configuration's label (its own overrides)."""
    seed: int
    overrides: dict[str, Any]
    """All dotted overrides of this run: base, then the configuration's, then train.seed."""

    def dir(self, output: Path) -> Path:
        return output / "runs" / re.sub(r"[^A-Za-z0-9=,._-]+", "_", self.label) / f"seed{self.seed}"


@dataclass(slots=True)
class Grid:
    """A parsed grid file."""

    output: Path
    seeds: list[int]
    base: dict[str, Any]
    configs: list[tuple[str, dict[str, Any]]]
    """(label, the configuration's own overrides), in file order."""
    metrics: list[str]
    launcher: list[str] = field(default_factory=list)
    """Command prefix before the train script (default: this Python); e.g. [deepspeed, --num_gpus, 8]."""
    deepspeed: str = "ds_configs/zero3.json"
    evaluate: dict[str, Any] = field(default_factory=dict)
    """Optional extra evaluation per run: {command: [...], results: path, metrics: {name: dotted path}}."""

    def runs(self) -> list[RunSpec]:
        """Every (configuration, seed) pair: seeds outer, configurations in file order inner, so a grid
        stopped part-way has whole seeds of every configuration rather than some configurations only."""
        return [RunSpec(label, seed, {**self.base, **own, "train.seed": seed})
                for seed in self.seeds for label, own in self.configs]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def expand(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One configuration entry -> the cartesian product of its list-valued keys (file order)."""
    keys = list(entry)
    axes = [entry[k] if isinstance(entry[k], list) else [entry[k]] for k in keys]
    for k, axis in zip(keys, axes):
        if not axis:
            raise ValueError(f"key {k!r} has an empty list of values")
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def label_of(overrides: dict[str, Any]) -> str:
    """``mode=soft,weight=2,complementary=false`` (short keys; 'base' when there are none)."""
    return ",".join(f"{_short(k)}={_fmt(v)}" for k, v in overrides.items()) or "base"


def parse_grid(data: dict[str, Any], source: str = "grid") -> Grid:
    """Validate a loaded grid mapping; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: must be a mapping")
    fields = {"output", "seeds", "base", "configs", "metrics", "launcher", "deepspeed", "evaluate"}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}")
    for key in ("output", "configs"):
        if key not in data:
            raise ValueError(f"{source}: field {key!r} is required")
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ValueError(f"{source}: seeds: must be a non-empty list of distinct ints, got {seeds!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ValueError(f"{source}: base: must be a mapping of dotted keys")
    if not isinstance(data["configs"], list) or not data["configs"]:
        raise ValueError(f"{source}: configs: must be a non-empty list")
    configs: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["configs"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: configs[{i}]: must be a mapping of dotted keys")
        try:
            expanded = expand(entry)
        except ValueError as e:
            raise ValueError(f"{source}: configs[{i}]: {e}") from None
        for own in expanded:
            label = label_of(own)
            if label in seen:
                raise ValueError(f"{source}: configs[{i}]: configuration {label!r} appears twice")
            seen.add(label)
            configs.append((label, own))
    metrics = data.get("metrics") or ["accuracy_after"]
    launcher = data.get("launcher") or []
    return Grid(output=Path(data["output"]), seeds=seeds, base=base, configs=configs,
                metrics=[str(m) for m in metrics], launcher=[str(a) for a in launcher],
                deepspeed=str(data.get("deepspeed", "ds_configs/zero3.json")),
                evaluate=data.get("evaluate") or {})


def load_grid(path: str | Path) -> Grid:
    with open(path, encoding="utf-8") as f:
        return parse_grid(yaml.safe_load(f), str(path))


# ------------------------------------------------------------------------------------------ statistics


def t975(df: int) -> float:
    """Student's t 0.975 quantile: the table up to 30 df, a Cornish-Fisher expansion above (< 0.001 off)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % interval), None for the width with a single value."""
    if not values:
        raise ValueError("mean_ci: no values")
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(grid: Grid, results: dict[tuple[str, int], dict[str, float]]) -> list[dict]:
    """Rows per configuration: {label, overrides, n, metrics: {name: {mean, ci95, values}}}.

    ``results`` maps (label, seed) to that run's metrics; missing runs or metrics are left out of
    the statistics and show in ``n`` (the seeds that finished).
    """
    rows = []
    for label, own in grid.configs:
        done = [results[(label, s)] for s in grid.seeds if (label, s) in results]
        stats = {}
        for name in grid.metrics:
            vals = [float(r[name]) for r in done if name in r and r[name] is not None]
            if vals:
                m, ci = mean_ci(vals)
                stats[name] = {"mean": m, "ci95": ci, "values": vals}
        rows.append({"label": label, "overrides": own, "n": len(done), "metrics": stats})
    return rows


def markdown_table(grid: Grid, rows: list[dict]) -> str:
    """One line per configuration: ``mean ± ci`` per metric over the finished seeds."""
    head = ["configuration", "seeds", *grid.metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['label']}`", str(r["n"])]
        for name in grid.metrics:
            s = r["metrics"].get(name)
            if s is None:
                cells.append("—")
            else:
                ci = "" if s["ci95"] is None else f" ± {s['ci95']:.3f}"
                cells.append(f"{s['mean']:.3f}{ci}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(grid: Grid, rows: list[dict], stem: Path) -> list[Path]:
    """``stem``.md, ``stem``.json and (when the grid has soft runs) ``stem``.png; written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix, text in ((".md", markdown_table(grid, rows)),
                         (".json", json.dumps({"seeds": grid.seeds, "metrics": grid.metrics, "rows": rows},
                                              indent=1) + "\n")):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        out.append(path)
    png = plot_vs_weight(rows, grid.metrics[0], stem.with_suffix(".png"))
    if png is not None:
        out.append(png)
    return out


def plot_vs_weight(rows: list[dict], metric: str, path: Path) -> Path | None:
    """The paper's Figure 4: ``metric`` against w (log axis) for soft masking, one line per complement
    setting, with the uniform and hard runs as horizontal references; error bars are the 95 % CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mode(r: dict) -> str:
        return str(r["overrides"].get("masking.mode", "soft"))

    def comp(r: dict) -> bool:
        return bool(r["overrides"].get("masking.complementary", True))

    soft = [r for r in rows if mode(r) == "soft" and metric in r["metrics"]]
    if not soft:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {True: "tab:blue", False: "tab:orange"}
    for c in (True, False):
        pts = sorted((float(r["overrides"].get("masking.weight", 2.0)), r["metrics"][metric])
                     for r in soft if comp(r) == c)
        if pts:
            ax.errorbar([w for w, _ in pts], [s["mean"] for _, s in pts],
                        yerr=[s["ci95"] or 0.0 for _, s in pts], marker="o", capsize=3, color=colors[c],
                        label=f"soft, {'with' if c else 'without'} complement")
    styles = {"uniform": ":", "hard": "--"}
    for r in rows:
        if mode(r) in styles and metric in r["metrics"]:
            ax.axhline(r["metrics"][metric]["mean"], linestyle=styles[mode(r)], color=colors[comp(r)],
                       alpha=0.7, label=f"{mode(r)}, {'with' if comp(r) else 'without'} complement")
    ax.set_xscale("log")
    ax.set_xlabel("priority weight w (soft masking)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
