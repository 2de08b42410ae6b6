"""datatrove steps: one task per shard (:func:`process_shard`), and the merge into ``index.json``.

``process_shard`` is what a datatrove task (local worker or SLURM array task) runs; the merge
step aggregates the shard manifests deterministically (sorted keys, per-domain sums) once all
shards exist, locally right after the executor or as a dependent SLURM job.
"""

from __future__ import annotations

import gc
import json
import resource
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from preprocess.align import TokenizerSpec
from preprocess.pipeline.config import ConfigMismatchError, PreprocessConfig
from preprocess.pipeline.shard import DomainCounts, ShardJob, load_tokenizer
from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    clean_partial,
    manifest_name,
    read_manifest,
    sha256_file,
    shard_is_complete,
    shard_name,
    smallest_token_dtype,
    write_json_atomic,
)


def process_shard(cfg: PreprocessConfig, shard: int, spec: TokenizerSpec | None = None) -> dict[str, Any]:
    """Write shard ``shard`` unless it is already complete; return its manifest.

    ``spec`` is the driver's resolved tokenizer; without it the tokenizer is loaded here.
    """
    folder = Path(cfg.output_dir)
    name = shard_name(shard)
    if shard_is_complete(folder, name):
        return read_manifest(folder, name)  # type: ignore[return-value]
    clean_partial(folder, name)
    t0, c0 = time.perf_counter(), time.process_time()
    spec = spec or load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec()
    job = ShardJob(cfg, shard, spec)
    # The per-batch garbage (encodings, lists) triggers many collections, each of which would also
    # walk every long-lived object (tokenizer, extractor, imported modules): freezing those first
    # saves ~7 % CPU.  Unfrozen afterwards, so an in-process caller (the trainer) is unaffected.
    # No ``gc.collect()`` first: in a worker that has the extractor modules (openai, pydantic)
    # loaded, a full collection costs ~0.1 s per shard task and finds next to nothing; what little
    # garbage gets frozen is collected normally after ``unfreeze``.
    gc.freeze()
    try:
        manifest = job.run()
    finally:
        gc.unfreeze()
    # Timings and memory are not deterministic, so they go to the logs, never into the data files.
    timing = {"shard": shard, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "num_samples": manifest["num_samples"], "num_tokens": manifest["num_tokens"]}
    (cfg.logging_dir / "timing").mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.logging_dir / "timing" / f"{name}.json", timing)
    return manifest


def read_timings(cfg_or_logging_dir: PreprocessConfig | Path) -> list[dict[str, Any]]:
    """Per-shard wall/CPU seconds and worker peak RSS of the shards built by recent runs."""
    d = cfg_or_logging_dir.logging_dir if isinstance(cfg_or_logging_dir, PreprocessConfig) \
        else Path(cfg_or_logging_dir)
    return [json.loads(p.read_text()) for p in sorted((d / "timing").glob("shard_*.json"))]


class ShardStep(PipelineStep):
    """datatrove step: task ``rank`` writes shard ``rank`` (world size must equal num_shards)."""

    name = "dm-preprocess shard"
    type = "TOKENIZER"

    def __init__(self, cfg: PreprocessConfig, spec: TokenizerSpec | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[override]
        if world_size != self.cfg.num_shards:
            raise RuntimeError(f"world_size {world_size} != num_shards {self.cfg.num_shards}")
        m = process_shard(self.cfg, rank, self.spec)
        self.stat_update("samples", value=m["num_samples"])
        self.stat_update("tokens", value=m["num_tokens"])
        self.stat_update("rejects", value=m["num_rejects"])
        return None


class _MergeStep:
    """Callable datatrove step (the SLURM merge job): writes index.json once all shards exist."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        write_index(self.cfg)


def missing_shards(cfg: PreprocessConfig) -> list[str]:
    names = [shard_name(k) for k in range(cfg.num_shards)]
    return [n for n in names if not shard_is_complete(cfg.output_dir, n)]


def write_index(cfg: PreprocessConfig) -> dict[str, Any]:
    """Aggregate the shard manifests into ``index.json`` (deterministic; sorted keys)."""
    folder = Path(cfg.output_dir)
    missing = missing_shards(cfg)
    if missing:
        raise RuntimeError(f"cannot write {INDEX_FILE}: {len(missing)} shard(s) incomplete: {missing[:8]}")
    manifests = [read_manifest(folder, shard_name(k)) for k in range(cfg.num_shards)]
    fps = {m["config_fingerprint"] for m in manifests}  # type: ignore[index]
    if len(fps) != 1:
        raise ConfigMismatchError(f"shards in {folder} come from {len(fps)} different configurations")
    domains: dict[str, DomainCounts] = {}
    rejects: Counter[str] = Counter()
    status: Counter[str] = Counter()
    alignment: Counter[str] = Counter()
    unmatched = 0
    for m in manifests:
        st = m["stats"]  # type: ignore[index]
        for name, counts in st["domains"].items():
            domains.setdefault(name, DomainCounts()).add(counts)
        rejects.update(st["rejects"])
        status.update(st["extract_status"])
        alignment.update(st["alignment"])
        unmatched += st["unmatched_spans"]
    dom_out = {}
    for name, c in sorted(domains.items()):
        dom_out[name] = {
            **asdict(c),
            "rho": c.selected_ratio_sum / c.selected_samples if c.selected_samples else 0.0,
            "rho_tokens": (c.selected_dense_tokens / c.selected_supervised_tokens
                           if c.selected_supervised_tokens else 0.0),
        }
    first = manifests[0]
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config_fingerprint": first["config_fingerprint"],  # type: ignore[index]
        "config": cfg.output_settings(),
        "num_shards": cfg.num_shards,
        "num_samples": sum(m["num_samples"] for m in manifests),  # type: ignore[index]
        "num_tokens": sum(m["num_tokens"] for m in manifests),  # type: ignore[index]
        "num_rejects": sum(m["num_rejects"] for m in manifests),  # type: ignore[index]
        "token_dtype": first["token_dtype"],  # type: ignore[index]
        "vocab_size": first["vocab_size"],  # type: ignore[index]
        "tokenizer": first["tokenizer"],  # type: ignore[index]
        "extractor": first["extractor"],  # type: ignore[index]
        "flags": {"SUPERVISED": FLAG_SUPERVISED, "INFO_DENSE": FLAG_INFO_DENSE, "SELECTED": FLAG_SELECTED},
        "domains": dom_out,
        "rho": {name: d["rho"] for name, d in dom_out.items()},
        "rejects": dict(sorted(rejects.items())),
        "extract_status": dict(sorted(status.items())),
        "alignment": dict(sorted(alignment.items())),
        "unmatched_spans": unmatched,
        "shards": [{"name": shard_name(k), "num_samples": m["num_samples"], "num_tokens": m["num_tokens"],  # type: ignore[index]
                    "manifest_sha256": sha256_file(folder / manifest_name(shard_name(k)))}
                   for k, m in enumerate(manifests)],
    }
    assert smallest_token_dtype(index["vocab_size"]).name.lower() == index["token_dtype"]
    write_json_atomic(folder / INDEX_FILE, index)
    return index
