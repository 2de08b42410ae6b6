"""Rule-based information-dense spans for math text (paper §2.1: "core mathematical operations as
well as key intermediate & final results").

Marked, per kind:

- ``equation``: an arithmetic expression with at least one operator, ``=``, and its result, with
  chains (``2 + 3 = 5 * 2 = 10``), currency and percent (``$12 x 5 = $60``), a unit word after an
  operand (``6 cards - 1 cards = 5``), and across a GSM8K calculator annotation between ``=`` and
  the result (``48/2 = <<48/2=24>>24``: ``48/2 = `` and ``24`` are marked, the annotation only
  with ``calc_annotations=True``);
- ``calc``: the result right after a calculator annotation (``<<48/2=24>>24``) with the unit word
  after it (``24 clips``, not ``24 in``), which also finds results whose left side is words ("half as
  many = <<48/2=24>>24"); with the annotation itself when ``calc_annotations=True``;
- ``final_answer``: the value after ``####``, after "the answer is", after a line-initial ``A:`` or
  ``Answer:``, and the inside of
  ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched);
- ``latex``: the inside of ``$$...$$``, ``\\[...\\]``, ``\\begin{equation|align|...}``
  (display math is a derivation: always marked, row by row, without the ``\\\\`` row breaks and
  trailing ``,``/``.``) and inline ``$...$`` or ``\\(...\\)`` *only when it states something*: a
  relation (``=``, ``<``, ``\\le``, ``\\Rightarrow``, ...).  A bare mention (``$x$``-axis,
  ``$(j,k)$``, ``$\\dots$``, ``$6432$``) is not dense.  Inline dollars follow pandoc's rule (no
  space after the opening ``$``, none before the closing one, no digit right after it) so that GSM8K
  prices (``$12 x 5 = $60``) are not read as formulas.  ``\\boxed{``/``}`` wrappers are glue inside
  any formula.

``[asy]...[/asy]`` drawing code is not math: the ``rules`` extractor skips it like a code fence.

Delimiters and the ``####`` marker are format glue and stay unmarked.  All patterns are
precompiled and linear in the text; the equation pattern only runs when the text has ``=``.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from preprocess.extractors.base import Span


@dataclass(frozen=True)  # no slots: RuleOptions inherits from both option sets
class MathRuleOptions:
    """Which math constructs count as information-dense (all on by default)."""

    equations: bool = True
    """Arithmetic expressions with ``=`` and their results."""
    calc_annotations: bool = False
    """Also mark GSM8K ``<<a*b=c>>`` annotations.  Off by default: an annotation is a machine copy of
    the expression and result written beside it, and marking both copies puts GSM8K at rho 0.47
    instead of 0.26 (paper, GPT-4o: 0.31).  Off, annotations are cut out of equation spans and
    still locate results whose left side is words."""
    final_answer: bool = True
    """``#### N``, "the answer is N", ``\\boxed{...}``."""
    latex: bool = True
    """Display and inline LaTeX formulas."""
    inline_dollar: bool = True
    """Read ``$...$`` as inline LaTeX (pandoc rule); turn off for texts full of prices."""


_NUMBER = r"(?:\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_CUR = r"(?:[$€£][ \t]?)?"
# Repetitions are bounded ({0,4} parentheses, 40 terms, 8 "=") so that a failed match costs a
# bounded amount of backtracking per start position: no quadratic blow-up on long digit runs,
# deep parentheses or long operator chains without a result.
_OPEN, _CLOSE = r"(?:\([ \t]*){0,4}", r"(?:[ \t]*\)){0,4}"
# An operand: a number with optional currency before and % after, or with a one-letter variable
# (2x); parentheses around it.  A lone letter (x) is an operand only after an operator: letting
# every letter of the prose start a match would cost 3x the scan time.
_NUM_OPERAND = rf"{_OPEN}{_CUR}{_NUMBER}(?:%|[a-zA-Z](?![a-zA-Z]))?{_CLOSE}"
_OPERAND = rf"{_OPEN}{_CUR}(?:{_NUMBER}(?:%|[a-zA-Z](?![a-zA-Z]))?|(?<![\w.])[a-zA-Z](?![\w'])){_CLOSE}"
# Optional unit words after an operand: "6 cards", "3 large stickers", "$500/card", "3 km/h".
_UNIT = r"(?:/[A-Za-z]+|(?:[ \t]+[A-Za-z]+){1,2}(?:/[A-Za-z]+)?)?"
# operators, including implicit multiplication before a parenthesis: 2(3 + 4)
_OP = r"(?:[ \t]+[x×·][ \t]+|[ \t]*(?:\*\*|[-+*/×÷^·−])[ \t]*|(?<=[\d)])(?=\())"
_CALC = r"<<[^<>\r\n]*>>"
# words that may follow a result without being its unit ("9 more", "5 in total", "3 per day")
_NOT_UNITS = ("a|an|the|and|or|but|of|to|in|on|at|for|from|by|with|into|is|are|was|were|be|so|that|this|than|"
              "as|each|every|per|more|less|left|total|if|then|which|who|will|would|can|it|he|she|they|we|you|"
              "his|her|their|our|its|times|days?|x")
