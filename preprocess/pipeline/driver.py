"""The preprocessing pipeline: records -> spans -> aligned flags -> shards, one datatrove task per shard.

Design (why it is deterministic and resumable):

- ``num_shards`` is fixed by the config; datatrove task ``r`` writes shard ``r`` and nothing else.
  Which input bytes go to shard ``r`` is ``splits.plan_shards`` (a pure function of the input
  list, the file sizes and ``num_shards``; every byte read by one task), so the bytes of every
  shard depend only on inputs + config -- never on the number of workers, nodes or the order
  tasks run in.
- A shard is written under temporary names and published by renames, manifest last.  A rerun
  after a crash or ``kill -9`` deletes leftovers, skips shards whose manifest exists, and redoes
  only the rest -- byte-identical to an uninterrupted run (no timestamps or host names in any
  output file; timings go to the logs folder and the terminal summary).
- After all shard tasks, a merge step writes ``index.json`` (on SLURM: a dependent job).

Usage::

    from preprocess.pipeline import PreprocessConfig, run_pipeline  # the package exports these two
    out = run_pipeline(PreprocessConfig(inputs=[SAMPLE_PATH], output_dir="data/pp", extractor="rules"))

Modules: :mod:`preprocess.pipeline.config` (the config dataclass, fingerprint, errors),
:mod:`preprocess.pipeline.shard` (the per-batch tokenize + extract + align + write of one shard),
:mod:`preprocess.pipeline.steps` (datatrove steps, the merge into ``index.json``) and this driver
(locking, resume checks, local/SLURM executors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor

from preprocess.pipeline.config import PreprocessConfig, describe_change
from preprocess.pipeline.inputs import RunInputs, resolve_inputs
from preprocess.pipeline.progress import write_plan_bytes
from preprocess.pipeline.shard import load_tokenizer
from preprocess.pipeline.steps import (
    ShardStep,
    _MergeStep,
    failure_path,
    raise_first_failure,
)
from preprocess.shards import (
    INDEX_FILE,
    ConfigMismatchError,
    manifest_name,
    missing_shards,
    read_manifest,
    shard_files,
    shard_is_complete,
    shard_name,
    write_index,
)
from preprocess.splits import imbalance_note


def _check_existing(cfg: PreprocessConfig, inputs: RunInputs) -> None:
    """Refuse to mix shards of different configurations (or delete them with ``overwrite``).

    The error names what changed (a setting, an input file, the tokenizer ...) in one line.
    """
    folder = Path(cfg.output_dir)
    stale: list[str] = []
    change = ""
    for mpath in sorted(folder.glob("shard_*.json")):
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            manifest = {}
        name = mpath.name[: -len(".json")]
        if manifest.get("config_fingerprint") != inputs.fingerprint \
                or int(name.split("_")[1]) >= cfg.num_shards:
            stale.append(name)
            if not change:
                old = manifest.get("fingerprint_parts")
                change = describe_change(old, inputs.parts) if old else "configuration changed"
    if not stale:
        return
    if not cfg.overwrite:
        raise ConfigMismatchError(
            f"{folder}: {change} since {stale[0]} was made ({len(stale)} shard(s) differ); "
            f"use another output folder or --overwrite (overwrite=True) to rebuild")
    for name in stale:
        for fname in [*shard_files(name).values(), manifest_name(name)]:
            (folder / fname).unlink(missing_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)
    if cfg.logging_dir.exists():
        shutil.rmtree(cfg.logging_dir)


def is_complete(cfg: PreprocessConfig, fingerprint: str | None = None) -> bool:
    """True when index.json exists, matches the config and every shard is in place."""
    folder = Path(cfg.output_dir)
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return False
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False  # a damaged index is rewritten by the merge step
    fingerprint = fingerprint or resolve_inputs(
        cfg, load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec()).fingerprint
    complete = not missing_shards(cfg.output_dir, cfg.num_shards)
    return index.get("config_fingerprint") == fingerprint and complete


def _drop_shards_to_retry(cfg: PreprocessConfig, fingerprint: str) -> None:
    """``retry_failed``: delete the finished shards of this configuration whose manifest counts a
    status the extractor may answer on a rerun; the run then rebuilds exactly those (the answers
    the extractor already has come from its cache, so they are byte-identical to a clean run)."""
    from preprocess.extractors.registry import EXTRACTORS

    statuses = getattr(EXTRACTORS.get(cfg.extractor), "retryable_statuses", frozenset())
    folder = Path(cfg.output_dir)
    dropped = False
    for k in range(cfg.num_shards):
        name = shard_name(k)
        m = read_manifest(folder, name) if shard_is_complete(folder, name) else None
        if m is None or m.get("config_fingerprint") != fingerprint:
            continue
        if any(m["stats"]["extract_status"].get(st) for st in statuses):
            (folder / manifest_name(name)).unlink()  # first: the shard stops counting as finished
            for fname in shard_files(name).values():
                (folder / fname).unlink(missing_ok=True)
            dropped = True
    if dropped:
        (folder / INDEX_FILE).unlink(missing_ok=True)


def _reset_stale_markers(cfg: PreprocessConfig) -> None:
    """datatrove skips ranks with a completion marker; drop markers whose shard is gone."""
    markers = cfg.logging_dir / "shards" / "completions"
    for k in range(cfg.num_shards):
        marker = markers / f"{k:05d}"
        if marker.exists() and not shard_is_complete(cfg.output_dir, shard_name(k)):
            marker.unlink()


def run_pipeline(cfg: PreprocessConfig) -> Path:
    """Preprocess ``cfg.inputs`` into ``cfg.output_dir``; idempotent (finished work is skipped).

    Local: runs all shard tasks with datatrove's LocalPipelineExecutor, then writes index.json and
    returns when everything is done.  SLURM: submits the array job plus a dependent merge job and
    returns right away; index.json appears when the merge job has run.
    """
    folder = Path(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec()
    inputs = resolve_inputs(cfg, spec)
    if not cfg.retry_failed and is_complete(cfg, inputs.fingerprint):
        return folder
    with _folder_lock(folder):  # e.g. several training ranks asking for the same missing cache
        if cfg.retry_failed:
            _drop_shards_to_retry(cfg, inputs.fingerprint)
        if is_complete(cfg, inputs.fingerprint):
            return folder
        return _run_locked(cfg, spec, inputs)


LOCK_FILE = ".dm-preprocess.lock"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive POSIX lock on the output folder for one driver at a time.

    ``lockf`` (not ``flock``): POSIX locks belong to the process and are not inherited by forked
    helpers, so a driver killed with -9 releases the lock even if datatrove's helper survives.
    """
    with open(folder / LOCK_FILE, "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _run_locked(cfg: PreprocessConfig, spec: Any, inputs: RunInputs) -> Path:
    folder = Path(cfg.output_dir)
    _check_existing(cfg, inputs)
    _reset_stale_markers(cfg)
    plan = inputs.with_plan(cfg.num_shards).plan
    note = imbalance_note(inputs.sources, plan)  # type: ignore[arg-type]
    if note:
        print(note, file=sys.stderr)
    if cfg.executor == "local":
        todo = {k: sum(u.nbytes for u in units) for k, units in enumerate(plan)  # type: ignore[arg-type]
                if not shard_is_complete(folder, shard_name(k))}
        write_plan_bytes(cfg.logging_dir, todo)
        step = ShardStep(cfg, spec, inputs)
        workers = cfg.local_workers()
        if workers > 1:
            _preload_in_forkserver()
        for k in range(cfg.num_shards):
            failure_path(cfg, k).unlink(missing_ok=True)
        from loguru import logger

        logger.disable("datatrove.executor.local")  # "Skipping ...", the final stats block
        try:
            _QuietLocalExecutor(pipeline=[step], tasks=cfg.num_shards, workers=workers,
                                logging_dir=str(cfg.logging_dir / "shards")).run()
        finally:
            logger.enable("datatrove.executor.local")
        raise_first_failure(cfg)
        write_index(cfg.output_dir, cfg.num_shards, cfg.output_settings())
        return folder
    # Shards may be rebuilt: the old index and the merge job's completion marker are stale.
    (folder / INDEX_FILE).unlink(missing_ok=True)
    (cfg.logging_dir / "merge" / "completions" / "00000").unlink(missing_ok=True)
    build_slurm_executor(cfg).run()
    return folder


class _QuietLocalExecutor(LocalPipelineExecutor):
    """Tasks log to their log files only (errors still reach the terminal): datatrove prints a
    task's console log only for local rank 0, and uses the local rank for nothing else; the
    "k/N tasks completed" counter is only logged, so it is not passed on.  The live display and
    the summary (``pipeline.progress``) say the same from the tasks' own counters."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)

    def _launch_run_for_rank(self, rank: int, ranks_q: Any, completed: Any = None,
                             completed_lock: Any = None) -> Any:
        return super()._launch_run_for_rank(rank, ranks_q)


def _preload_in_forkserver() -> None:
    """Import the heavy modules once in datatrove's forkserver, so pool workers fork with them.

    Without this every worker imports numpy/datatrove/extractor modules (openai, ...) itself,
    which costs seconds per worker and scales badly with many cores.
    """
    import multiprocess

    modules = ["preprocess.pipeline", "preprocess.pipeline.shard", "preprocess.extractors.registry"]
    multiprocess.set_forkserver_preload(modules)


def _absolute(p: str | Path) -> str:
    return str(Path(p).resolve()) if Path(p).exists() else str(p)


def build_slurm_executor(cfg: PreprocessConfig) -> Any:
    """The merge executor (tasks=1) depending on the shard array executor; ``.run()`` submits both.

    Paths are made absolute: array tasks may start in another directory on another node.
    """
    from datatrove.executor import SlurmPipelineExecutor

    cfg = dataclasses.replace(cfg, output_dir=Path(cfg.output_dir).resolve(),
                              inputs=[_absolute(p) for p in cfg.inputs], tokenizer=_absolute(cfg.tokenizer))
    s = cfg.slurm
    common = dict(time=s.time, partition=s.partition, mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos or "",
                  venv_path=s.venv_path, env_command=s.env_command, sbatch_args=dict(s.sbatch_args))
    spec = load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec()
    # Resolved after the paths became absolute: the tasks read the sources from other directories.
    step = ShardStep(cfg, spec, resolve_inputs(cfg, spec).with_plan(cfg.num_shards))
    shards = SlurmPipelineExecutor(pipeline=[step], tasks=cfg.num_shards,
                                   cpus_per_task=s.cpus_per_task, workers=s.max_concurrent,
                                   job_name=s.job_name, logging_dir=str(cfg.logging_dir / "shards"), **common)
    return SlurmPipelineExecutor(pipeline=[_MergeStep(cfg)], tasks=1, cpus_per_task=1, depends=shards,
                                 job_name=f"{s.job_name}-merge", logging_dir=str(cfg.logging_dir / "merge"),
                                 **common)
