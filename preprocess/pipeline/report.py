"""What a run tells its user besides the summary table: the extractor's request counters, loud
warnings about data that trains like uniform masking, and the LLM dry run (cost, nothing written).

Split from the CLI so that the checks are plain functions over ``index.json`` and the per-shard
logs (``steps.read_timings``), testable without a terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from preprocess.extractors.base import fraction_for, fraction_selected, read_inputs
from preprocess.extractors.registry import EXTRACTORS, get_extractor
from preprocess.pipeline.config import PreprocessConfig
from preprocess.records import Reject

RHO_NEAR_ZERO = 0.01
"""A domain whose extracted samples have a mean dense share below this got (almost) no spans."""


def extractor_counters(timings: Iterable[Mapping[str, Any]]) -> str | None:
    """One line of request counters summed over the shards built now, or None if nothing was sent
    (an extractor without a ``summary``, or every shard already built)."""
    from preprocess.extractors.llm.client import failure_counts

    total: Counter[str] = Counter()
    for t in timings:
        total.update(t.get("extractor") or {})
    if not total:
        return None
    kinds = ", ".join(f"{k} {v:,}" for k, v in failure_counts(total).items()) or "none"
    return (f"extractor requests: {total['requests']:,} (retries {total['retries']:,}, cache hits "
            f"{total['cache_hits']:,} of {total['samples']:,} samples); failed requests "
            f"{total['failed_requests']:,} (by kind: {kinds}); rate limited (429) {total['http_429']:,}")


def run_warnings(index: Mapping[str, Any]) -> list[str]:
    """Loud lines for a finished folder: extracted domains with rho near zero, samples to retry."""
    out = []
    status = index.get("extract_status", {})
    for name, d in index["domains"].items():
        if d["selected_samples"] and d["rho"] < RHO_NEAR_ZERO:
            out.append(f"WARNING: domain {name}: rho {d['rho']:.4f} over {d['selected_samples']:,} extracted "
                       f"samples: the extractor marked (almost) nothing, so they train like uniform "
                       f"masking (extractor status: {dict(status) or '-'})")
    retryable = getattr(EXTRACTORS.get(index["extractor"]["name"]), "retryable_statuses", frozenset())
    lost = sum(status.get(s, 0) for s in retryable)
    if lost:
        out.append(f"WARNING: {lost:,} extracted samples got no answer ({', '.join(sorted(retryable))}) "
                   f"and have no spans; rerun the same command with --retry-failed to ask for them again")
    return out


@dataclass
class DryRun:
    """What ``run --dry-run`` found: the estimate for the samples not cached yet, and bad records."""

    estimate: Any  # cost.CostEstimate, or None when no sample is selected
    selected: int = 0
    cached: int = 0
    rejects: list[Reject] = field(default_factory=list)


def dry_run(cfg: PreprocessConfig) -> DryRun:
    """The LLM extractor's cost for ``cfg`` without a request or a written file: the same records,
    fraction selection and request bodies as the run, minus the samples already in the cache.
    (Samples the run would reject as too long are still counted: the estimate errs high.)"""
    if cfg.extractor != "llm":
        raise ValueError(f"--dry-run estimates the llm extractor's cost; extractor is {cfg.extractor!r}")
    x = get_extractor("llm", **{**cfg.extractor_options, "dry_run": True})
    out = DryRun(None)
    items = (it for it in read_inputs(cfg.inputs, cfg.fields, out.rejects, cfg.hf_split)
             if fraction_selected(it.key, fraction_for(cfg.fractions, it.domain), cfg.seed))
    while batch := list(islice(items, cfg.batch_size)):
        x.extract_batch(batch)
        out.selected += len(batch)
    out.estimate = x.dry_run_estimate  # type: ignore[attr-defined]
    out.cached = x.stats["dry_run_cached_skipped"]  # type: ignore[attr-defined]
    return out
