"""The ``rules`` extractor: zero-cost information-dense spans from AST and regex rules.

The paper annotates with GPT-4o and names AST-based hard rules as future work (§2.1); this is
that default, so the built-in demo and CI run with no API.  Which constructs are marked is
documented in :mod:`preprocess.extractors.rules.code` and :mod:`preprocess.extractors.rules.math`.

Dispatch by ``item.domain``:

- every fenced block (```` ``` ```` or ``~~~``, with or without a language tag) gets the code rules:
  Python's ``ast`` for untagged and Python-tagged fences, the line regex for other languages and
  for untagged fences that do not parse (console sessions, shell, pseudo-code);
- ``Domain.CODE`` with no fence at all: the whole response is bare code; the prose around fences
  is explanation and stays unmarked unless ``code_prose_math=True``;
- ``Domain.MATH`` and ``Domain.OTHER``: the math rules on everything outside fences and outside
  ``[asy]...[/asy]`` drawing blocks (OTHER has no rules of its own: a mixed answer is prose with
  formulas plus fenced code).

``status`` is ``"ok"``, ``"unparsable_code"`` (a Python-tagged fence or bare code did not parse; its
spans come from the longest parseable prefix plus the line regex), ``"non_python_code"`` (a fence
tagged with another language, or an untagged fence that is not Python: regex only) or
``"empty_response"``.  ``rules-code`` / ``rules-math`` apply one rule
set to every sample whatever its domain.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from preprocess.extractors.base import ExtractInput, ExtractResult, RawSpan, Span, SpanError
from preprocess.extractors.rules.code import CodeRuleOptions, code_span_tuples
from preprocess.extractors.rules.math import MathRuleOptions, math_span_tuples
from preprocess.shards import Domain

RULES_VERSION = "2.1.0"  # 2.1: spans carry KIND_PRIORITY scores (same spans as 2.0.0)

KIND_PRIORITY: dict[str, float] = {
    # code (paper: control-flow conditions, algorithm pivots, key returns)
    "condition": 3.0,  # if/while/assert tests: the control flow
    "return": 3.0,  # computed results
    "loop": 2.0,  # loops that are more than a walk over the input: algorithm pivots
    "compare": 2.0,  # comparisons outside a condition
    "update": 1.0,  # state changes and intermediate assignments
    # math (paper: core operations, key intermediate and final results)
    "final_answer": 3.0,  # "#### 18", \boxed{...}: what the response exists for
    "calc": 2.0,  # the result of a calculator step
    "equation": 2.0,  # an operation and its result
    "latex": 1.0,  # formulas: a derivation's rows, inline relations
}
"""``Span.score`` of each rule kind: under a rho budget (``--max-rho``) higher ones are kept first, equal
ones in order of position.  A merged span takes the highest score of what it merged."""

PYTHON_LANGS = frozenset({"", "python", "py", "python3", "py3", "python2", "py2", "ipython", "sage"})

# A fence opens at the start of a line (up to 3 spaces of indentation, as in CommonMark) with 3+
# backticks or tildes and an optional info string; it closes at a line holding only at least as
# many of the same character.  An unclosed fence runs to the end of the response (truncated answers).
_FENCE_OPEN = re.compile(
    r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\r\n]*?)[ \t]*(?:\r\n|\r|\n|$)", re.M
)


@dataclass(frozen=True, kw_only=True)
class RuleOptions(MathRuleOptions, CodeRuleOptions):
    """Extractor options, ``get_extractor("rules", **options)``; non-defaults change ``version``.

    One definition per option: the code options (``conditions``, ``loops``, ``returns``,
    ``comparisons``, ``assignments``, ``return_definitions``) come from
    :class:`~preprocess.extractors.rules.code.CodeRuleOptions` and the math ones (``equations``,
    ``calc_annotations``, ``final_answer``, ``latex``, ``inline_dollar``) from
    :class:`~preprocess.extractors.rules.math.MathRuleOptions`, in that order (the order of ``tag()``
    and hence
    of the ``version`` string); only the dispatch option below is the extractor's own.  An instance
    *is* both option sets, so it is passed to the code and math rules as it is.
    """

    code_prose_math: bool = False
    """Code samples: also run the math rules on the prose around fences."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"rules option {f.name!r} must be a bool, got {getattr(self, f.name)!r}")

    def code(self) -> CodeRuleOptions:
        return CodeRuleOptions(**{f.name: getattr(self, f.name) for f in fields(CodeRuleOptions)})

    def math(self) -> MathRuleOptions:
        return MathRuleOptions(**{f.name: getattr(self, f.name) for f in fields(MathRuleOptions)})

    def tag(self) -> str:
        """Non-default options as ``name=0|1`` joined by ``,`` (empty for the defaults)."""
        default = RuleOptions()
        return ",".join(f"{f.name}={int(getattr(self, f.name))}" for f in fields(self)
                        if getattr(self, f.name) != getattr(default, f.name))


