"""Preprocessing configuration: what is written (fingerprinted) and how it is executed.

Split from :mod:`preprocess.pipeline` (which re-exports everything here): the trainer, the CLI and
the SLURM scripts only need these definitions, and the fingerprint must be computable by the
driver, the shard tasks and the merge step alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preprocess.assets import TOKENIZER_DIR
from preprocess.extractors.base import parse_fractions
from preprocess.records import FieldMap, Source
from preprocess.shards import FORMAT_NAME, FORMAT_VERSION, Domain


class RejectError(RuntimeError):
    """Raised in ``strict`` mode at the first rejected record, naming its file, line and reason."""


class ShardTaskError(RuntimeError):
    """A shard task failed (its message names the shard and the task's log with the traceback)."""


@dataclass(kw_only=True)
class SlurmOptions:
    """Options passed to datatrove's ``SlurmPipelineExecutor`` (one array job + a merge job)."""

    partition: str | None = None
    """SLURM partition; required when executor == 'slurm'."""
    time: str = "04:00:00"
    """Wall-clock limit per array task."""
    cpus_per_task: int = 1
    """One shard per task uses one core for Python work (plus tokenizer threads)."""
    mem_per_cpu_gb: int = 4
    """Memory is flat in input size (streaming); 4 GB covers tokenizer + extractor."""
    job_name: str = "dm-preprocess"
    qos: str | None = None
    """QoS name, or None to omit the directive (datatrove's default 'normal' is not universal)."""
    max_concurrent: int = -1
    """At most this many array tasks at once (-1: no limit)."""
    venv_path: str | None = None
    """``source``d in the job script before running (a venv's bin/activate)."""
    env_command: str | None = None
    """Any other shell line to prepare the environment (overrides venv_path)."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH --key=value`` lines (account, constraint, ...)."""
    logging_dir: str | None = None
    """datatrove logs/markers (default: <output_dir>/logs); must be on a shared file system."""


@dataclass(kw_only=True)
class PreprocessConfig:
    """Everything that decides what is written, plus how it is executed.

    Output-defining fields enter ``output_fingerprint``; execution fields (workers, executor, slurm,
    strict, batch_size, retry_failed) and the extractor's ``operational_options`` (concurrency,
    timeouts, cache folder ...) do not, so changing them never invalidates finished shards.
    """

    inputs: list[str | Path]
    """JSONL (plain/.gz/.bz2/.xz/.zst), Parquet files, directories of them, globs, or saved HF datasets."""
    output_dir: str | Path
    tokenizer: str | Path = TOKENIZER_DIR
    """HF tokenizer name or folder (must be a fast tokenizer)."""
    extractor: str = "rules"
    """Registered extractor name (``rules``, ``llm``, ``none``)."""
    extractor_options: dict[str, Any] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)
    """Extracted share per domain name (``code``/``math``/``other``), as ``parse_fractions`` returns it;
    missing domains use 1.0."""
    max_rho: dict[str, float] = field(default_factory=dict)
    """rho budget per domain name (``--max-rho code=0.25,math=0.31``): the most supervised tokens a
    sample may have marked, lowest-scoring spans dropped first (``preprocess.budget``); none when absent."""
    seed: int = 0
    """Seed of the hash-based fraction selection."""
    max_length: int = 2048
    """Samples with more tokens (prompt + response + EOS) are rejected as ``too_long``."""
    num_shards: int = 8
    """Fixed shard count: output is identical for any number of workers."""
    workers: int = -1
    """Concurrent local tasks (-1: min(num_shards, CPU count))."""
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    strict: bool = False
    """Fail at the first rejected record instead of listing it in the rejects report."""
    use_chat_template: bool = True
    """Wrap the prompt as a user turn with the tokenizer's chat template (add_generation_prompt)."""
    fields: FieldMap = field(default_factory=FieldMap)
    """Where prompt, response (or chat messages), domain and id live in an input record."""
    hf_split: str = "train"
    """Split used when an input is a saved ``DatasetDict``."""
    batch_size: int = 512
    """Records per tokenizer/extractor batch."""
    overwrite: bool = False
    """Delete shards made with a different configuration instead of refusing to run."""
    retry_failed: bool = False
    """Rebuild the finished shards that hold samples the extractor may answer on a rerun (its
    ``retryable_statuses``, e.g. ``llm_failed``); the other shards are kept as they are."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ValueError("inputs: at least one input is required")
        self.output_dir = Path(self.output_dir)
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.executor not in ("local", "slurm"):
            raise ValueError(f"executor must be 'local' or 'slurm', got {self.executor!r}")
        if isinstance(self.slurm, dict):
            self.slurm = SlurmOptions(**self.slurm)
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("slurm.partition is required with executor='slurm'")
        try:
            self.fractions = parse_fractions(self.fractions)
        except ValueError as e:
            raise ValueError(f"fractions: {e}") from None
        self.max_rho = parse_fractions(self.max_rho, "max_rho")
        if isinstance(self.fields, dict):
            self.fields = FieldMap(**self.fields)
        if self.fields.domain is not None:
            Domain.parse(self.fields.domain)

    @property
    def logging_dir(self) -> Path:
        return Path(self.slurm.logging_dir) if self.slurm.logging_dir else Path(self.output_dir) / "logs"

    def output_settings(self) -> dict[str, Any]:
        """The fields that decide the output bytes (recorded in index.json and fingerprinted)."""
        return {
            "inputs": [str(p) for p in self.inputs],
            "tokenizer": str(self.tokenizer),
            "extractor": self.extractor,
            "extractor_options": {k: ("<redacted>" if _SECRET.search(k) else v)
                                  for k, v in sorted(self.extractor_options.items())
                                  if k not in self.operational_options()},
            "fractions": dict(sorted(self.fractions.items())),
            "max_rho": dict(sorted(self.max_rho.items())),
            "seed": self.seed,
            "max_length": self.max_length,
            "num_shards": self.num_shards,
            "use_chat_template": self.use_chat_template,
            "fields": asdict(self.fields),
            "hf_split": self.hf_split,
        }

    def local_workers(self) -> int:
        """Concurrent shard tasks of the local executor: ``workers``, or one per core up to the shard
        count."""
        return self.workers if self.workers > 0 else min(self.num_shards, available_cores())

    def operational_options(self) -> frozenset[str]:
        """Options of the extractor that do not change what it returns (declared by its class)."""
        from preprocess.extractors.registry import EXTRACTORS

        return getattr(EXTRACTORS.get(self.extractor), "operational_options", frozenset())


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Extractor options that look like credentials never reach index.json or manifests.
_SECRET = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)


HASHED_EDGE = 1 << 20  # bytes hashed at each end of an input file for its identity


def _file_identity(path: Path) -> list[Any]:
    """Size, mtime and the sha256 of the first and last MiB: catches a replaced file, an append,
    and an edit that keeps the size (the mtime, and the hash where the edit is near an end)."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HASHED_EDGE))
        if st.st_size > HASHED_EDGE:
            f.seek(max(st.st_size - HASHED_EDGE, HASHED_EDGE))
            h.update(f.read(HASHED_EDGE))
    return [st.st_size, st.st_mtime_ns, h.hexdigest()[:32]]


