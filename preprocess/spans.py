"""Information-dense spans and the extractor interface (paper §2.1).

An extractor maps one sample ``(prompt, response, domain)`` to character spans of the
*response* that are information-dense (code: control-flow conditions, algorithm pivots; math:
core operations, key intermediate and final results).  Spans are half-open ``[start, end)``
Python string indices into ``response`` (code points, not bytes), each with a ``kind`` label.
The aligner (``preprocess.align``) turns them into the per-token indicator vector C.

Extractors are plugged into the preprocessor by name through a small registry::

    @register_extractor("rules")
    class RuleExtractor: ...

    extractor = get_extractor("rules", **options)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, runtime_checkable


class Domain(IntEnum):
    """Stored as one uint8 per sample in the shards; values are part of the on-disk format."""

    OTHER = 0
    CODE = 1
    MATH = 2

    @classmethod
    def parse(cls, value: str | int | Domain) -> Domain:
        if isinstance(value, Domain):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(f"unknown domain {value!r}; expected one of "
                             f"{[d.name.lower() for d in cls]}") from None


class SpanError(ValueError):
    """A span that does not fit the response it claims to come from."""


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """A half-open character range ``[start, end)`` of the response, with a kind label."""

    start: int
    end: int
    kind: str = "dense"


@dataclass(frozen=True, slots=True)
class ExtractInput:
    """What an extractor sees of one sample.  ``key`` is the stable sample id (cache key part)."""

    key: str
    prompt: str
    response: str
    domain: Domain


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
    """Check bounds and emptiness, then sort and merge overlaps; raise ``SpanError`` on misuse."""
    n = len(response)
    out: list[Span] = []
    for s in sorted(spans):
        if not (0 <= s.start < s.end <= n):
            raise SpanError(f"span [{s.start}, {s.end}) ({s.kind}) outside response of length {n}")
        if out and s.start <= out[-1].end:
            last = out[-1]
            if s.end > last.end:
                out[-1] = Span(last.start, s.end, last.kind)
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


_REGISTRY: dict[str, Callable[..., Extractor]] = {}


def register_extractor(name: str) -> Callable[[Callable[..., Extractor]], Callable[..., Extractor]]:
    """Class/factory decorator adding an extractor under ``name``."""

    def deco(factory: Callable[..., Extractor]) -> Callable[..., Extractor]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_extractor(name: str, **options) -> Extractor:
    """Build a registered extractor; importing the built-in modules registers them."""
    _import_builtin_extractors()
    if name not in _REGISTRY:
        raise KeyError(f"unknown extractor {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**options)


def _import_builtin_extractors() -> None:
    """Importing a built-in extractor module registers it; done lazily so that importing
    ``preprocess.spans`` stays cheap (the LLM extractor pulls in ``openai``)."""
    import preprocess.llm_extractor  # noqa: F401
    import preprocess.none_extractor  # noqa: F401
    import preprocess.rules  # noqa: F401
    import tasks.chain  # noqa: F401  (the built-in task's exact spans: chain-truth)
