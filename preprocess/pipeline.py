"""The preprocessing pipeline: records -> spans -> aligned flags -> shards, one datatrove task per shard.

Design (why it is deterministic and resumable):

- ``num_shards`` is fixed by the config; datatrove task ``r`` writes shard ``r`` and nothing else.
  Which records go to shard ``r`` is ``records.shard_plan`` (a pure function of the input list and
  ``num_shards``), so the bytes of every shard depend only on inputs + config -- never on the
  number of workers, nodes or the order tasks run in.
- A shard is written under temporary names and published by renames, manifest last.  A rerun
  after a crash or ``kill -9`` deletes leftovers, skips shards whose manifest exists, and redoes
  only the rest -- byte-identical to an uninterrupted run (no timestamps or host names in any
  output file; timings go to the logs folder and the terminal summary).
- After all shard tasks, a merge step writes ``index.json`` (on SLURM: a dependent job).

Usage::

    from preprocess.pipeline import PreprocessConfig, run_pipeline
    out = run_pipeline(PreprocessConfig(inputs=[SAMPLE_PATH], output_dir="data/pp", extractor="rules"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import hashlib
import json
import os
import re
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from preprocess.align import (
    AlignmentError,
    TokenizerBundle,
    TokenizerSpec,
    align_spans,
    char_to_byte_positions,
    mark_overlaps,
    spans_to_arrays,
)
from preprocess.assets import TOKENIZER_DIR
from preprocess.records import (
    INVALID_SPANS,
    TOO_LONG,
    FieldMap,
    ReadStats,
    Record,
    Reject,
    Source,
    expand_inputs,
    iter_records,
    shard_plan,
)
from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    ShardWriter,
    clean_partial,
    manifest_name,
    read_manifest,
    sha256_file,
    shard_files,
    shard_is_complete,
    shard_name,
    smallest_token_dtype,
    write_json_atomic,
)
from preprocess.spans import Domain, ExtractInput, SpanError, fraction_selected, get_extractor, validate_spans

CRASH_ENV = "DM_PREPROCESS_CRASH_AFTER"  # test hook: "<shard>:<samples>" -> os._exit(137) mid-shard


class RejectError(RuntimeError):
    """Raised in ``strict`` mode at the first rejected record, naming its file, line and reason."""


class ConfigMismatchError(RuntimeError):
    """The output folder already holds shards made with a different configuration."""


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
    strict, batch_size) do not, so changing them never invalidates finished shards.
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
    """Extracted share per domain name (``code``/``math``/``other``); missing domains use 1.0."""
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
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None
    domain_field: str | None = "domain"
    domain: str | None = None
    """Domain for every record (overrides ``domain_field``)."""
    id_field: str | None = "id"
    hf_split: str = "train"
    """Split used when an input is a saved ``DatasetDict``."""
    batch_size: int = 512
    """Records per tokenizer/extractor batch."""
    overwrite: bool = False
    """Delete shards made with a different configuration instead of refusing to run."""

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
        if isinstance(self.fractions, str):
            self.fractions = parse_fractions(self.fractions)
        for name, frac in self.fractions.items():
            Domain.parse(name)
            if not 0.0 <= float(frac) <= 1.0:
                raise ValueError(f"fractions[{name!r}] = {frac} outside [0, 1]")
        if self.domain is not None:
            Domain.parse(self.domain)

    @property
    def fields(self) -> FieldMap:
        return FieldMap(prompt=self.prompt_field, response=self.response_field, messages=self.messages_field,
                        domain_field=self.domain_field, domain=self.domain, id_field=self.id_field)

    def fraction_for(self, domain: Domain) -> float:
        return float({Domain.parse(k): v for k, v in self.fractions.items()}.get(domain, 1.0))

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
                                  for k, v in sorted(self.extractor_options.items())},
            "fractions": {Domain.parse(k).name.lower(): float(v) for k, v in sorted(self.fractions.items())},
            "seed": self.seed,
            "max_length": self.max_length,
            "num_shards": self.num_shards,
            "use_chat_template": self.use_chat_template,
            "fields": asdict(self.fields),
            "hf_split": self.hf_split,
        }


# Extractor options that look like credentials never reach index.json or manifests.
_SECRET = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)


def parse_fractions(text: str) -> dict[str, float]:
    """``"code=0.1,math=0.5"`` -> ``{"code": 0.1, "math": 0.5}`` with clear errors."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--fraction item {part!r}: expected domain=value")
        out[Domain.parse(name).name.lower()] = float(value)
    return out