@dataclass(frozen=True, slots=True)
class Block:
    """A fenced code block: content ``[start, end)`` of the response and its language tag."""

    start: int
    end: int
    lang: str


@functools.lru_cache(maxsize=32)
def _fence_close(char: str, length: int) -> re.Pattern[str]:
    return re.compile(rf"^ {{0,3}}{re.escape(char)}{{{length},}}[ \t]*(?=\r\n|\r|\n|$)", re.M)


def find_fences(text: str) -> list[Block]:
    """Fenced code blocks of a markdown text, in order (content only, without the fence lines)."""
    blocks: list[Block] = []
    pos = 0
    while True:
        m = _FENCE_OPEN.search(text, pos)
        if m is None:
            return blocks
        fence = m.group("fence")
        lang = m.group("info").split(maxsplit=1)[0].lower() if m.group("info") else ""
        c = _fence_close(fence[0], len(fence)).search(text, m.end())
        end = c.start() if c else len(text)
        blocks.append(Block(m.end(), end, lang.lstrip("{.").rstrip("}")))
        if c is None:
            return blocks
        pos = c.end()


_ASY = re.compile(r"\[asy\](?P<body>.*?)(?:\[/asy\]|\Z)", re.S)


def find_asy(text: str) -> list[Block]:
    """Asymptote drawing blocks ``[asy]...[/asy]`` of competition math (MATH, AoPS): drawing code, not
    math, so the math rules skip them (labels such as ``label("$x$", ...)`` included); an unclosed
    block runs to the end of the text."""
    return [Block(m.start("body"), m.end("body"), "asy") for m in _ASY.finditer(text)]


def _finish(raw: list[RawSpan], text: str) -> list[Span]:
    """Trim, sort, check and merge the raw ``(start, end, kind)`` spans of one response.

    Same result as ``validate_spans`` of the trimmed spans scored by ``KIND_PRIORITY``, but on plain
    tuples, which sort and compare in C; ``Span`` tuples are made only for the merged result, with
    ``tuple.__new__`` (the hot path: every extracted sample comes through here).

    Trimming drops whitespace at span edges: with byte-level BPE a leading space belongs to the next
    token (`` <<``), so a span ending in a space would mark the following glue token as dense.
    """
    spans: list[RawSpan] = []
    for sp in raw:
        a, b, kind = sp
        if b <= a:
            continue
        if text[a].isspace() or text[b - 1].isspace():
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                spans.append((a, b, kind))
        else:
            spans.append(sp)
    if not spans:
        return []
    spans.sort()
    # merge overlapping and touching spans: the first one's kind, the highest score
    prio_of = KIND_PRIORITY
    new, span = tuple.__new__, Span
    out: list[Span] = []
    it = iter(spans)
    la, lb, lk = next(it)
    lp = prio_of[lk]
    for a, b, kind in it:
        p = prio_of[kind]
        if a <= lb:
            if b > lb:
                lb = b
            if p > lp:
                lp = p
            continue
        out.append(new(span, (la, lb, lk, lp)))
        la, lb, lk, lp = a, b, kind, p
    out.append(new(span, (la, lb, lk, lp)))
    # sorted by start and merged, the first span starts first and the last one ends last
    n = len(text)
    if spans[0][0] < 0 or lb > n:
        a, b, kind = next(sp for sp in spans if not 0 <= sp[0] < sp[1] <= n)
        raise SpanError(f"span [{a}, {b}) ({kind}) outside response of length {n}")
    return out