_EQUATION = re.compile(
    # the lookahead lets the regex engine skip to candidate characters at C speed; the lookbehind
    # stops it from retrying inside a number it has already failed on
    rf"(?=[\d($€£.])(?<![\d.,]){_NUM_OPERAND}{_UNIT}(?:{_OP}{_OPERAND}{_UNIT}){{1,40}}"  # left: an operator
    rf"(?:[ \t]*(?:=|≈|==)[ \t]*(?:[$€£]?{_CALC})?{_OPERAND}(?:{_OP}{_OPERAND}){{0,40}}){{1,8}}"
)
_CALC_RESULT = re.compile(rf"{_CALC}[$€£]?-?{_NUMBER}%?(?:[ \t]+(?!(?:{_NOT_UNITS})\b)[A-Za-z]+\b)?")
_CALC_ONLY = re.compile(_CALC)
_HASH_ANSWER = re.compile(r"####[ \t]*(?P<ans>[^\r\n]*?)[ \t]*(?=[\r\n]|\Z)")
_LINE_ANSWER = re.compile(r"^[ \t]*(?:A|Answer)[ \t]*:[ \t]*(?P<ans>[$€£]?-?" + _NUMBER + r"%?)", re.M)
_SAYS_ANSWER = re.compile(
    r"\b(?:the )?(?:final )?answer is[: \t]*(?P<ans>[$€£]?-?" + _NUMBER + r"%?)", re.I
)
_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_LATEX_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"))
_LATEX_ENV = re.compile(r"\\begin\{(equation|align|alignat|gather|multline|eqnarray|displaymath|math)(\*?)\}")
# a formula that states something: a relation, an implication or an approximation
_RELATION = re.compile(r"[=<>≤≥≠≈]|\\(?:[lg]eq?|neq?|approx|equiv|sim|cong|[lL]ongrightarrow|[rR]ightarrow|"
                       r"[iI]mplies|to|propto|lt|gt|in|subset(?:eq)?)(?![A-Za-z])")
# pandoc's tex_math_dollars: no space after the opening $, none before the closing $, no digit
# after it; the content stays on one line and holds no $.
_INLINE_DOLLAR = re.compile(r"\$(?<![\\$]\$)(?![\s$])(?P<in>[^$\r\n]*?[^\s\\$])\$(?![\d$<])")


def math_spans(text: str, opts: MathRuleOptions, base: int = 0) -> list[Span]:
    """Spans (shifted by ``base``) of one stretch of math prose."""
    return [Span(a, b, k) for a, b, k in math_span_tuples(text, opts, base)]


RawSpan = tuple[int, int, str]


def math_span_tuples(text: str, opts: MathRuleOptions, base: int = 0) -> list[RawSpan]:
    """:func:`math_spans` as ``(start, end, kind)`` tuples, unsorted: the rules extractor sorts and
    merges all spans of a response at once, and plain tuples sort in C (``Span`` compares in Python)."""
    out: list[RawSpan] = []
    add = out.append
    has_calc = "<<" in text
    calcs = [m.span() for m in _CALC_RESULT.finditer(text)] if has_calc else []
    calc_starts = [a for a, _ in calcs]
    equations: list[tuple[int, int]] = []
    # every annotation (with or without a result after it), once per text: equations are cut
    # around them by bisection instead of a regex scan per equation
    cuts = [m.span() for m in _CALC_ONLY.finditer(text)] if has_calc and not opts.calc_annotations else []
    cut_starts = [a for a, _ in cuts]
    if opts.equations and "=" in text:
        latex_dollars = opts.latex and opts.inline_dollar and not has_calc
        for m in _EQUATION.finditer(text):
            s, e = m.span()
            if latex_dollars and text[s] == "$" and _INLINE_DOLLAR.match(text, s):
                s += 1  # "$50-6=44$": the opening delimiter of a formula, not a price
            k = bisect_right(calc_starts, s) - 1  # annotations are disjoint: only one can hold s
            if k >= 0 and e <= calcs[k][1]:
                continue  # the arithmetic inside an annotation: handled with the annotation below
            equations.append((s, e))
            if not opts.calc_annotations and has_calc:
                _add_without_calc(out, cuts, cut_starts, s, e, base, "equation")
            else:
                add((base + s, base + e, "equation"))
    eq_starts = [s for s, _ in equations]
    for a, b in calcs:
        close = text.index(">>", a) + 2
        if opts.calc_annotations:
            add((base + a, base + b, "calc"))
            continue
        if not opts.equations:
            continue
        add((base + close, base + b, "calc"))  # the result written after the annotation
        k = bisect_left(eq_starts, a) - 1  # the last equation starting before the annotation
        if k < 0 or equations[k][1] < close:
            # no written-out equation leads to it ("twice as many = <<2*5=10>>10"): the operation
            # appears only inside the annotation, so mark it there
            if close - 2 > a + 2:
                add((base + a + 2, base + close - 2, "calc"))
    if opts.final_answer:
        if "####" in text:
            for m in _HASH_ANSWER.finditer(text):
                if m.end("ans") > m.start("ans") and _at_line_start(text, m.start()):
                    add((base + m.start("ans"), base + m.end("ans"), "final_answer"))
        if "A:" in text or "nswer:" in text:
            for m in _LINE_ANSWER.finditer(text):
                add((base + m.start("ans"), base + m.end("ans"), "final_answer"))
        if "nswer" in text or "NSWER" in text:
            for m in _SAYS_ANSWER.finditer(text):
                add((base + m.start("ans"), base + m.end("ans"), "final_answer"))
        if "\\boxed" in text or "\\fbox" in text:
            closing = _brace_pairs(text)
            for m in _BOXED.finditer(text):
                close = closing.get(m.end() - 1)
                if close is not None and close > m.end():
                    add((base + m.end(), base + close, "final_answer"))
    if opts.latex:
        formulas: list[tuple[int, int]] = []
        if "\\" in text or "$$" in text:
            _latex_blocks(text, formulas)
        if opts.inline_dollar and not has_calc and "$" in text:
            # GSM8K-style texts (calculator annotations) use $ for prices only
            for m in _INLINE_DOLLAR.finditer(text):
                if _RELATION.search(text, m.start("in"), m.end("in")):
                    formulas.append(m.span("in"))
        for a, b in formulas:
            for s, e in _formula_pieces(text, a, b):
                add((base + s, base + e, "latex"))
    return out