def _source_identity(src: Source) -> list[Any]:
    """Name + size: stable across machines and copies, changes when a file is replaced."""
    if src.path.is_dir():
        size = sum(p.stat().st_size for p in sorted(src.path.rglob("*")) if p.is_file())
    else:
        size = src.path.stat().st_size
    return [src.name, src.kind, size]


def output_fingerprint(cfg: PreprocessConfig, sources: list[Source], tokenizer_fp: str,
                       extractor: tuple[str, str]) -> str:
    settings = cfg.output_settings()
    settings.pop("inputs")
    settings.pop("tokenizer")
    payload = {"format": [FORMAT_NAME, FORMAT_VERSION], "settings": settings,
               "sources": [_source_identity(s) for s in sources], "tokenizer": tokenizer_fp,
               "extractor": list(extractor)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------- shard work


@dataclass
class DomainCounts:
    """Deterministic per-domain counters of one shard (summed by the merge step)."""

    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dense_tokens: int = 0
    selected_samples: int = 0
    selected_supervised_tokens: int = 0
    selected_dense_tokens: int = 0
    selected_ratio_sum: float = 0.0  # sum over selected samples of dense/supervised (paper's rho)

    def add(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


def _batched(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, use_chat_template: bool) -> TokenizerBundle:
    """One tokenizer per process and setting: worker processes run several shard tasks each."""
    return TokenizerBundle(name_or_path, use_chat_template)


class _ShardJob:
    """Processes one shard; holds the tokenizer, extractor and counters."""

    def __init__(self, cfg: PreprocessConfig, shard: int, spec: TokenizerSpec) -> None:
        self.cfg = cfg
        self.shard = shard
        self.tok = spec
        self.extractor = get_extractor(cfg.extractor, **cfg.extractor_options)
        self.sources = expand_inputs(cfg.inputs, cfg.hf_split)
        self.fingerprint = output_fingerprint(cfg, self.sources, self.tok.fingerprint(),
                                              (self.extractor.name, self.extractor.version))
        self.domains: dict[int, DomainCounts] = {}
        self.rejects: Counter[str] = Counter()
        self.extract_status: Counter[str] = Counter()
        self.alignment: Counter[str] = Counter()
        self.unmatched_spans = 0
        self.read = ReadStats()
        self.fractions = {d: cfg.fraction_for(d) for d in Domain}
        bos = self.tok.bos_id
        self.bos = [] if cfg.use_chat_template or bos is None else [bos]
        crash = os.environ.get(CRASH_ENV, "")
        c_shard, _, c_after = crash.partition(":")
        self.crash_after = int(c_after) if crash and int(c_shard) == shard else -1

    def records(self) -> Iterator[Record | Reject]:
        for j, part, nparts in shard_plan(len(self.sources), self.cfg.num_shards, self.shard):
            yield from iter_records(self.sources[j], self.cfg.fields, part, nparts, self.read)

    def write_rejects(self, writer: ShardWriter, pending: list[tuple[int, Reject]]) -> None:
        """Write a batch's rejects in input order, so the report does not depend on the batch size."""
        for _, rej in sorted(pending, key=lambda pr: pr[0]):
            if self.cfg.strict:
                raise RejectError(f"{rej.source}:{rej.line}: {rej.reason}"
                                  f"{f' (field {rej.field!r})' if rej.field else ''}: {rej.detail}")
            self.rejects[rej.reason] += 1
            writer.add_reject(rej.to_json())

    def run(self) -> dict[str, Any]:
        folder = Path(self.cfg.output_dir)
        writer = ShardWriter(folder, self.shard, self.tok.vocab_size)
        try:
            for batch in _batched(self.records(), self.cfg.batch_size):
                self.process_batch(writer, batch)
            return writer.finish(self.manifest_extra())
        except BaseException:
            writer.abort()
            raise

    def process_batch(self, writer: ShardWriter, batch: list[Record | Reject]) -> None:
        recs: list[Record] = []
        positions: list[int] = []
        pending: list[tuple[int, Reject]] = []  # (position in batch, reject)
        for pos, item in enumerate(batch):
            if isinstance(item, Reject):
                pending.append((pos, item))
            else:
                recs.append(item)
                positions.append(pos)
        if self.cfg.strict and pending:
            self.write_rejects(writer, pending)  # raises at the first one
        if recs:
            self.extract_and_write(writer, recs, positions, pending)
        self.write_rejects(writer, pending)
        if 0 <= self.crash_after <= writer.num_samples:
            os._exit(137)  # test hook: die like kill -9, leaving temporary files behind

    def extract_and_write(self, writer: ShardWriter, recs: list[Record], positions: list[int],
                          pending: list[tuple[int, Reject]]) -> None:
        """Tokenize first (too-long samples are rejected before anyone pays to extract them), then
        extract the selected fraction, then build flags and write -- all vectorised over the batch
        (one encode_batch call, one flags array, one alignment pass), so per-sample Python work
        stays a few list operations: this is what keeps the pipeline close to raw tokenizer speed.
        """
        n_rec = len(recs)
        texts = [self.tok.render_prompt(r.prompt, r.messages) for r in recs] + [r.response for r in recs]
        encs = self.tok.backend.encode_batch(texts, add_special_tokens=False)
        bos, eos, max_len = self.bos, self.tok.eos_id, self.cfg.max_length
        keep: list[int] = []
        ids: list[int] = []
        p_lens: list[int] = []
        r_lens: list[int] = []
        for i in range(n_rec):
            p_ids = encs[i].ids
            r_ids = encs[n_rec + i].ids
            n_p = len(bos) + len(p_ids)
            n = n_p + len(r_ids) + 1
            if n > max_len:
                r = recs[i]
                pending.append((positions[i], Reject(r.source, r.line, TOO_LONG,
                                                     f"{n} tokens > max_length {max_len}", None, r.key)))
                continue
            keep.append(i)
            ids += bos
            ids += p_ids
            ids += r_ids
            ids.append(eos)
            p_lens.append(n_p)
            r_lens.append(len(r_ids))
        if not keep:
            return
        selected = [False] * n_rec
        for i in keep:
            r = recs[i]
            selected[i] = fraction_selected(r.key, self.fractions[r.domain], self.cfg.seed)
        spans = self.extract(recs, [i for i in keep if selected[i]])
        p_len = np.array(p_lens, dtype=np.int64)
        r_len = np.array(r_lens, dtype=np.int64)
        lens = p_len + r_len + 1
        starts = np.cumsum(lens) - lens
        tokens = np.array(ids, dtype=np.int64)
        sample_of = np.repeat(np.arange(len(keep)), lens)
        pos = np.arange(len(tokens)) - starts[sample_of]
        flags = np.where(pos >= p_len[sample_of], FLAG_SUPERVISED, 0).astype(np.uint8)
        sel = np.array([selected[i] for i in keep], dtype=bool)
        flags |= np.where(sel, FLAG_SELECTED, 0).astype(np.uint8)[sample_of]
        with_spans = [k for k, i in enumerate(keep) if spans[i]]
        n_dense = np.zeros(len(keep), dtype=np.int64)
        if with_spans:
            dense_pos = self.align_batch(recs, keep, spans, encs, n_rec, with_spans, tokens, starts + p_len,
                                         r_len)
            flags[dense_pos] |= FLAG_INFO_DENSE
            n_dense = np.bincount(sample_of[dense_pos], minlength=len(keep))
        domains = [int(recs[i].domain) for i in keep]
        writer.add_batch(tokens, flags, lens, domains, [recs[i].key for i in keep])
        # Per-domain counters, sample by sample in input order so float sums do not depend on batching.
        for k, dom in enumerate(domains):
            d = self.domains.get(dom)
            if d is None:
                d = self.domains[dom] = DomainCounts()
            n_sup = r_lens[k] + 1
            nd = int(n_dense[k])
            d.samples += 1
            d.tokens += int(lens[k])
            d.supervised_tokens += n_sup
            d.dense_tokens += nd
            if sel[k]:
                d.selected_samples += 1
                d.selected_supervised_tokens += n_sup
                d.selected_dense_tokens += nd
                d.selected_ratio_sum += nd / n_sup

    def extract(self, recs: list[Record], chosen: list[int]) -> list[list]:
        """Validated, merged spans per record (empty for records not in ``chosen``)."""
        spans: list[list] = [[] for _ in recs]
        if not chosen:
            return spans
        inputs = [ExtractInput(recs[i].key, _plain_prompt(recs[i]), recs[i].response, recs[i].domain)
                  for i in chosen]
        results = self.extractor.extract_batch(inputs)
        if len(results) != len(inputs):
            raise RuntimeError(f"extractor {self.extractor.name!r} returned {len(results)} results "
                               f"for {len(inputs)} inputs")
        for i, res in zip(chosen, results):
            self.extract_status[res.status] += 1
            self.unmatched_spans += res.unmatched
            try:
                spans[i] = _checked_spans(res.spans, recs[i].response)
            except SpanError as e:
                if self.cfg.strict:
                    raise RejectError(f"{recs[i].source}:{recs[i].line}: {INVALID_SPANS}: {e}") from e
                self.extract_status[INVALID_SPANS] += 1
        return spans

    def align_batch(self, recs: list[Record], keep: list[int], spans: list[list], encs: list, n_rec: int,
                    with_spans: list[int], tokens: np.ndarray, r_start: np.ndarray,
                    r_len: np.ndarray) -> np.ndarray:
        """Global token positions that overlap a span, for the kept samples listed in ``with_spans``.

        Byte-level tokenizers: all response tokens of the batch are laid end to end in one byte
        coordinate system (cumulative exact byte lengths); each sample's spans are shifted into it
        and one ``mark_overlaps`` call marks the whole batch.  A sample whose byte lengths do not add
        up to its UTF-8 length (normalising tokenizer, added tokens) uses validated offsets instead.
        """
        table = self.tok.byte_table
        out: list[np.ndarray] = []
        fallback = with_spans
        if table is not None:
            ws = np.array(with_spans, dtype=np.int64)
            seg_len = r_len[ws]
            # Global token positions of the response tokens of those samples, end to end.
            seg_first = np.cumsum(seg_len) - seg_len
            seg_pos = np.repeat(r_start[ws] - seg_first, seg_len) + np.arange(int(seg_len.sum()))
            seg_tok = tokens[seg_pos]
            if int(seg_tok.max()) < len(table):
                blen = table[seg_tok]
                cum = np.cumsum(blen)
                seg_end = np.cumsum(seg_len) - 1
                seg_base = cum[seg_end] - np.add.reduceat(blen, seg_end - seg_len + 1)
                totals = cum[seg_end] - seg_base
                ss_all: list[np.ndarray] = []
                se_all: list[np.ndarray] = []
                fallback = []
                for j, k in enumerate(with_spans):
                    resp = recs[keep[k]].response
                    ascii_only = resp.isascii()
                    n_bytes = len(resp) if ascii_only else len(resp.encode("utf-8"))
                    if int(totals[j]) != n_bytes:
                        fallback.append(k)
                        continue
                    ss, se = spans_to_arrays(spans[keep[k]])
                    if not ascii_only:
                        cpos = char_to_byte_positions(resp)
                        ss, se = cpos[ss], cpos[se]
                    base = int(seg_base[j])
                    ss_all.append(ss + base)
                    se_all.append(se + base)
                self.alignment["bytes"] += len(with_spans) - len(fallback)
                if ss_all:
                    hit = mark_overlaps(cum - blen, cum, np.concatenate(ss_all), np.concatenate(se_all))
                    out.append(seg_pos[hit])
        for k in fallback:
            i = keep[k]
            r = recs[i]
            a, n = int(r_start[k]), int(r_len[k])
            try:
                res = align_spans(tokens[a:a + n], encs[n_rec + i].offsets, r.response, spans[i], None)
            except AlignmentError as e:
                if self.cfg.strict:
                    raise RejectError(f"{r.source}:{r.line}: alignment failed: {e}") from e
                self.alignment["error"] += 1
                continue
            self.alignment[res.method] += 1
            out.append(a + np.flatnonzero(res.dense))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def manifest_extra(self) -> dict[str, Any]:
        plan = shard_plan(len(self.sources), self.cfg.num_shards, self.shard)
        return {
            "config_fingerprint": self.fingerprint,
            "tokenizer": self.tok.info(),
            "extractor": {"name": self.extractor.name, "version": self.extractor.version},
            "inputs": [{"source": self.sources[j].name, "part": p, "nparts": k} for j, p, k in plan],
            "stats": {
                "domains": {Domain(k).name.lower(): asdict(v) for k, v in sorted(self.domains.items())},
                "rejects": dict(sorted(self.rejects.items())),
                "extract_status": dict(sorted(self.extract_status.items())),
                "alignment": dict(sorted(self.alignment.items())),
                "unmatched_spans": self.unmatched_spans,
                "records_read": self.read.seen,
                "blank_lines": self.read.blank_lines,
            },
        }


def _checked_spans(spans: list, response: str) -> list:
    """``validate_spans`` semantics, with a fast path for spans that are already sorted, disjoint,
    non-touching and in bounds (what well-behaved extractors return): one pass, no sorting."""
    n, prev_end = len(response), -1
    for s in spans:
        if not (0 <= s.start < s.end <= n) or s.start <= prev_end:
            return validate_spans(spans, response)  # raises, or sorts and merges
        prev_end = s.end
    return list(spans)


def _plain_prompt(r: Record) -> str:
    if r.prompt is not None:
        return r.prompt
    users = [m["content"] for m in (r.messages or []) if m["role"] == "user"]
    return users[-1] if users else ""


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
    job = _ShardJob(cfg, shard, spec)
    # The per-batch garbage (encodings, lists) triggers many collections, each of which would also
    # walk every long-lived object (tokenizer, extractor, imported modules): freezing those first
    # saves ~7 % CPU.  Unfrozen afterwards, so an in-process caller (the trainer) is unaffected.
    gc.collect()
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


# ------------------------------------------------------------------------------------------- merge


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


# ------------------------------------------------------------------------------------------- driver


def _current_fingerprint(cfg: PreprocessConfig) -> str:
    tok = load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template)
    ex = get_extractor(cfg.extractor, **cfg.extractor_options)
    sources = expand_inputs(cfg.inputs, cfg.hf_split)
    return output_fingerprint(cfg, sources, tok.fingerprint(), (ex.name, ex.version))


def _check_existing(cfg: PreprocessConfig, fingerprint: str) -> None:
    """Refuse to mix shards of different configurations (or delete them with ``overwrite``)."""
    folder = Path(cfg.output_dir)
    stale = []
    for mpath in sorted(folder.glob("shard_*.json")):
        try:
            fp = json.loads(mpath.read_text(encoding="utf-8")).get("config_fingerprint")
        except json.JSONDecodeError:
            fp = None
        name = mpath.name[: -len(".json")]
        if fp != fingerprint or int(name.split("_")[1]) >= cfg.num_shards:
            stale.append(name)
    if not stale:
        return
    if not cfg.overwrite:
        raise ConfigMismatchError(
            f"{folder} holds {len(stale)} shard(s) made with a different configuration (e.g. {stale[0]}); "
            f"use another output folder or overwrite=True (--overwrite) to replace them")
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
    fingerprint = fingerprint or _current_fingerprint(cfg)
    return index.get("config_fingerprint") == fingerprint and not missing_shards(cfg)


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
    fingerprint = _current_fingerprint(cfg)
    if is_complete(cfg, fingerprint):
        return folder
    with _folder_lock(folder):  # e.g. several training ranks asking for the same missing cache
        if is_complete(cfg, fingerprint):
            return folder
        return _run_locked(cfg, fingerprint)


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


def _run_locked(cfg: PreprocessConfig, fingerprint: str) -> Path:
    folder = Path(cfg.output_dir)
    _check_existing(cfg, fingerprint)
    _reset_stale_markers(cfg)
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        step = ShardStep(cfg, load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec())

        workers = cfg.workers if cfg.workers > 0 else min(cfg.num_shards, os.cpu_count() or 1)
        if workers > 1:
            _preload_in_forkserver()
        LocalPipelineExecutor(pipeline=[step], tasks=cfg.num_shards, workers=workers,
                              logging_dir=str(cfg.logging_dir / "shards")).run()
        write_index(cfg)
        return folder
    # Shards may be rebuilt: the old index and the merge job's completion marker are stale.
    (folder / INDEX_FILE).unlink(missing_ok=True)
    (cfg.logging_dir / "merge" / "completions" / "00000").unlink(missing_ok=True)
    build_slurm_executor(cfg).run()
    return folder


def _preload_in_forkserver() -> None:
    """Import the heavy modules once in datatrove's forkserver, so pool workers fork with them.

    Without this every worker imports numpy/datatrove/extractor modules (openai, ...) itself,
    which costs seconds per worker and scales badly with many cores.
    """
    import multiprocess

    modules = ["preprocess.pipeline", "preprocess.rules", "preprocess.llm_extractor",
               "preprocess.none_extractor"]
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
    step = ShardStep(cfg, load_tokenizer(str(cfg.tokenizer), cfg.use_chat_template).spec())
    shards = SlurmPipelineExecutor(pipeline=[step], tasks=cfg.num_shards,
                                   cpus_per_task=s.cpus_per_task, workers=s.max_concurrent,
                                   job_name=s.job_name, logging_dir=str(cfg.logging_dir / "shards"), **common)
    return SlurmPipelineExecutor(pipeline=[_MergeStep(cfg)], tasks=1, cpus_per_task=1, depends=shards,
                                 job_name=f"{s.job_name}-merge", logging_dir=str(cfg.logging_dir / "merge"),
                                 **common)