_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def _as_bool(name: str, value: object) -> object:
    """CLI/YAML spellings of a bool (``--extractor-option loops=0``, ``"false"``) become bools;
    anything else is passed on for ``RuleOptions`` to reject with the option's name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return value


class RuleExtractor:
    """Code and math rules dispatched by domain (see the module docstring)."""

    name = "rules"
    force_domain: Domain | None = None

    def __init__(self, **options: bool | int | str) -> None:
        known = {f.name for f in fields(RuleOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown {self.name} option(s) {unknown}; known: {sorted(known)}")
        self.options = RuleOptions(**{k: _as_bool(k, v) for k, v in options.items()})
        # the options object is both option sets (see RuleOptions): no per-call conversion
        self._code = self._math = self.options
        tag = self.options.tag()
        self.version = RULES_VERSION + (f"+{tag}" if tag else "")

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        return [self.extract(item) for item in items]

    def extract(self, item: ExtractInput) -> ExtractResult:
        """Spans of one sample; raises ``TypeError`` naming the sample for a non-str response."""
        text = item.response
        if not isinstance(text, str):
            raise TypeError(f"sample {item.key!r}: response must be str, got {type(text).__name__}")
        if not text or text.isspace():
            return ExtractResult(status="empty_response")
        domain = self.force_domain
        if domain is None:
            try:
                domain = Domain.parse(item.domain)
            except ValueError as e:
                raise ValueError(f"sample {item.key!r}: {e}") from None
        spans: list[RawSpan] = []
        unparsable = other_lang = False
        blocks = find_fences(text) if ("```" in text or "~~~" in text) else []
        if domain == Domain.CODE and not blocks:
            blocks = [Block(0, len(text), "python")]  # bare code: meant as Python, failures count
        for b in blocks:
            python = b.lang in PYTHON_LANGS
            got, ok = code_span_tuples(text[b.start:b.end], self._code, b.start, python=python)
            spans += got
            if not ok:
                # an untagged fence that is not Python is most likely console output or another
                # language (">>> f(1)", shell): not a Python parse failure
                if b.lang == "":
                    other_lang = True
                else:
                    unparsable |= python
                    other_lang |= not python
        if domain != Domain.CODE or self.options.code_prose_math:
            pos = 0
            skip = sorted(blocks + find_asy(text), key=lambda b: b.start) if "[asy]" in text else blocks
            for b in skip:
                if b.start < pos:
                    continue  # an [asy] inside a fence, or the reverse: already skipped
                # prose before this block (its opening fence line is glue, harmless to scan)
                spans += math_span_tuples(text[pos:b.start], self._math, pos)
                pos = b.end
            spans += math_span_tuples(text[pos:], self._math, pos)
        status = "unparsable_code" if unparsable else "non_python_code" if other_lang else "ok"
        return ExtractResult(spans=_finish(spans, text), status=status)


class RuleCodeExtractor(RuleExtractor):
    """Code rules on every sample (a response with no fence is bare code)."""

    name = "rules-code"
    force_domain = Domain.CODE


class RuleMathExtractor(RuleExtractor):
    """Math rules on every sample outside fences, code rules inside them."""

    name = "rules-math"
    force_domain = Domain.MATH
