"""Label readers for ``benchmarks/extraction_agreement.py``: reference spans from different formats.

Every reader returns :class:`Labelled` records (a response, its domain and source, the split and
the reference spans as character ranges).  Bad records are never dropped silently: each raises
:class:`LabelError` naming the file, the line (or row) and the field.

Formats (``--labels FORMAT:PATH``; ``PATH`` alone means ``agreement``):

- ``agreement``: the hand-labelled set in ``benchmarks/data/extraction_agreement/`` (JSONL; each
  span has ``start``, ``end``, ``kind`` and the ``text`` it covers, which must match the response).
- ``spans``: any JSONL or Parquet file of responses with extracted spans, such as the paper's
  GPT-4o extractions (``opc-sft-stage2-dense-extracted`` on the Hugging Face hub).  The field names
  are options (``--field response=output``, ...; defaults in :data:`SPANS_FIELDS`); a span is
  ``{"start": s, "end": e}``, ``[s, e]``, or a verbatim ``{"text": ..., "occurrence": k}`` as the
  LLM extractor asks for (located with :func:`preprocess.extractors.llm.answers.locate_spans`; an
  unlocatable text is an error, not a guess).  ``domain`` and ``source`` fall back to
  ``--field domain=code`` style constants when the file has no such column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.extractors.base import Span, SpanError, validate_spans
from preprocess.shards import Domain

AGREEMENT_SET = Path(__file__).resolve().parent / "data" / "extraction_agreement" / "agreement.jsonl"
SPLITS = ("calibration", "heldout")

SPANS_FIELDS: dict[str, str] = {
    "id": "id",
    "prompt": "instruction",
    "response": "output",
    "spans": "spans",
    "domain": "domain",
    "source": "source",
}
"""Default column names of the ``spans`` format (override any with ``--field NAME=COLUMN``).  When a
column named by ``domain``/``source`` is absent, the value itself is used as a constant, so
``--field domain=code`` labels a code-only file."""


class LabelError(ValueError):
    """A label record that cannot be read; the message names file, line and field."""


@dataclass(frozen=True, slots=True)
class Labelled:
    """One labelled response."""

    key: str
    source: str
    domain: Domain
    split: str
    prompt: str
    response: str
    spans: tuple[Span, ...]


def read_labels(spec: str, fields: Mapping[str, str] | None = None) -> list[Labelled]:
    """``FORMAT:PATH`` or a bare path (``agreement`` format) -> records."""
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in READERS:
        fmt, path = "agreement", spec
    p = Path(path)
    if not p.exists():
        raise LabelError(f"{p}: no such label file")
    return list(READERS[fmt](p, dict(fields or {})))


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line or row number, record) from JSONL or Parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets/datatrove; only this format needs it

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise LabelError(f"{path}:{i}: expected a JSON object")
            yield i, rec


def _field(path: Path, line: int, rec: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in rec:
        raise LabelError(f"{path}:{line}: missing field {name!r}")
    v = rec[name]
    if not isinstance(v, kind):
        raise LabelError(f"{path}:{line}: field {name!r} must be {kind.__name__}, got {type(v).__name__}")
    return v


def _checked(path: Path, line: int, spans: list[Span], response: str) -> tuple[Span, ...]:
    try:
        return tuple(validate_spans(spans, response))
    except SpanError as e:
        raise LabelError(f"{path}:{line}: field 'spans': {e}") from None


def read_agreement(path: Path, _fields: dict[str, str]) -> Iterator[Labelled]:
    """The hand-labelled set: offsets plus the covered text, which must agree."""
    for line, rec in _rows(path):
        response = _field(path, line, rec, "response", str)
        split = _field(path, line, rec, "split", str)
        if split not in SPLITS:
            raise LabelError(f"{path}:{line}: field 'split' must be one of {SPLITS}, got {split!r}")
        spans = []
        for k, sp in enumerate(_field(path, line, rec, "spans", list)):
            s, e, text = sp.get("start"), sp.get("end"), sp.get("text")
            if not (isinstance(s, int) and isinstance(e, int) and isinstance(text, str)):
                raise LabelError(f"{path}:{line}: field 'spans[{k}]' needs int start/end and str text")
            if response[s:e] != text:
                raise LabelError(f"{path}:{line}: field 'spans[{k}]': response[{s}:{e}] is "
                                 f"{response[s:e]!r}, not {text!r}")
            spans.append(Span(s, e, str(sp.get("kind", "dense"))))
        try:
            domain = Domain.parse(_field(path, line, rec, "domain", str))
        except ValueError as e:
            raise LabelError(f"{path}:{line}: field 'domain': {e}") from None
        yield Labelled(_field(path, line, rec, "id", str), _field(path, line, rec, "source", str), domain,
                       split, str(rec.get("prompt", "")), response, _checked(path, line, spans, response))


def read_spans(path: Path, fields: dict[str, str]) -> Iterator[Labelled]:
    """Any file of responses with extracted spans (see the module docstring)."""
    from preprocess.extractors.llm.answers import locate_spans

    unknown = set(fields) - set(SPANS_FIELDS)
    if unknown:
        raise LabelError(f"unknown --field name(s) {sorted(unknown)}; known: {sorted(SPANS_FIELDS)}")
    f = {**SPANS_FIELDS, **fields}
    for line, rec in _rows(path):
        response = _field(path, line, rec, f["response"], str)
        raw = rec.get(f["spans"])
        if isinstance(raw, str):  # some exports keep the span list as a JSON string
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise LabelError(f"{path}:{line}: field {f['spans']!r} is a string but not JSON") from None
        if not isinstance(raw, list):
            raise LabelError(f"{path}:{line}: field {f['spans']!r} must be a list of spans")
        spans: list[Span] = []
        for k, sp in enumerate(raw):
            if isinstance(sp, Mapping) and "text" in sp and "start" not in sp:
                got, missed = locate_spans(response, [{"occurrence": 1, **sp}])
                if missed:
                    raise LabelError(f"{path}:{line}: field '{f['spans']}[{k}]': text {sp['text']!r} "
                                     f"is not in the response")
                spans += got
                continue
            s, e = (sp.get("start"), sp.get("end")) if isinstance(sp, Mapping) else (
                sp if isinstance(sp, (list, tuple)) and len(sp) == 2 else (None, None))
            if not (isinstance(s, int) and isinstance(e, int)):
                raise LabelError(f"{path}:{line}: field '{f['spans']}[{k}]': expected start/end or text")
            spans.append(Span(s, e, "dense"))
        try:
            domain = Domain.parse(rec.get(f["domain"], f["domain"]))
        except ValueError as e:
            raise LabelError(f"{path}:{line}: field {f['domain']!r}: {e}") from None
        source = rec.get(f["source"], f["source"] if "source" in fields else path.stem)
        yield Labelled(str(rec.get(f["id"], f"{path.stem}-{line}")), str(source), domain, "heldout",
                       str(rec.get(f["prompt"], "")), response, _checked(path, line, spans, response))


READERS = {"agreement": read_agreement, "spans": read_spans}
