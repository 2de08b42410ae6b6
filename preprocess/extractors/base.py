"""Information-dense spans and the extractor interface (paper §2.1).

An extractor maps one sample ``(prompt, response, domain)`` to character spans of the
*response* that are information-dense (code: control-flow conditions, algorithm pivots; math:
core operations, key intermediate and final results).  Spans are half-open ``[start, end)``
Python string indices into ``response`` (code points, not bytes), each with a ``kind`` label.
The aligner (``preprocess.align``) turns them into the per-token indicator vector C.

Extractors are plugged into the preprocessor by name through the plain dict
``preprocess.extractors.registry.EXTRACTORS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from preprocess.records import FieldMap, Record, Reject, expand_inputs, iter_records
from preprocess.shards import Domain

PAPER_RHO: dict[Domain, float] = {Domain.CODE: 0.25, Domain.MATH: 0.31}
"""The paper's info-dense token share with GPT-4o spans (§3.2), per domain: the rules' calibration
target and the default share of the ``confidence`` extractor."""


class ExtractorError(RuntimeError):
    """The extractor cannot go on (bad credentials, failure budget spent, ...): the run stops with
    this one-line message instead of writing samples without spans."""


class SpanError(ValueError):
    """A span that does not fit the response it claims to come from."""


class Span(NamedTuple):
    """A half-open character range ``[start, end)`` of the response, with a kind label and a score.

    ``score`` is the span's priority under a rho budget (``preprocess.budget``): higher scores are
    kept first, equal scores keep the earlier span.  Rules: the priority of the rule that found it;
    ``confidence``: the model's masked-token loss or entropy; extractors without one leave 0.0.

    A named tuple (immutable, ordered by its fields): every extracted sample's spans are built and
    read on the pipeline's hot path, and a tuple is built in C where a frozen dataclass costs a
    Python-level ``__setattr__`` per field (~1.2 against ~0.2 µs with ``tuple.__new__``).
    """

    start: int
    end: int
    kind: str = "dense"
    score: float = 0.0


RawSpan = tuple[int, int, str]
"""``(start, end, kind)``: a rule span before the extractor merges and scores it."""


@dataclass(frozen=True, slots=True)
class ExtractInput:
    """What an extractor sees of one sample.  ``key`` is the stable sample id (cache key part)."""

    key: str
    prompt: str
    response: str
    domain: Domain


def extract_input(record: Record) -> ExtractInput:
    """What an extractor sees of an input record: the plain prompt (a chat's last user turn)."""
    prompt = record.prompt
    if prompt is None:
        users = [m["content"] for m in (record.messages or []) if m["role"] == "user"]
        prompt = users[-1] if users else ""
    return ExtractInput(record.key, prompt, record.response, record.domain)


def read_inputs(inputs: Sequence[str | Path], fields: FieldMap, rejects: list[Reject],
                split: str | None = "train") -> Iterator[ExtractInput]:
    """The records of ``inputs`` (read by ``preprocess.records``) as extractor inputs; every record
    that is not a sample is appended to ``rejects`` (it names file, line, reason and field)."""
    for src in expand_inputs(list(inputs), split):
        for r in iter_records(src, fields):
            if isinstance(r, Reject):
                rejects.append(r)
            else:
                yield extract_input(r)


@dataclass(slots=True)
class ExtractResult:
    """Spans for one sample plus what went wrong, so that nothing is silently dropped.

    ``status`` is ``"ok"`` or a short reason (``"unparsable_code"``, ``"llm_refused"``, ...)
    that the preprocessor counts per reason; ``spans`` may still be partial when not ok.
    ``unmatched`` counts spans an extractor proposed but could not locate in the response.
    """

    spans: list[Span] = field(default_factory=list)
    status: str = "ok"
    unmatched: int = 0


@runtime_checkable
class Extractor(Protocol):
    """Anything with a name, a version and a batched ``extract``.

    ``name``/``version`` go into every shard manifest so a change of rules or prompts changes the
    output fingerprint.  ``extract_batch`` gets a whole batch so that API-backed extractors can
    run requests concurrently; rule-based ones simply loop.
    """

    name: str
    version: str

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]: ...


def validate_spans(spans: Sequence[Span], response: str) -> list[Span]:
    """Check bounds and emptiness, then sort and merge overlaps (a merged span keeps the first kind and
    the highest score); raise ``SpanError`` on misuse."""
    n = len(response)
    out: list[Span] = []
    for s in sorted(spans):
        if not (0 <= s.start < s.end <= n):
            raise SpanError(f"span [{s.start}, {s.end}) ({s.kind}) outside response of length {n}")
        if out and s.start <= out[-1].end:
            last = out[-1]
            if s.end > last.end or s.score > last.score:
                out[-1] = Span(last.start, max(s.end, last.end), last.kind, max(s.score, last.score))
            continue
        out.append(s)
    return out


def fraction_selected(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic, seeded choice of the extracted fraction (paper §3.2: code 10 %, math 50 %).

    Hash-based rather than RNG-based so the choice of a sample does not depend on shard layout,
    worker count or reading order.
    """
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def parse_fractions(value: str | Mapping[str, float] | None, option: str = "--fraction") -> dict[str, float]:
    """A share per domain: ``"code=0.1,math=0.5"`` or a mapping -> ``{"code": 0.1, "math": 0.5}``.

    The one parser of per-domain shares: the extracted fraction (``--fraction``) and the rho budget
    (``--max-rho``, named by ``option`` in messages).  Keys become canonical domain names; domains
    not given keep 1.0 (``fraction_for``).  Raises ``ValueError`` naming the bad item (unknown
    domain, missing ``=``, value outside [0, 1]).
    """
    if not value:
        return {}
    if isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, number = part.partition("=")
            if not sep:
                raise ValueError(f"{option} item {part!r}: expected domain=value")
            items.append((name, number))
    else:
        items = list(value.items())
    out: dict[str, float] = {}
    for name, number in items:
        f = float(number)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{option} for {name!r} is {f}; expected a value in [0, 1]")
        out[Domain.parse(name).name.lower()] = f
    return out


def fraction_for(fractions: Mapping[str, float], domain: Domain) -> float:
    """The extracted share of ``domain`` in parsed ``fractions`` (1.0 when not given)."""
    return float(fractions.get(domain.name.lower(), 1.0))
