"""The rho distribution of a preprocessed folder, per domain, and the samples that stand out.

``dm-preprocess stats`` prints, per domain, a text histogram of the per-sample rho (info-dense tokens /
supervised tokens of each extracted sample, the paper's §3.2 figure whose mean is the ``rho`` of the
summary), its p10 / median / p90 / max, and outliers:

- ``high``: rho above a threshold (default: twice the paper's GPT-4o rho for the domain, capped at 1;
  at rho near 0.5 priority masking is close to uniform masking, so such samples lose the method's
  point);
- ``zero``: extracted samples with no info-dense token although their domain was extracted (the
  extractor found nothing, or its spans did not align).

Outliers are listed with their global index and id (``dm-preprocess inspect --index I`` or
``--key ID`` shows one; a record without an id field has ``<file>:<line>`` as its id).  Flags are
read per shard from the memory maps, vectorised: no per-sample Python work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocess.extractors.base import PAPER_RHO
from preprocess.shards import FLAG_INFO_DENSE, FLAG_SELECTED, FLAG_SUPERVISED, Domain, ShardedDataset

BIN_WIDTH = 0.05


@dataclass(frozen=True, slots=True)
class DomainRho:
    """Per extracted sample of one domain: global index, rho, info-dense token count."""

    index: np.ndarray  # int64 [n]
    rho: np.ndarray  # float64 [n]
    dense: np.ndarray  # int64 [n]


def sample_rhos(ds: ShardedDataset) -> dict[str, DomainRho]:
    """Extracted (selected) samples per domain name, in global index order."""
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    first = 0  # global index of the shard's first sample
    for k in range(len(ds.shard_names)):
        r = ds.shard(k)
        first, start = first + r.num_samples, first
        if r.num_samples == 0:
            continue
        offs = np.asarray(r.token_offsets, dtype=np.int64)
        flags = np.asarray(r.flags)
        sup = np.add.reduceat((flags & FLAG_SUPERVISED) != 0, offs[:-1]).astype(np.int64)
        dense = np.add.reduceat((flags & FLAG_INFO_DENSE) != 0, offs[:-1]).astype(np.int64)
        sel = (flags[offs[:-1]] & FLAG_SELECTED) != 0
        doms = np.asarray(r.domains)
        for d in np.unique(doms[sel]).tolist():
            j = np.flatnonzero(sel & (doms == d))
            parts.setdefault(d, []).append((start + j, dense[j] / np.maximum(sup[j], 1), dense[j]))
    return {Domain(d).name.lower(): DomainRho(*(np.concatenate(x) for x in zip(*p)))
            for d, p in sorted(parts.items())}


def default_threshold(domain: str) -> float:
    """Twice the paper's rho of the domain (the mean of code and math for ``other``), at most 1."""
    ref = PAPER_RHO.get(Domain.parse(domain), sum(PAPER_RHO.values()) / len(PAPER_RHO))
    return min(1.0, 2 * ref)


def histogram(rho: np.ndarray) -> list[tuple[float, int]]:
    """``(bin start, count)`` for bins ``(start, start + BIN_WIDTH]`` (the first one takes 0 as well) up
    to the bin holding the largest rho; closed on the right, so a sample at a budget such as 0.25
    counts in the bin that ends there."""
    if len(rho) == 0:
        return []
    idx = np.maximum(np.ceil(rho / BIN_WIDTH - 1e-9).astype(np.int64) - 1, 0)
    counts = np.bincount(idx, minlength=int(idx.max()) + 1)
    return [(k * BIN_WIDTH, int(c)) for k, c in enumerate(counts)]


def outliers(d: DomainRho, threshold: float) -> dict[str, np.ndarray]:
    """Positions in ``d`` of the ``high`` (rho > threshold, highest first) and ``zero`` outliers."""
    high = np.flatnonzero(d.rho > threshold)
    return {"high": high[np.argsort(-d.rho[high], kind="stable")], "zero": np.flatnonzero(d.dense == 0)}


def rho_report(ds: ShardedDataset, show: int = 5, threshold: float | None = None) -> list[Any]:
    """Rich renderables: one histogram table per domain with percentiles, then outlier lines."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for name, d in sample_rhos(ds).items():
        thr = default_threshold(name) if threshold is None else threshold
        p10, med, p90 = np.percentile(d.rho, [10, 50, 90])
        t = Table(title=f"{name}: rho of {len(d.rho):,} extracted samples: mean {d.rho.mean():.3f}, "
                        f"p10 {p10:.3f}, median {med:.3f}, p90 {p90:.3f}, max {d.rho.max():.3f}")
        for col in ("rho", "samples", ""):
            t.add_column(col, justify="left" if col == "" else "right")
        hist = histogram(d.rho)
        peak = max(c for _, c in hist)
        for start, count in hist:
            t.add_row(f"{start:.2f}-{start + BIN_WIDTH:.2f}", f"{count:,}",
                      "█" * int(round(40 * count / peak)) if count else "")
        out.append(t)
        found = outliers(d, thr)
        for kind, what in (("high", f"rho > {thr:.2f}"), ("zero", "no info-dense token")):
            pos = found[kind]
            if not len(pos):
                continue
            listed = ", ".join(f"#{int(d.index[p])} {ds[int(d.index[p])].sample_id} ({d.rho[p]:.2f})"
                               for p in pos[:show])
            more = f", ... ({len(pos) - show:,} more)" if len(pos) > show else ""
            out.append(Text(f"{name}: {len(pos):,} sample(s) with {what}: {listed}{more}"))
    return out


def budget_line(index: dict[str, Any]) -> str | None:
    """The summary's line on the rho budget (``--max-rho``), or None when the folder has none."""
    budget = index.get("config", {}).get("max_rho")
    if not budget:
        return None
    parts = []
    for name, rho in budget.items():
        d = index["domains"].get(name, {})
        parts.append(f"{name} <= {rho:g}: {d.get('budget_samples', 0):,} sample(s) trimmed, "
                     f"{d.get('budget_dropped_spans', 0):,} span(s) / "
                     f"{d.get('budget_dropped_tokens', 0):,} token(s) dropped")
    return "rho budget: " + "; ".join(parts)
