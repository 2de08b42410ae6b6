"""Input records: JSONL (plain/.gz/.bz2/.xz/.zst), Parquet and saved HF datasets -> ``Record``/``Reject``.

Every input record yields exactly one ``Record`` or one ``Reject`` (file, line, reason), so the
counts always add up and nothing disappears silently.  Readers stream a whole source or one
``Unit`` of it (a byte range of plain JSONL, row groups of Parquet, Arrow files of a saved HF
dataset), so several tasks share one big file and each byte is read by one task only
(``preprocess.splits`` decides the units).  ``line`` is the 1-based physical line (JSONL) or row
(Parquet/HF) number in the source, also inside a unit.
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
    bytes_read: int = 0  # input bytes this reader consumed (compressed size for compressed streams)
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
            if not any(c in pattern for c in "*?["):
                raise FileNotFoundError(f"input {item}: no such file or directory")
            matches = [q for q in sorted(Path(m) for m in glob.glob(pattern, recursive=True))
                       if q.is_file() and _kind_of(q)]
            if not matches:
                raise FileNotFoundError(f"input {item}: the pattern matches no .jsonl/.parquet file")
            for q in matches:
                add(q, _kind_of(q))  # type: ignore[arg-type]
    if not out:
        raise FileNotFoundError(f"no input files found in {inputs}")
    # Distinct display names keep default keys ("<name>:<line>") unique across directories.
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        out = [Source(s.path, s.kind, str(s.path), s.split) for s in out]
    return out


def open_text_lines(path: Path, progress: ReadStats | None = None) -> Iterator[bytes]:
    """Yield raw lines (bytes) of a possibly compressed file, decompressing as a stream.

    With ``progress``, its ``bytes_read`` follows the position in the (compressed) file.
    """
    name = path.name.lower()
    raw = open(path, "rb", buffering=1 << 20)
    if name.endswith(".gz"):
        f: Any = gzip.GzipFile(fileobj=raw, mode="rb")
    elif name.endswith(".bz2"):
        f = bz2.BZ2File(raw, "rb")
    elif name.endswith(".xz"):
        f = lzma.LZMAFile(raw, "rb")
    elif name.endswith(".zst"):
        import zstandard

        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    else:
        f = raw
    base = progress.bytes_read if progress is not None else 0
    with raw, f:
        for k, line in enumerate(f):
            if progress is not None and k % 1024 == 0:
                progress.bytes_read = base + raw.tell()
            yield line
        if progress is not None:
            progress.bytes_read = base + raw.tell()


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


def _iter_jsonl(src: Source, unit: Unit | None, fields: FieldMap,
                stats: ReadStats) -> Iterator[Record | Reject]:
    if unit is not None and is_splittable(src):
        lines: Iterator[bytes] = _byte_range_lines(src.path, unit.start, unit.end, stats)
    else:
        lines = open_text_lines(src.path, stats)  # a compressed stream is read whole, by one task
    base = unit.line_base if unit is not None else 0
    for k, raw in enumerate(lines):
        line = base + k + 1
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


def _byte_range_lines(path: Path, start: int, end: int, stats: ReadStats) -> Iterator[bytes]:
    """The lines of a plain file that *start* in ``[start, end)``: a line crossing ``end`` is read
    to its end here; the next range skips it by reading from ``start - 1`` to the first newline (a
    line starts at ``start`` iff byte ``start - 1`` is a newline).  Newline bytes never occur inside
    a multi-byte UTF-8 character, and ``\r\n`` endings are whitespace to the JSON parser."""
    with open(path, "rb", buffering=1 << 20) as f:
        if start > 0:
            f.seek(start - 1)
            stats.bytes_read += len(f.readline())
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            stats.bytes_read += len(raw)
            yield raw


def _iter_parquet(src: Source, unit: Unit | None, fields: FieldMap,
                  stats: ReadStats) -> Iterator[Record | Reject]:
    import pyarrow.parquet as pq

    md = (pf := pq.ParquetFile(src.path)).metadata
    groups = range(unit.start, unit.end) if unit is not None else range(md.num_row_groups)
    stats.bytes_read += sum(row_group_bytes(md, g) for g in groups)
    k = unit.line_base if unit is not None else 0
    for batch in pf.iter_batches(batch_size=2048, row_groups=list(groups)):
        for obj in batch.to_pylist():
            k += 1
            stats.seen += 1
            yield record_from_obj(obj, fields, src.name, k)


def row_group_bytes(md: Any, g: int) -> int:
    """Compressed bytes of row group ``g`` (its column chunks) in Parquet metadata ``md``."""
    rg = md.row_group(g)
    return sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))


def hf_arrow_files(src: Source) -> list[Path]:
    """The Arrow files of a saved HF dataset (split), in order (``state.json``'s ``_data_files``)."""
    folder = src.path
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if src.split not in splits:
            raise KeyError(f"{src.path}: split {src.split!r} not in saved dataset (has {splits})")
        folder = folder / str(src.split)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return [folder / f["filename"] for f in state["_data_files"]]


def arrow_rows(path: Path) -> int:
    """Rows of one Arrow stream file (memory-mapped: only batch headers are touched)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as f:
        return sum(b.num_rows for b in pa.ipc.open_stream(f))


def _iter_hf_disk(src: Source, unit: Unit | None, fields: FieldMap,
                  stats: ReadStats) -> Iterator[Record | Reject]:
    import pyarrow as pa

    files = hf_arrow_files(src)
    chosen = range(unit.start, unit.end) if unit is not None else range(len(files))
    k = unit.line_base if unit is not None else 0
    for i in chosen:
        stats.bytes_read += files[i].stat().st_size
        with pa.memory_map(str(files[i])) as f:
            for batch in pa.ipc.open_stream(f):
                for obj in batch.to_pylist():
                    k += 1
                    stats.seen += 1
                    yield record_from_obj(obj, fields, src.name, k)


def is_splittable(src: Source) -> bool:
    """Plain (uncompressed) JSONL can be split into byte ranges; compressed streams cannot."""
    return src.kind == "jsonl" and not src.path.name.lower().endswith(COMPRESSED)


@dataclass(frozen=True, slots=True)
class Unit:
    """A piece of one source that one task reads (``preprocess.splits`` decides them).

    ``start``/``end`` (end exclusive) count bytes for plain JSONL (the lines that *start* in the
    range), row groups for Parquet, Arrow files for a saved HF dataset; a compressed stream is one
    whole unit (``0``..its size).  ``line_base``: lines (rows) of the source before the unit, so
    reported line numbers are the file's own.  ``nbytes``: input bytes covered (balancing weight).
    """

    source: int
    start: int
    end: int
    nbytes: int
    line_base: int = 0


def iter_records(src: Source, fields: FieldMap, stats: ReadStats | None = None,
                 unit: Unit | None = None) -> Iterator[Record | Reject]:
    """Stream a source (or one ``unit`` of it) as Records/Rejects, in file order."""
    stats = stats if stats is not None else ReadStats()
    if src.kind == "jsonl":
        yield from _iter_jsonl(src, unit, fields, stats)
    elif src.kind == "parquet":
        yield from _iter_parquet(src, unit, fields, stats)
    elif src.kind == "hf_disk":
        yield from _iter_hf_disk(src, unit, fields, stats)
    else:
        raise ValueError(f"unknown source kind {src.kind!r}")
