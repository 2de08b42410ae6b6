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
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep
from loguru import logger

from preprocess.align import TokenizerSpec
from preprocess.extractors.base import ExtractorError
from preprocess.pipeline.config import PreprocessConfig, RejectError, ShardTaskError
from preprocess.pipeline.inputs import RunInputs, resolve_inputs
from preprocess.pipeline.shard import ShardJob, load_tokenizer, tokenizer_threads
from preprocess.shards import (
    clean_partial,
    read_manifest,
    shard_is_complete,
    shard_name,
    write_index,
    write_json_atomic,
)


def process_shard(cfg: PreprocessConfig, shard: int, spec: TokenizerSpec | None = None,
                  inputs: RunInputs | None = None) -> dict[str, Any]:
    """Write shard ``shard`` unless it is already complete; return its manifest.

    ``spec`` and ``inputs`` are the driver's resolved tokenizer and inputs (sources, fingerprint,
    plan); without them they are resolved here.
    """
    folder = Path(cfg.output_dir)
    name = shard_name(shard)
    if shard_is_complete(folder, name):
        return read_manifest(folder, name)  # type: ignore[return-value]
    clean_partial(folder, name)
    t0, c0 = time.perf_counter(), time.process_time()
    spec = spec or load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec()
    job = ShardJob(cfg, shard, spec, inputs or resolve_inputs(cfg, spec))
    # The per-batch garbage (encodings, lists) triggers many collections, each of which would also
    # walk every long-lived object (tokenizer, extractor, imported modules): freezing those first
    # saves ~7 % CPU.  Unfrozen afterwards, so an in-process caller (the trainer) is unaffected.
    # No ``gc.collect()`` first: in a worker that has the extractor modules (openai, pydantic)
    # loaded, a full collection costs ~0.1 s per shard task and finds next to nothing; what little
    # garbage gets frozen is collected normally after ``unfreeze``.
    gc.freeze()
    try:
        with tokenizer_threads(cfg):
            manifest = job.run()
    finally:
        gc.unfreeze()
    # Timings and memory are not deterministic, so they go to the logs, never into the data files.
    timing = {"shard": shard, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "num_samples": manifest["num_samples"], "num_tokens": manifest["num_tokens"],
              "bytes_read": manifest["stats"]["bytes_read"],
              "records_read": manifest["stats"]["records_read"] + manifest["stats"]["blank_lines"],
              "extractor": getattr(job.extractor, "summary", dict)()}  # requests, retries, failures...
    (cfg.logging_dir / "timing").mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.logging_dir / "timing" / f"{name}.json", timing)
    return manifest


def read_timings(cfg_or_logging_dir: PreprocessConfig | Path) -> list[dict[str, Any]]:
    """Per-shard wall/CPU seconds and worker peak RSS of the shards built by recent runs."""
    d = cfg_or_logging_dir.logging_dir if isinstance(cfg_or_logging_dir, PreprocessConfig) \
        else Path(cfg_or_logging_dir)
    return [json.loads(p.read_text()) for p in sorted((d / "timing").glob("shard_*.json"))]


def failure_path(cfg: PreprocessConfig, shard: int) -> Path:
    return cfg.logging_dir / "failures" / f"shard_{shard:05d}.json"


def raise_first_failure(cfg: PreprocessConfig) -> None:
    """Re-raise, in the driver, the failure of the lowest failed shard: with ``strict`` that is the
    first bad record in input order (shards are consecutive stretches of the input)."""
    for k in range(cfg.num_shards):
        path = failure_path(cfg, k)
        if path.is_file():
            f = json.loads(path.read_text(encoding="utf-8"))
            if f["kind"] == "reject":
                raise RejectError(f["message"])
            if f["kind"] == "extractor":
                raise ExtractorError(f["message"])
            raise ShardTaskError(f"{shard_name(k)}: {f['message']} (traceback in {f['log']})")


def _stopped(cfg: PreprocessConfig) -> bool:
    """True once a task of this run failed for a reason other than a bad record (an extractor that
    cannot go on, a bug): the remaining tasks then stop instead of failing the same way.  A bad
    record in strict mode does not stop them, since a lower shard may hold an earlier one."""
    folder = cfg.logging_dir / "failures"
    return folder.is_dir() and any(json.loads(p.read_text(encoding="utf-8"))["kind"] != "reject"
                                   for p in folder.glob("shard_*.json"))


class ShardStep(PipelineStep):
    """datatrove step: task ``rank`` writes shard ``rank`` (world size must equal num_shards).

    On the local executor a failing task leaves a one-line account in ``failure_path`` (the
    traceback goes to the task's log file only) and returns, so the terminal gets no traceback
    per task; later tasks stop at once unless the failure was a bad record (``_stopped``), and the
    driver raises the lowest shard's failure (``raise_first_failure``).  On SLURM the task also
    fails, so the array job shows it.
    """

    name = "dm-preprocess shard"
    type = "TOKENIZER"

    def __init__(self, cfg: PreprocessConfig, spec: TokenizerSpec | None = None,
                 inputs: RunInputs | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.inputs = inputs

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[override]
        if world_size != self.cfg.num_shards:
            raise RuntimeError(f"world_size {world_size} != num_shards {self.cfg.num_shards}")
        if self.cfg.executor == "local" and _stopped(self.cfg):
            return None
        try:
            m = process_shard(self.cfg, rank, self.spec, self.inputs)
        except Exception as e:
            log = self.cfg.logging_dir / "shards" / "logs" / f"task_{rank:05d}.log"
            kind = "reject" if isinstance(e, RejectError) else "extractor" if isinstance(e, ExtractorError) \
                else "error"
            message = " ".join(str(e).split()) or type(e).__name__
            if kind == "error":
                logger.opt(exception=e).debug("shard task failed")  # to the task's log file
                message = f"{type(e).__name__}: {message}"
            path = failure_path(self.cfg, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"kind": kind, "message": message, "log": str(log)})
            if self.cfg.executor == "slurm":
                raise
            return None
        self.stat_update("samples", value=m["num_samples"])
        self.stat_update("tokens", value=m["num_tokens"])
        self.stat_update("rejects", value=m["num_rejects"])
        return None


class _MergeStep:
    """Callable datatrove step (the SLURM merge job): writes index.json once all shards exist."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        write_index(self.cfg.output_dir, self.cfg.num_shards, self.cfg.output_settings())