def _latex_blocks(text: str, out: list[tuple[int, int]]) -> None:
    """Insides of ``$$..$$``, ``\\[..\\]``, ``\\(..\\)`` and display environments.

    ``str.find`` instead of a lazy ``.+?`` regex: an opener with no closer ends the search for its
    kind (no later opener can close either), so unbalanced text costs linear time, not quadratic.
    """
    for opener, closer in _LATEX_DELIMS:
        pos = text.find(opener)
        while pos >= 0:
            start = pos + len(opener)
            end = text.find(closer, start)
            if end < 0:
                break
            if end > start and (opener != "\\(" or _RELATION.search(text, start, end)):
                out.append((start, end))  # \(...\) is inline math: marked when it states something
            pos = text.find(opener, end + len(closer))
    if "\\begin{" in text:
        unclosed: set[str] = set()  # same argument as above, per environment name
        for m in _LATEX_ENV.finditer(text):
            closer = f"\\end{{{m.group(1)}{m.group(2)}}}"
            if closer in unclosed:
                continue
            end = text.find(closer, m.end())
            if end < 0:
                unclosed.add(closer)
            elif end > m.end():
                out.append((m.end(), end))


_GLUE = re.compile(r"\\\\(?:\[[^\]\n]*\])?|\\(?:boxed|fbox)[ \t]*\{|\\[qd]?quad\b|\\text\{[ ,.;a-z]*\}")
_EDGE = " \t\r\n,.;:"


def _formula_pieces(text: str, a: int, b: int) -> list[tuple[int, int]]:
    """``[a, b)`` without format glue: row breaks ``\\\\``, ``\\boxed{`` and its ``}``, spacing
    commands and connective ``\\text{ and }``, then trimmed of spaces and trailing punctuation."""
    cuts: list[tuple[int, int]] = []
    closing = None
    for m in _GLUE.finditer(text, a, b):
        cuts.append(m.span())
        if m.group().endswith("{"):
            closing = closing if closing is not None else _brace_pairs(text)
            c = closing.get(m.end() - 1)
            if c is not None and c < b:
                cuts.append((c, c + 1))
    out: list[tuple[int, int]] = []
    pos = a
    for s, e in sorted(cuts) + [(b, b)]:
        lo, hi = pos, s
        while lo < hi and text[lo] in _EDGE:
            lo += 1
        while hi > lo and text[hi - 1] in _EDGE:
            hi -= 1
        if hi > lo:
            out.append((lo, hi))
        pos = max(pos, e)
    return out


def _at_line_start(text: str, i: int) -> bool:
    """Only spaces/tabs between the previous line break (or the start) and ``i``."""
    j = i - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return j < 0 or text[j] in "\r\n"


def _add_without_calc(out: list[RawSpan], cuts: list[tuple[int, int]], cut_starts: list[int], s: int, e: int,
                      base: int, kind: str) -> None:
    """Add ``[s, e)`` minus the ``<<...>>`` annotations inside it (``calc_annotations=False``).

    ``cuts`` are all annotations of the text in order; those lying wholly inside ``[s, e)`` are
    exactly what a regex scan of the window would find (an annotation holds no ``<`` or ``>``, so a
    window cannot start inside one and match differently).
    """
    pos = s
    for k in range(bisect_left(cut_starts, s), len(cuts)):
        a, b = cuts[k]
        if b > e:
            break
        if a > pos:
            out.append((base + pos, base + a, kind))
        pos = b
    if e > pos:
        out.append((base + pos, base + e, kind))


def _brace_pairs(text: str) -> dict[int, int]:
    """``{open index: matching close index}`` for all unescaped braces, in one linear pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs
