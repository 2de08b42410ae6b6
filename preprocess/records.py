"""Input records: JSONL (plain/.gz/.bz2/.xz/.zst), Parquet and saved HF datasets -> ``Record``/``Reject``.

Every input record yields exactly one ``Record`` or one ``Reject`` (file, line, reason), so the
counts always add up and nothing disappears silently.  Readers stream: a record is parsed only when
it belongs to the requested part (``part``/``nparts``: record ``k`` of a file is ours iff
``k % nparts == part``), which is how several shards share one big file without anyone holding it
in memory.  Record numbers ``k`` count physical lines (JSONL) or rows (Parquet/HF), 0-based; the
``line`` reported to users is ``k + 1``.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess.shards import Domain

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Reject reasons (stable strings: they are counted in manifests and listed in rejects files).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_RESPONSE = "empty_response"
UNKNOWN_DOMAIN = "unknown_domain"
BAD_MESSAGES = "bad_messages"
TOO_LONG = "too_long"
INVALID_SPANS = "invalid_spans"
REJECT_REASONS = (MALFORMED_JSON, NOT_AN_OBJECT, MISSING_FIELD, WRONG_TYPE, EMPTY_RESPONSE, UNKNOWN_DOMAIN,
                  BAD_MESSAGES, TOO_LONG)


@dataclass(frozen=True, slots=True)
class FieldMap:
    """Where each part of a sample lives in an input record.

    Either ``prompt``/``response`` text fields, or ``messages``: a chat list of ``{"role", "content"}``
    whose last turn must be the assistant's (the response) and whose earlier turns are the prompt
    (rendered with the tokenizer's chat template).  ``domain`` overrides ``domain_field`` when set.
    ``id_field`` gives the stable sample id; absent ids fall back to ``<file name>:<line>``.
    """

    prompt: str = "prompt"
    response: str = "response"
    messages: str | None = None
    domain_field: str | None = "domain"
    domain: str | None = None
    id_field: str | None = "id"


@dataclass(frozen=True, slots=True)
class Source:
    """One input unit: a file or a saved HF dataset.  ``name`` is what keys and reports use."""

    path: Path
    kind: str  # "jsonl" | "parquet" | "hf_disk"
    name: str
    split: str | None = None


@dataclass(slots=True)
class Record:
    key: str
    domain: Domain
    response: str
    prompt: str | None = None  # plain prompt text (prompt/response mapping)
    messages: list[dict[str, str]] | None = None  # chat turns before the response (messages mapping)
    source: str = ""
    line: int = 0


@dataclass(slots=True)
class Reject:
    source: str
    line: int
    reason: str
    detail: str = ""
    field: str | None = None
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"file": self.source, "line": self.line, "reason": self.reason, "detail": self.detail}
        if self.field is not None:
            d["field"] = self.field
        if self.key is not None:
            d["key"] = self.key
        return d


@dataclass(slots=True)
class ReadStats:
    """Per-source counters that are not rejects (blank lines carry no record)."""

    blank_lines: int = 0
    seen: int = 0
    per_reason: dict[str, int] = field(default_factory=dict)


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(inputs: list[str | Path], split: str | None = "train") -> list[Source]:
    """Files, directories (searched recursively, sorted) and globs -> ordered, de-duplicated sources.

    The order is part of the output definition (it decides shard contents), so it depends only on
    the arguments and the file names, never on the file system's listing order.
    """
    out: list[Source] = []
    seen: set[Path] = set()

    def add(p: Path, kind: str) -> None:
        rp = p.resolve()
        if rp in seen:
            return
        seen.add(rp)
        out.append(Source(path=p, kind=kind, name=p.name, split=split if kind == "hf_disk" else None))

    for item in inputs:
        p = Path(item)
        if _is_hf_saved(p):
            add(p, "hf_disk")
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind_of(q))
            if not found:
                raise FileNotFoundError(f"input directory {p} holds no .jsonl/.parquet file or saved dataset")
            for q in found:
                add(q, _kind_of(q))  # type: ignore[arg-type]
        elif p.is_file():
            kind = _kind_of(p)
            if kind is None:
                raise ValueError(f"input {p}: unsupported file type (expected .jsonl[.gz|.zst], .parquet)")
            add(p, kind)
        else:
            pattern = str(item)
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True)) \
                if any(c in pattern for c in "*?[") else []
            if not matches:
                raise FileNotFoundError(f"input {item} does not exist")
            for q in matches:
                if _kind_of(q):
                    add(q, _kind_of(q))  # type: ignore[arg-type]
    if not out:
        raise FileNotFoundError(f"no input files found in {inputs}")
    # Distinct display names keep default keys ("<name>:<line>") unique across directories.
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        out = [Source(s.path, s.kind, str(s.path), s.split) for s in out]
    return out


def open_text_lines(path: Path) -> Iterator[bytes]:
    """Yield raw lines (bytes) of a possibly compressed file, decompressing as a stream."""
    name = path.name.lower()
    if name.endswith(".gz"):
        f: Any = gzip.open(path, "rb")
    elif name.endswith(".bz2"):
        f = bz2.open(path, "rb")
    elif name.endswith(".xz"):
        f = lzma.open(path, "rb")
    elif name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    else:
        f = open(path, "rb", buffering=1 << 20)
    with f:
        yield from f


def _parse_domain(obj: dict[str, Any], fields: FieldMap) -> Domain | tuple[str, str, str | None]:
    if fields.domain is not None:
        return Domain.parse(fields.domain)
    if fields.domain_field is None:
        return Domain.OTHER
    if fields.domain_field not in obj or obj[fields.domain_field] is None:
        fld = fields.domain_field
        return (MISSING_FIELD, f"no domain field {fld!r} (or pass --domain)", fld)
    value = obj[fields.domain_field]
    try:
        return Domain.parse(value)
    except ValueError as e:
        return (UNKNOWN_DOMAIN, str(e), fields.domain_field)


def record_from_obj(obj: Any, fields: FieldMap, source: str, line: int) -> Record | Reject:
    """Validate one decoded record against the field mapping."""
    if not isinstance(obj, dict):
        return Reject(source, line, NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    key = None
    if fields.id_field and obj.get(fields.id_field) is not None:
        key = str(obj[fields.id_field])
    if key is None:
        key = f"{source}:{line}"

    def rej(reason: str, detail: str, fld: str | None = None) -> Reject:
        return Reject(source, line, reason, detail, fld, key)

    dom = _parse_domain(obj, fields)
    if isinstance(dom, tuple):
        return rej(*dom)
    if fields.messages:
        msgs = obj.get(fields.messages)
        if msgs is None:
            return rej(MISSING_FIELD, f"no field {fields.messages!r}", fields.messages)
        if not isinstance(msgs, list) or not msgs:
            return rej(BAD_MESSAGES, "messages must be a non-empty list", fields.messages)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("role", "content")):
                return rej(BAD_MESSAGES, f"turn {i} is not {{'role': str, 'content': str}}", fields.messages)
        if msgs[-1]["role"] != "assistant":
            return rej(BAD_MESSAGES, f"last turn has role {msgs[-1]['role']!r}, expected 'assistant'",
                       fields.messages)
        if len(msgs) < 2:
            return rej(BAD_MESSAGES, "no turn before the assistant's response", fields.messages)
        response = msgs[-1]["content"]
        if not response.strip():
            return rej(EMPTY_RESPONSE, "assistant turn is empty", fields.messages)
        prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        return Record(key=key, domain=dom, response=response, messages=prompt_msgs, source=source, line=line)
    for fld in (fields.prompt, fields.response):
        if fld not in obj or obj[fld] is None:
            return rej(MISSING_FIELD, f"no field {fld!r}", fld)
        if not isinstance(obj[fld], str):
            return rej(WRONG_TYPE, f"field {fld!r} is {type(obj[fld]).__name__}, expected str", fld)
    response = obj[fields.response]
    if not response.strip():
        return rej(EMPTY_RESPONSE, "response is empty or whitespace", fields.response)
    return Record(key=key, domain=dom, response=response, prompt=obj[fields.prompt], source=source, line=line)


def _iter_jsonl(src: Source, part: int, nparts: int, fields: FieldMap,
                stats: ReadStats) -> Iterator[Record | Reject]:
    for k, raw in enumerate(open_text_lines(src.path)):
        if k % nparts != part:
            continue
        line = k + 1
        if not raw.strip():
            stats.blank_lines += 1
            continue
        stats.seen += 1
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield Reject(src.name, line, MALFORMED_JSON, str(e)[:200])
            continue
        yield record_from_obj(obj, fields, src.name, line)


def _iter_parquet(src: Source, part: int, nparts: int, fields: FieldMap,
                  stats: ReadStats) -> Iterator[Record | Reject]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src.path)
    k = 0
    for batch in pf.iter_batches(batch_size=2048):
        n = batch.num_rows
        # Materialise only our rows of the batch as Python objects.
        mine = [i for i in range(n) if (k + i) % nparts == part]
        if mine:
            rows = batch.take(mine).to_pylist()
            for i, obj in zip(mine, rows):
                stats.seen += 1
                yield record_from_obj(obj, fields, src.name, k + i + 1)
        k += n


def _iter_hf_disk(src: Source, part: int, nparts: int, fields: FieldMap,
                  stats: ReadStats) -> Iterator[Record | Reject]:
    import datasets

    ds = datasets.load_from_disk(str(src.path))
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise KeyError(f"{src.path}: split {src.split!r} not in saved dataset (has {list(ds)})")
        ds = ds[src.split]
    mine = ds.shard(num_shards=nparts, index=part, contiguous=False) if nparts > 1 else ds
    j = 0
    for batch in mine.iter(batch_size=1024):
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for i in range(n):
            obj = {c: batch[c][i] for c in cols}
            stats.seen += 1
            yield record_from_obj(obj, fields, src.name, part + (j + i) * nparts + 1)
        j += n


def iter_records(src: Source, fields: FieldMap, part: int = 0, nparts: int = 1,
                 stats: ReadStats | None = None) -> Iterator[Record | Reject]:
    """Stream part ``part`` of ``nparts`` of a source as Records/Rejects, in file order."""
    stats = stats if stats is not None else ReadStats()
    if src.kind == "jsonl":
        yield from _iter_jsonl(src, part, nparts, fields, stats)
    elif src.kind == "parquet":
        yield from _iter_parquet(src, part, nparts, fields, stats)
    elif src.kind == "hf_disk":
        yield from _iter_hf_disk(src, part, nparts, fields, stats)
    else:
        raise ValueError(f"unknown source kind {src.kind!r}")


def shard_plan(num_sources: int, num_shards: int, shard: int) -> list[tuple[int, int, int]]:
    """Which (source index, part, nparts) feed ``shard``: a pure function of the two counts.

    - at least as many sources as shards: source ``j`` goes whole to shard ``j % num_shards``, so
      each task opens only its own files (the many-files corpus case);
    - fewer sources than shards: source ``j`` is split record-wise over the shards
      ``j, j + F, j + 2F, ...`` (F = number of sources), so each task still reads a single file and
      parses only every ``nparts``-th record of it.

    Either way shard contents depend only on the inputs and ``num_shards``, never on how many
    workers or nodes run the tasks.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range({num_shards})")
    if num_sources >= num_shards:
        return [(j, 0, 1) for j in range(shard, num_sources, num_shards)]
    j = shard % num_sources
    group = list(range(j, num_shards, num_sources))
    return [(j, group.index(shard), len(group))]
