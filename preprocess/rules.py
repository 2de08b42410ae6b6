"""The ``rules`` extractor: zero-cost information-dense spans from AST and regex rules.

The paper annotates with GPT-4o and names AST-based hard rules as future work (§2.1); this is
that default, so the built-in demo and CI run with no API.  Which constructs are marked is
documented in :mod:`preprocess.rules_code` and :mod:`preprocess.rules_math`.

Dispatch by ``item.domain``:

- every fenced block (```` ``` ```` or ``~~~``, with or without a language tag) gets the code rules:
  Python's ``ast`` for untagged and Python-tagged fences, the line regex for other languages and
  for untagged fences that do not parse (console sessions, shell, pseudo-code);
- ``Domain.CODE`` with no fence at all: the whole response is bare code; the prose around fences
  is explanation and stays unmarked unless ``code_prose_math=True``;
- ``Domain.MATH`` and ``Domain.OTHER``: the math rules on everything outside fences (OTHER has no
  rules of its own: a mixed answer is prose with formulas plus fenced code).

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

from preprocess.rules_code import CodeRuleOptions, code_spans
from preprocess.rules_math import MathRuleOptions, math_spans
from preprocess.spans import Domain, ExtractInput, ExtractResult, Span, register_extractor, validate_spans

RULES_VERSION = "1.0.0"

PYTHON_LANGS = frozenset({"", "python", "py", "python3", "py3", "python2", "py2", "ipython", "sage"})

# A fence opens at the start of a line (up to 3 spaces of indentation, as in CommonMark) with 3+
# backticks or tildes and an optional info string; it closes at a line holding only at least as
# many of the same character.  An unclosed fence runs to the end of the response (truncated answers).
_FENCE_OPEN = re.compile(
    r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\r\n]*?)[ \t]*(?:\r\n|\r|\n|$)", re.M
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleOptions:
    """Extractor options, ``get_extractor("rules", **options)``; non-defaults change ``version``."""

    conditions: bool = True
    """Code: if/elif/while/assert tests, ternary tests, comprehension filters."""
    loops: bool = True
    """Code: ``for`` target + iterable."""
    returns: bool = True
    """Code: return / yield values."""
    comparisons: bool = True
    """Code: every comparison."""
    assignments: bool = True
    """Code: augmented assignments, assignments in loops, recurrences."""
    return_definitions: bool = False
    """Code: also the assignment computing a value returned bare (``res = f(x); return res``)."""
    equations: bool = True
    """Math: arithmetic with ``=`` and results."""
    calc_annotations: bool = False
    """Math: also mark GSM8K ``<<...>>`` calculator annotations (copies of the equation beside them)."""
    final_answer: bool = True
    """Math: ``#### N``, "the answer is N", ``\\boxed{}``."""
    latex: bool = True
    """Math: LaTeX formulas."""
    inline_dollar: bool = True
    """Math: ``$...$`` as inline LaTeX (pandoc rule)."""
    code_prose_math: bool = False
    """Code samples: also run the math rules on the prose around fences."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"rules option {f.name!r} must be a bool, got {getattr(self, f.name)!r}")

    def code(self) -> CodeRuleOptions:
        return CodeRuleOptions(self.conditions, self.loops, self.returns, self.comparisons, self.assignments,
                               self.return_definitions)

    def math(self) -> MathRuleOptions:
        return MathRuleOptions(self.equations, self.calc_annotations, self.final_answer, self.latex,
                               self.inline_dollar)

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


def _trim(spans: list[Span], text: str) -> list[Span]:
    """Drop whitespace at span edges: with byte-level BPE a leading space belongs to the next token
    (`` <<``), so a span ending in a space would mark the following glue token as dense."""
    out: list[Span] = []
    for sp in spans:
        a, b = sp.start, sp.end
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append(sp if (a, b) == (sp.start, sp.end) else Span(a, b, sp.kind))
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


@register_extractor("rules")
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
        self._code = self.options.code()
        self._math = self.options.math()
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
        spans: list[Span] = []
        unparsable = other_lang = False
        blocks = find_fences(text) if ("```" in text or "~~~" in text) else []
        if domain == Domain.CODE and not blocks:
            blocks = [Block(0, len(text), "python")]  # bare code: meant as Python, failures count
        for b in blocks:
            python = b.lang in PYTHON_LANGS
            got, ok = code_spans(text[b.start:b.end], self._code, b.start, python=python)
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
            for b in blocks:
                # prose before this block (its opening fence line is glue, harmless to scan)
                spans += math_spans(text[pos:b.start], self._math, pos)
                pos = b.end
            spans += math_spans(text[pos:], self._math, pos)
        status = "unparsable_code" if unparsable else "non_python_code" if other_lang else "ok"
        return ExtractResult(spans=validate_spans(_trim(spans, text), text), status=status)


@register_extractor("rules-code")
class RuleCodeExtractor(RuleExtractor):
    """Code rules on every sample (a response with no fence is bare code)."""

    name = "rules-code"
    force_domain = Domain.CODE


@register_extractor("rules-math")
class RuleMathExtractor(RuleExtractor):
    """Math rules on every sample outside fences, code rules inside them."""

    name = "rules-math"
    force_domain = Domain.MATH
