"""One shard task's work: read -> tokenize -> extract -> align -> write, batch by batch.

This is the hot path of the pipeline.  Everything per batch is vectorised (one ``encode_batch[_fast]``
call, one flags array, one alignment pass over the whole batch, one ``ShardWriter.add_batch``), so
the per-record Python work is a few list operations; see :meth:`ShardJob.extract_and_write`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.align import (
    AlignmentError,
    TokenizerBundle,
    TokenizerSpec,
    align_spans,
    char_to_byte_positions,
    mark_overlaps,
    spans_to_arrays,
)
from preprocess.budget import budget_tokens, trim_to_budget
from preprocess.extractors.base import (
    SpanError,
    extract_input,
    fraction_for,
    fraction_selected,
    validate_spans,
)
from preprocess.extractors.registry import get_extractor
from preprocess.pipeline.config import PreprocessConfig, RejectError, available_cores
from preprocess.pipeline.inputs import RunInputs
from preprocess.records import (
    INVALID_SPANS,
    TOO_LONG,
    ReadStats,
    Record,
    Reject,
    Unit,
    iter_records,
)
from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    Domain,
    DomainCounts,
    ShardWriter,
)

CRASH_ENV = "DM_PREPROCESS_CRASH_AFTER"  # test hook: "<shard>:<samples>" -> os._exit(137) mid-shard


def _batched(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, use_chat_template: bool) -> TokenizerBundle:
    """One tokenizer per process and setting: worker processes run several shard tasks each."""
    return TokenizerBundle(name_or_path, use_chat_template)


TOKENIZER_THREAD_ENV = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")


@contextlib.contextmanager
def tokenizer_threads(cfg: PreprocessConfig) -> Iterator[None]:
    """Give each concurrent local shard task its share of the cores for ``encode_batch``.

    ``tokenizers`` runs every batch on a rayon pool of one thread per core in *each* process: N
    workers on N cores would run N x N threads, and the oversubscribed threads cost CPU (spinning,
    switching) for no speed.  So a task gets ``cores // workers`` threads: the serial code path when
    that is 1 (``TOKENIZERS_PARALLELISM=false``, read at every call), else ``RAYON_NUM_THREADS`` (read
    when the process builds its pool; a fresh worker has none yet).  Restored afterwards for an
    in-process caller; left alone when the user set either variable, and on SLURM (a task owns its
    allocation).  Output bytes do not depend on it (``encode_batch`` is deterministic).
    """
    if cfg.executor != "local" or any(k in os.environ for k in TOKENIZER_THREAD_ENV):
        yield
        return
    cores = available_cores()
    threads = cores // min(cfg.local_workers(), cfg.num_shards)
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    elif threads < cores:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for k in TOKENIZER_THREAD_ENV:
            os.environ.pop(k, None)


PROGRESS_EVERY_S = 0.5


class ShardJob:
    """Processes one shard; holds the tokenizer, extractor and counters."""

    def __init__(self, cfg: PreprocessConfig, shard: int, spec: TokenizerSpec, inputs: RunInputs) -> None:
        self.cfg = cfg
        self.shard = shard
        self.tok = spec
        self.extractor = get_extractor(cfg.extractor, **cfg.extractor_options)
        self.inputs = inputs.with_plan(cfg.num_shards)
        self.sources = inputs.sources
        self.units: list[Unit] = inputs.plan[shard]  # type: ignore[index]
        self.fingerprint = inputs.fingerprint
        self.domains: dict[int, DomainCounts] = {}
        self.rejects: Counter[str] = Counter()
        self.extract_status: Counter[str] = Counter()
        self.alignment: Counter[str] = Counter()
        self.unmatched_spans = 0
        self.read = ReadStats()
        self.fractions = {d: fraction_for(cfg.fractions, d) for d in Domain}
        self.max_rho = {d: cfg.max_rho[d.name.lower()] for d in Domain if d.name.lower() in cfg.max_rho}
        bos = self.tok.bos_id
        # BOS only where no chat template is actually applied (asked for AND present); evaluation's
        # encode_prompts follows the same rule (tests/test_generate.py pins the parity).
        self.bos = [] if self.tok.use_chat_template or bos is None else [bos]
        # Byte-level tokenizers align by token byte lengths (``align_batch``), so batches are encoded
        # without offsets (``encode_batch_fast``: the same ids, 5-18 % less tokenizer CPU).  A sample
        # whose byte lengths do not add up gets its offsets by encoding it again
        # (``response_offsets``), and later batches are encoded with offsets: a tokenizer where that
        # happens (``add_prefix_space``) would otherwise encode most responses twice.
        # Whether the current batch is (and later ones are) encoded with offsets; it changes only after
        # a batch's alignment is done, so while a batch is aligned it describes that batch's encodings.
        self.with_offsets = self.tok.byte_table is None
        crash = os.environ.get(CRASH_ENV, "")
        c_shard, _, c_after = crash.partition(":")
        self.crash_after = int(c_after) if crash and int(c_shard) == shard else -1
        self.progress_path = cfg.logging_dir / "progress" / f"shard_{shard:05d}.json"
        self._t0 = time.time()
        self._last_progress = 0.0

    def records(self) -> Iterator[Record | Reject]:
        for u in self.units:
            yield from iter_records(self.sources[u.source], self.cfg.fields, self.read, u)

    def report_progress(self, writer: ShardWriter, done: bool = False) -> None:
        """Counters for the live display (``cli``), at most every ``PROGRESS_EVERY_S``: not data,
        so written without fsync to the logging folder."""
        now = time.time()
        if not done and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        state = {"shard": self.shard, "start": self._t0, "now": now, "done": done,
                 "records": self.read.seen + self.read.blank_lines, "samples": writer.num_samples,
                 "tokens": writer.num_tokens, "bytes": self.read.bytes_read,
                 "bytes_total": sum(u.nbytes for u in self.units)}
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.progress_path)

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
        self.progress_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for batch in _batched(self.records(), self.cfg.batch_size):
                self.process_batch(writer, batch)
                self.report_progress(writer)
            check = getattr(self.extractor, "check_publishable", None)
            if check is not None:  # e.g. the LLM extractor's failure budget: raises, nothing is published
                check()
            manifest = writer.finish(self.manifest_extra())
            self.report_progress(writer, done=True)
            return manifest
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
        (one encode_batch[_fast] call, one flags array, one alignment pass), so per-sample Python work
        stays a few list operations: this is what keeps the pipeline close to raw tokenizer speed.
        """
        n_rec = len(recs)
        texts = [self.tok.render_prompt(r.prompt, r.messages) for r in recs] + [r.response for r in recs]
        backend = self.tok.backend
        encs = (backend.encode_batch if self.with_offsets else backend.encode_batch_fast)(
            texts, add_special_tokens=False)
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
            dense_pos, by_offsets = self.align_batch(recs, keep, spans, encs, n_rec, with_spans, tokens,
                                                     starts + p_len, r_len)
            if self.max_rho:
                dense_pos = self.apply_budget(recs, keep, spans, encs, n_rec, tokens, starts + p_len, r_len,
                                              sample_of, dense_pos, by_offsets)
            self.with_offsets |= bool(by_offsets)
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
        inputs = [extract_input(recs[i])
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
                    r_len: np.ndarray) -> tuple[np.ndarray, set[int]]:
        """Global token positions that overlap a span, for the kept samples listed in ``with_spans``,
        and the samples (of ``with_spans``) aligned by tokenizer offsets rather than byte lengths.

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
                totals = (cum[seg_end] - seg_base).tolist()
                bases = seg_base.tolist()
                # span bounds of the whole batch in one byte coordinate system, as plain ints: an
                # ASCII response (most) needs no conversion, so no numpy call per sample
                ss_all: list[int] = []
                se_all: list[int] = []
                fallback = []
                for j, k in enumerate(with_spans):
                    i = keep[k]
                    resp = recs[i].response
                    base = bases[j]
                    if resp.isascii():
                        if totals[j] != len(resp):
                            fallback.append(k)
                            continue
                        ss_all += [s.start + base for s in spans[i]]
                        se_all += [s.end + base for s in spans[i]]
                        continue
                    cpos = char_to_byte_positions(resp)
                    if totals[j] != int(cpos[-1]):
                        fallback.append(k)
                        continue
                    ss, se = spans_to_arrays(spans[i])
                    ss_all += (cpos[ss] + base).tolist()
                    se_all += (cpos[se] + base).tolist()
                self.alignment["bytes"] += len(with_spans) - len(fallback)
                if ss_all:
                    hit = mark_overlaps(cum - blen, cum, np.array(ss_all, dtype=np.int64),
                                        np.array(se_all, dtype=np.int64))
                    out.append(seg_pos[hit])
        for k in fallback:
            i = keep[k]
            r = recs[i]
            a, n = int(r_start[k]), int(r_len[k])
            try:
                offsets = self.response_offsets(encs[n_rec + i], r.response)
                res = align_spans(tokens[a:a + n], offsets, r.response, spans[i], None)
            except AlignmentError as e:
                if self.cfg.strict:
                    raise RejectError(f"{r.source}:{r.line}: alignment failed: {e}") from e
                self.alignment["error"] += 1
                continue
            self.alignment[res.method] += 1
            out.append(a + np.flatnonzero(res.dense))
        return (np.concatenate(out) if out else np.zeros(0, dtype=np.int64)), set(fallback)

    def response_offsets(self, enc: Any, text: str) -> list[tuple[int, int]]:
        """Tokenizer offsets of a response from its encoding; when the batch was encoded without
        them (``encode_batch_fast``), by encoding the response again (the same ids, with offsets)."""
        if self.with_offsets:
            return enc.offsets
        return self.tok.backend.encode(text, add_special_tokens=False).offsets

    def apply_budget(self, recs: list[Record], keep: list[int], spans: list[list], encs: list, n_rec: int,
                     tokens: np.ndarray, r_start: np.ndarray, r_len: np.ndarray, sample_of: np.ndarray,
                     dense_pos: np.ndarray, by_offsets: set[int]) -> np.ndarray:
        """``dense_pos`` with every sample over its domain's rho budget trimmed to it (lowest-scoring
        spans dropped, ``preprocess.budget``), counted per domain; samples within it are untouched.
        ``by_offsets``: the samples ``align_batch`` aligned by offsets; the others by byte lengths,
        which need no offsets."""
        n_dense = np.bincount(sample_of[dense_pos], minlength=len(keep))
        trimmed = np.zeros(len(keep), dtype=bool)
        new: list[np.ndarray] = []
        for k in np.flatnonzero(n_dense).tolist():
            i = keep[k]
            rho = self.max_rho.get(recs[i].domain)
            budget = 0 if rho is None else budget_tokens(rho, int(r_len[k]) + 1)
            if rho is None or n_dense[k] <= budget:
                continue
            a, n = int(r_start[k]), int(r_len[k])
            offsets = self.response_offsets(encs[n_rec + i], recs[i].response) if k in by_offsets else None
            t = trim_to_budget(tokens[a:a + n], offsets, recs[i].response, spans[i], self.tok.byte_table,
                               budget)
            trimmed[k] = True
            new.append(a + np.flatnonzero(t.dense))
            d = self.domains.setdefault(int(recs[i].domain), DomainCounts())
            d.budget_samples += 1
            d.budget_dropped_spans += t.dropped_spans
            d.budget_dropped_tokens += t.dropped_tokens
        if not new:
            return dense_pos
        return np.concatenate([dense_pos[~trimmed[sample_of[dense_pos]]], *new])

    def manifest_extra(self) -> dict[str, Any]:
        return {
            "config_fingerprint": self.fingerprint,
            "fingerprint_parts": self.inputs.parts,
            "tokenizer": self.tok.info(),
            "extractor": {"name": self.extractor.name, "version": self.extractor.version},
            "inputs": [{"source": self.sources[u.source].name, "start": u.start, "end": u.end,
                        "bytes": u.nbytes, "first_line": u.line_base + 1} for u in self.units],
            "stats": {
                "domains": {Domain(k).name.lower(): asdict(v) for k, v in sorted(self.domains.items())},
                "rejects": dict(sorted(self.rejects.items())),
                "extract_status": dict(sorted(self.extract_status.items())),
                "alignment": dict(sorted(self.alignment.items())),
                "unmatched_spans": self.unmatched_spans,
                "records_read": self.read.seen,
                "blank_lines": self.read.blank_lines,
                "bytes_read": self.read.bytes_read,
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