def source_identity(src: Source) -> dict[str, Any]:
    """What resume checks compare for one input: resolved path, kind and (per file) size, mtime
    and the hash of its first and last MiB."""
    if src.path.is_dir():
        files = [[str(p.relative_to(src.path)), *_file_identity(p)]
                 for p in sorted(src.path.rglob("*")) if p.is_file()]
        return {"path": str(src.path.resolve()), "kind": src.kind, "files": files}
    size, mtime, digest = _file_identity(src.path)
    return {"path": str(src.path.resolve()), "kind": src.kind, "size": size, "mtime_ns": mtime,
            "edges": digest}


def fingerprint_parts(cfg: PreprocessConfig, sources: list[Source], tokenizer_fp: str,
                      extractor: tuple[str, str]) -> dict[str, Any]:
    """Everything the output depends on, itemised (stored in manifests, so that a mismatch on
    resume names what changed); ``output_fingerprint`` hashes it."""
    settings = cfg.output_settings()
    settings.pop("inputs")
    settings.pop("tokenizer")
    return {"format": [FORMAT_NAME, FORMAT_VERSION], "settings": settings,
            "sources": [source_identity(s) for s in sources], "tokenizer": tokenizer_fp,
            "extractor": list(extractor)}


def output_fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first difference between two ``fingerprint_parts``, as a short phrase."""
    for key, value in new["settings"].items():
        before = old.get("settings", {}).get(key)
        if before != value:
            was, now = json.dumps(before, default=str), json.dumps(value, default=str)
            return f"setting {key} changed ({was} -> {now})"
    old_src = {s["path"]: s for s in old.get("sources", [])}
    new_src = {s["path"]: s for s in new["sources"]}
    for path, s in new_src.items():
        if path not in old_src:
            return f"input {path} was added"
        if old_src[path] != s:
            what = [k for k in ("size", "mtime_ns", "edges", "files") if old_src[path].get(k) != s.get(k)]
            return f"input {path} changed ({', '.join(what)})"
    for path in old_src:
        if path not in new_src:
            return f"input {path} was removed"
    if list(old_src) != list(new_src):
        return "the order of the inputs changed"
    for key in ("tokenizer", "extractor", "format"):
        if old.get(key) != new[key]:
            return f"{key} changed ({old.get(key)} -> {new[key]})"
    return "configuration changed"
