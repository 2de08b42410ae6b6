"""Rule-based information-dense spans for code (paper §2.1 "future work": AST hard rules).

The paper's code hubs are *control-flow conditions* (the judgment of ``if``/``while``) and
*algorithm pivot points*.  Rules 2.0 follow structure, not syntax (calibrated on the hand-labelled
set in ``benchmarks/data/extraction_agreement``): a statement that decides or changes the
algorithm's state is dense, bookkeeping is not.  With Python's ``ast`` we mark, per node kind:

- ``condition``: ``if``/``elif``/``while`` with their test, from the keyword (``if (a > b)``,
  closing parentheses included), the test of ``assert``, of a conditional expression
  (``a if TEST else b``), the ``if`` filters of comprehensions and ``case ... if GUARD``;
- ``loop``: ``for`` headers from the keyword to the end of the iterable (``for i in range(1, n+1)``;
  comprehension clauses from the target) *unless the loop just walks its input* (``for x in xs``,
  ``range(n)``, ``range(len(xs))``, ``enumerate(xs)``: structure, not a decision);
- ``return``: a computed value of ``return``/``yield`` (``return n ^ res``); bare and constant
  returns (``return res``, ``return True``) only name a result decided elsewhere;
- ``compare``: every comparison elsewhere (``x == y`` in an argument or an assignment);
- ``update``: recurrences (a target also read on the right: ``a, b = b, a + b``), augmented
  assignments except index steps (``i += 1`` when ``i`` is not what the function returns),
  arithmetic assignments (``mean = sum(xs) / len(xs)``), state-changing expression statements
  (``temp.append(grid[i-1][j])``, ``heapq.heappush(q, x)``, ``lines.sort()``; not prints), inside
  loops container/attribute writes, calls and new values of result names (``m = e``), and with
  ``return_definitions`` (on) the computation of a value returned bare (``res = ...; return res``).
  Set-up (``R = 3``, ``temp = []``) and temporaries (``temp = arr[i]``) are glue.  Of a
  comprehension only the element and the clauses are marked, not ``return sum(`` around them.

Signatures, imports, docstrings and f-string contents are never marked.

``ast`` column offsets are UTF-8 *byte* offsets within a line; :class:`LineIndex` converts them
to Python ``str`` indices (the span contract of :mod:`preprocess.extractors.base`).  Code that does not
parse is handled by the longest parseable prefix plus a language-agnostic line regex for the rest
(``if (...)``, ``while ...:``, ``return ...;``, ``x += ...``), reported as ``unparsable_code``.

Over 400 lines: the AST walk, the predicates that tell bookkeeping from state changes and the regex
fallback share the private helpers here; the module is kept whole while ``preprocess/`` is being
reorganised into stage folders.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass

from preprocess.extractors.base import RawSpan, Span

# Python's tokenizer ends a line at \r\n, \r or \n (and nothing else: not \f, \v or U+2028 that
# str.splitlines also splits on), so line numbers from ``ast`` count exactly these.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)  # no slots: RuleOptions inherits from both option sets
class CodeRuleOptions:
    """Which code constructs count as information-dense (all on by default)."""

    conditions: bool = True
    """if/elif/while/assert tests, ternary tests, comprehension filters, match guards."""
    loops: bool = True
    """``for`` headers that are more than a walk over the input (also in comprehensions)."""
    returns: bool = True
    """Computed values of return / yield."""
    comparisons: bool = True
    """Every comparison expression, wherever it appears."""
    assignments: bool = True
    """State changes: recurrences, updates, arithmetic assignments, operative calls (see the module)."""
    return_definitions: bool = True
    """Non-trivial assignments to a name the function returns bare (``res = ...; return res``): with
    bare returns unmarked, this is where the result is computed."""


class LineIndex:
    """Maps ``(lineno, utf-8 byte column)`` from ``ast`` to a ``str`` index into the source.

    Most lines are ASCII, where byte and character columns agree; only non-ASCII lines pay for an
    encode/decode, once per line.  An all-ASCII source (most code) keeps only the line starts.
    """

    __slots__ = ("_starts", "_lines", "_encoded", "_first_line")

    def __init__(self, source: str, first_line: int = 1) -> None:
        ends = [m.end() for m in _LINE_END.finditer(source)]
        # ast line number of source line 0 (2 when an ``if 1:`` wrapper line was prepended), folded
        # into the starts list: _starts[lineno] is where ast line ``lineno`` starts
        self._starts = [0] * (first_line + 1) + ends
        self._first_line = first_line
        self._encoded: dict[int, bytes] = {}
        if source.isascii():
            self._lines: list[str] | None = None
            return
        bounds = zip([0, *ends], [m.start() for m in _LINE_END.finditer(source)] + [len(source)])
        self._lines = [source[a:b] for a, b in bounds]

    def offset(self, lineno: int, byte_col: int) -> int:
        if self._lines is None:
            return self._starts[lineno] + byte_col
        i = lineno - self._first_line
        line = self._lines[i]
        if line.isascii():
            return self._starts[lineno] + byte_col
        enc = self._encoded.get(i)
        if enc is None:
            enc = self._encoded[i] = line.encode("utf-8")
        # a column never splits a character (lone surrogates cannot get here: ast.parse rejects them)
        return self._starts[lineno] + len(enc[:byte_col].decode("utf-8", errors="ignore"))

    def span(self, node: ast.AST, kind: str) -> RawSpan | None:
        end_lineno = getattr(node, "end_lineno", None)
        if end_lineno is None:
            return None
        if self._lines is None:  # ASCII: byte columns are str columns
            starts = self._starts
            start = starts[node.lineno] + node.col_offset  # type: ignore[attr-defined]
            end = starts[end_lineno] + node.end_col_offset  # type: ignore[attr-defined]
        else:
            start = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
            end = self.offset(end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return (start, end, kind) if end > start else None


def _dotted(node: ast.AST) -> str | None:
    """``x`` -> "x", ``self.total`` -> "self.total", anything else -> None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _names(node: ast.AST) -> set[str]:
    """Every name and dotted attribute read in an expression (``ast.walk`` without the generator
    machinery, skipping node types that hold no names: it runs for every assignment and return)."""
    out: set[str] = set()
    stack = [node]
    skip = _NAMELESS_TYPES
    while stack:
        n = stack.pop()
        t = type(n)
        if t is ast.Name:
            out.add(n.id)  # type: ignore[attr-defined]
            continue
        if t is ast.Attribute:
            d = _dotted(n)
            if d is not None:
                out.add(d)
        _extend_children(stack, n, skip)
    return out


def _target_base_names(target: ast.AST) -> set[str]:
    """What an assignment target writes: ``dp[i][j]`` -> {dp}, ``self.n`` -> {self.n}, tuples -> union."""
    if isinstance(target, (ast.Tuple, ast.List)):
        out: set[str] = set()
        for elt in target.elts:
            out |= _target_base_names(elt)
        return out
    if isinstance(target, ast.Starred):
        return _target_base_names(target.value)
    while isinstance(target, ast.Subscript):
        target = target.value
    d = _dotted(target)
    return set() if d is None else {d}


def drop_nested(spans: list[RawSpan]) -> list[RawSpan]:
    """Sorted spans without those inside another one, so a merged span keeps the outer kind
    (``if a > 0 and b`` stays a condition, not the comparison it starts with); on equal ranges
    ``compare`` gives way to the more specific kind (condition, return)."""
    out: list[RawSpan] = []
    for sp in sorted(spans, key=lambda x: (x[0], -x[1], x[2] == "compare")):
        if out and sp[1] <= out[-1][1] and sp[0] >= out[-1][0]:
            continue
        out.append(sp)
    return out


def _result_names(func: ast.FunctionDef | ast.AsyncFunctionDef,
                  has_yield: bool) -> tuple[frozenset[str], frozenset[str]]:
    """``(returned bare, read by any return/yield)`` of ``func`` itself, not of functions nested in it.

    ``return result`` and ``return (s, e)`` put their names in both; ``return 1 << count`` puts
    ``count`` in the second only.  ``has_yield=False`` (the source has no ``yield``, so the tree has
    no ``Yield`` expression) walks statements only: a ``return`` is always a statement.
    """
    bare: set[str] = set()
    read: set[str] = set()
    stack: list[ast.AST] = list(func.body)
    while stack:
        node = stack.pop()
        t = type(node)
        if t in _SCOPE_TYPES:
            continue
        if (t is ast.Return or t is ast.Yield or t is ast.YieldFrom) and node.value is not None:
            parts = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            bare.update(p.id for p in parts if isinstance(p, ast.Name))
            read |= _names(node.value)
        if has_yield:
            stack.extend(_children(node))  # leaves (names, operators) hold no return
        else:
            for name in _STMT_BODIES.get(t, ()):
                stack.extend(getattr(node, name))
    return frozenset(bare), frozenset(read)


def _trivial(value: ast.AST) -> bool:
    """Initialisations that carry no algorithm: constants, names, empty containers, ``[0] * n``."""
    if isinstance(value, (ast.Constant, ast.Name)):
        return True
    if isinstance(value, (ast.List, ast.Tuple, ast.Set)):
        return not value.elts or all(isinstance(e, ast.Constant) for e in value.elts)
    if isinstance(value, ast.Dict):
        return not value.keys
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
        return not value.args and not value.keywords  # list(), dict(), set()
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult):
        return _trivial(value.left) and isinstance(value.left, (ast.List, ast.Tuple))  # [0] * n
    if isinstance(value, ast.ListComp):  # [[0 for _ in range(n)] for _ in range(m)]
        return not isinstance(value.elt, ast.Name) and _trivial(value.elt)
    return False


def _bare(value: ast.AST | None) -> bool:
    """A value that only names a result (``x``, ``self.head``, ``True``, ``(a, b)``): no computation."""
    if value is None or isinstance(value, (ast.Constant, ast.Name)):
        return True
    if isinstance(value, ast.Attribute):
        return _dotted(value) is not None
    if isinstance(value, ast.Tuple):
        return all(_bare(e) for e in value.elts)
    return False


_PLAIN_RANGES = frozenset({"range", "enumerate", "reversed", "sorted"})


def _plain_iteration(it: ast.AST) -> bool:
    """A loop that just walks its input (``xs``, ``self.items``, ``range(n)``, ``range(len(xs))``,
    ``range(0, n)``, ``enumerate(xs)``): the header is structure, not a decision.  Bounds that say
    something (``range(1, n + 1)``, ``range(5, isqrt(n) + 1, 6)``, ``zip(a, b)``) are kept."""
    if _bare(it) or isinstance(it, ast.Subscript) and _bare(it.value) and _bare(it.slice):
        return True
    if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in _PLAIN_RANGES):
        return False
    args = list(it.args)
    if it.keywords or not args or len(args) > 2:
        return False
    if len(args) == 2:
        if it.func.id != "range" or not (isinstance(args[0], ast.Constant) and args[0].value == 0):
            return False
        args = args[1:]
    a = args[0]
    if isinstance(a, ast.Call) and isinstance(a.func, ast.Name) and a.func.id == "len" and len(a.args) == 1:
        a = a.args[0]
    return _bare(a)


def _step(node: ast.AugAssign | ast.Assign) -> str | None:
    """The name of an index step ``i += 1`` / ``i -= 1`` / ``i = i + 1``, else None."""
    if isinstance(node, ast.AugAssign):
        tgt, op, val = node.target, node.op, node.value
    elif len(node.targets) == 1 and isinstance(node.value, ast.BinOp) \
            and isinstance(node.value.left, ast.Name):
        tgt, op, val = node.targets[0], node.value.op, node.value.right
        if not isinstance(tgt, ast.Name) or node.value.left.id != tgt.id:
            return None
    else:
        return None
    if isinstance(tgt, ast.Name) and isinstance(op, (ast.Add, ast.Sub)) and isinstance(val, ast.Constant) \
            and val.value == 1:
        return tgt.id
    return None


def _computes(value: ast.AST) -> bool:
    """Arithmetic in the value (``sum(xs) / len(xs)``, ``-m``, ``int(n ** 0.5)``), not ``[0] * n``."""
    stack = [value]  # ast.walk without the generator; operators and constants hold no BinOp
    skip = _NAMELESS_TYPES
    while stack:
        n = stack.pop()
        _extend_children(stack, n, skip)
        if isinstance(n, ast.BinOp) and not _trivial(n) and not (
                isinstance(n.op, ast.Mod) and isinstance(n.left, (ast.Constant, ast.JoinedStr))):
            return True
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) \
                and not isinstance(n.operand, ast.Constant):
            return True
    return False


_SIDE_EFFECT_FREE = frozenset({"print", "pprint", "display", "breakpoint", "input"})


def _operative_call(value: ast.AST) -> bool:
    """An expression statement that changes state (``temp.append(x)``, ``heapq.heappush(q, x)``,
    ``lines.sort()``, ``push(i, j + 1)``); prints, logging and docstrings are not."""
    if not isinstance(value, ast.Call):
        return False
    f = value.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    base = _dotted(f.value) if isinstance(f, ast.Attribute) else None
    return name not in _SIDE_EFFECT_FREE and base not in ("logging", "log", "logger", "warnings")


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPE_TYPES = frozenset(_SCOPES)
# Where statements nest (``try`` handlers and ``match`` cases hold bodies of statements too).
_STMT_BODIES: dict[type, tuple[str, ...]] = {
    t: tuple(f for f in ("body", "orelse", "finalbody", "handlers", "cases") if f in t._fields)
    for t in (ast.If, ast.While, ast.For, ast.AsyncFor, ast.With, ast.AsyncWith, ast.Try, ast.ExceptHandler,
              ast.match_case, ast.Match, getattr(ast, "TryStar", None)) if t is not None  # TryStar: 3.11+
}
_LEAVES = (ast.Name, ast.Constant, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
           ast.alias, ast.JoinedStr)  # JoinedStr: f-string insides are formatting, positions unreliable <3.12


def _subclasses(roots: tuple[type, ...]) -> frozenset[type]:
    """Every class of the ``roots`` families (``ast.Load``, ``ast.Add``, ... of ``ast.expr_context``,
    ``ast.operator``): node classes are final, so ``type(x) in`` this set is ``isinstance(x, roots)``
    at the price of one hash."""
    out: set[type] = set()
    todo: list[type] = list(roots)
    while todo:
        t = todo.pop()
        out.add(t)
        todo.extend(t.__subclasses__())
    return frozenset(out)


_LEAF_TYPES = _subclasses(_LEAVES)
# Node types without a name below them (contexts, operators, constants, import aliases).
_NAMELESS_TYPES = frozenset(t for t in _LEAF_TYPES if not issubclass(t, (ast.Name, ast.JoinedStr)))
_AST = ast.AST


# Fields that never hold a node to walk: names and flags (str, int, bool), and contexts and operators
# (leaf nodes); leaving them out of the per-type field lists saves a getattr and a test per field.
_NON_NODE_FIELDS = frozenset({"arg", "asname", "attr", "conversion", "ctx", "id", "is_async", "kind",
                              "kwd_attrs", "level", "module", "n", "name", "names", "op", "ops", "s",
                              "simple", "tag", "type_comment"})
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {}


def _child_fields(t: type) -> tuple[str, ...]:
    """The fields of node type ``t`` that may hold child nodes, in field order (cached per type)."""
    out = _CHILD_FIELDS.get(t)
    if out is None:
        out = _CHILD_FIELDS[t] = tuple(f for f in t._fields if f not in _NON_NODE_FIELDS)
    return out


def _children(node: ast.AST) -> list[ast.AST]:
    """Child nodes to walk, in field order (the order spans are found in, which decides ties)."""
    out: list[ast.AST] = []
    _extend_children(out, node, _LEAF_TYPES)
    return out


def _extend_children(out: list[ast.AST], node: ast.AST, skip: frozenset[type]) -> None:
    """Append the child nodes of ``node`` whose type is not in ``skip`` to ``out``, in field order."""
    t = type(node)
    for name in _CHILD_FIELDS.get(t) or _child_fields(t):
        v = getattr(node, name, None)
        if type(v) is list:
            for x in v:
                if isinstance(x, _AST) and type(x) not in skip:
                    out.append(x)
        elif isinstance(v, _AST) and type(v) not in skip:
            out.append(v)


# Node types that _collect_nodes only walks through (one set lookup instead of its whole elif chain).
_PLAIN_TYPES = _subclasses((ast.AST,)) - {
    ast.Compare, ast.If, ast.While, ast.IfExp, ast.Assert, ast.For, ast.AsyncFor, ast.comprehension,
    ast.Return, ast.Yield, ast.YieldFrom, ast.Expr, ast.AugAssign, ast.Assign, ast.AnnAssign,
    ast.match_case, *_SCOPES}


def _collect_nodes(roots: list[ast.AST], index: LineIndex, o: CodeRuleOptions,
                   has_yield: bool) -> list[RawSpan]:
    """One iterative pass over the tree (no per-node method dispatch: this is the hot loop).

    Each stack entry carries whether it is inside a loop body and the function's result names (see
    :class:`_Scope`); both reset at ``def``/``class``/``lambda`` (a loop around a nested def does not
    make the def's body "in a loop").  Statement spans (``if``/``while``/``for``/``return``) start
    at their keyword, as the paper's extraction prompt marks them (``if x % 2 == 0``).
    """
    spans: list[RawSpan | None] = []
    add = spans.append
    span = index.span
    top = _Scope(frozenset(), frozenset(), known=False)
    stack: list[tuple[ast.AST, bool, _Scope]] = [(r, False, top) for r in roots]
    push, child_fields, leaf, plain = stack.append, _CHILD_FIELDS, _LEAF_TYPES, _PLAIN_TYPES
    while stack:
        node, in_loop, sc = stack.pop()
        t = type(node)
        if t in plain:
            pass  # most nodes (calls, names' parents, operators' parents): just walk the children
        elif t is ast.Compare:
            if o.comparisons:
                add(span(node, "compare"))
        elif t is ast.If or t is ast.While:
            if o.conditions:
                add(_join(span(node, "condition"), span(node.test, "condition")))
            stack.append((node.test, in_loop, sc))
            stack.extend((c, in_loop or t is ast.While, sc) for c in node.body)
            stack.extend((c, in_loop, sc) for c in node.orelse)
            continue
        elif t is ast.IfExp or t is ast.Assert:
            if o.conditions:
                add(span(node.test, "condition"))
        elif t is ast.For or t is ast.AsyncFor:
            if o.loops and not _plain_iteration(node.iter):
                add(_join(span(node, "loop"), span(node.iter, "loop")))
            stack.append((node.target, in_loop, sc))
            stack.append((node.iter, in_loop, sc))
            stack.extend((c, True, sc) for c in node.body)
            stack.extend((c, in_loop, sc) for c in node.orelse)
            continue
        elif t is ast.comprehension:
            if o.loops and not _plain_iteration(node.iter):
                add(_join(span(node.target, "loop"), span(node.iter, "loop")))
            if o.conditions:
                spans.extend(span(c, "condition") for c in node.ifs)
        elif t is ast.Return or t is ast.Yield or t is ast.YieldFrom:
            if o.returns and not _bare(node.value):
                comp = _comprehension(node.value)
                add(span(node.value, "return") if comp is None else _element(comp, span, "return"))
        elif t is ast.Expr:
            if o.assignments and _operative_call(node.value):
                add(span(node, "update"))
        elif t is ast.AugAssign:
            if o.assignments:
                step = _step(node)
                if step is None or not sc.known or step in sc.read:
                    add(span(node, "update"))
        elif t is ast.Assign or t is ast.AnnAssign:
            if o.assignments and node.value is not None and _operative_assign(node, in_loop, sc, o):
                comp = _comprehension(node.value)
                add(span(node, "update") if comp is None else _element(comp, span, "update"))
        elif t is ast.match_case:
            if o.conditions and node.guard is not None:
                add(span(node.guard, "condition"))
        elif isinstance(node, _SCOPES):
            inner = _Scope(*_result_names(node, has_yield)) if isinstance(node, _FUNCS) else top
            stack.extend((c, False, inner) for c in _children(node))
            continue
        for name in child_fields.get(t) or _child_fields(t):  # _children(node), inlined: the hot loop
            v = getattr(node, name, None)
            if type(v) is list:
                for x in v:
                    if isinstance(x, _AST) and type(x) not in leaf:
                        push((x, in_loop, sc))
            elif isinstance(v, _AST) and type(v) not in leaf:
                push((v, in_loop, sc))
    return [s for s in spans if s is not None]


_COMPS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _comprehension(value: ast.AST) -> ast.AST | None:
    """The comprehension a value is built from (``[f(x) for x in xs]``, ``sum(f(x) for x in xs)``,
    ``''.join(...)``), or None.  Its element and clauses carry the computation; the wrapper is glue."""
    if isinstance(value, _COMPS):
        return value
    if isinstance(value, ast.Call) and len(value.args) == 1 and not value.keywords \
            and isinstance(value.args[0], _COMPS):
        return value.args[0]
    return None


def _element(comp: ast.AST, span, kind: str) -> RawSpan | None:
    """Span of a comprehension's element (``key: value`` for a dict comprehension); when the element
    only names the loop variable, nothing if a filter follows (marked as a condition), else the whole
    comprehension."""
    if isinstance(comp, ast.DictComp):
        return _join(span(comp.key, kind), span(comp.value, kind))
    elt = comp.elt  # type: ignore[attr-defined]
    if not _bare(elt):
        return span(elt, kind)
    if any(g.ifs for g in comp.generators):  # type: ignore[attr-defined]
        return None  # [x for x in xs if p(x)]: the filter says it all
    return span(comp, kind)  # [e for s in xss for e in s]: the clauses are the computation


@dataclass(frozen=True, slots=True)
class _Scope:
    """Result names of the enclosing function: returned bare (``return res``) and read by any return."""

    bare: frozenset[str]
    read: frozenset[str]
    known: bool = True
    """False outside functions (module-level scripts): no returns to tell a step from a result."""


def _operative_assign(node: ast.Assign | ast.AnnAssign, in_loop: bool, sc: _Scope,
                      o: CodeRuleOptions) -> bool:
    """Does this assignment change the algorithm's state, or is it bookkeeping?

    Operative: a recurrence (a target also read on the right: ``a, b = b, a + b``); a write into a
    container or attribute inside a loop (``dp[i][j] = ...``); a value with arithmetic
    (``mean = sum(xs) / len(xs)``); inside a loop, a call (``v = queue.pop(0)``) or a new value for a
    result name (``m = e`` when the function returns ``m``); with ``return_definitions``, the
    non-trivial computation of a value returned bare (``res = tuple(set(a) & set(b)); return res``).
    Bookkeeping: set-up (``temp = []``, ``R = 3``), temporaries (``temp = arr[i]``), index steps.
    """
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    written: set[str] = set()
    for tgt in targets:
        written |= _target_base_names(tgt)
    value = node.value
    step = _step(node) if isinstance(node, ast.Assign) else None
    if step is not None:
        return not sc.known or step in sc.read
    if written & _names(value):
        return True
    if _trivial(value) and not (in_loop and written & sc.read):
        return False
    if _computes(value):
        return True
    if in_loop:
        return (any(isinstance(tg, (ast.Subscript, ast.Attribute)) for tg in targets)
                or isinstance(value, ast.Call) or bool(written & sc.read))
    return o.return_definitions and bool(written & sc.bare)


def _join(a: RawSpan | None, b: RawSpan | None) -> RawSpan | None:
    return (a[0], b[1], a[2]) if a is not None and b is not None and b[1] > a[0] else None


def python_spans(code: str, opts: CodeRuleOptions, base: int = 0) -> list[Span] | None:
    """Spans of one Python snippet (offsets shifted by ``base``), or None if it does not parse.

    Uniformly indented snippets (code quoted inside a list item) are parsed under an ``if 1:``
    wrapper so that columns, and hence offsets, stay those of the original text.
    """
    tree, first_line, _ = _parse(code)
    return None if tree is None else [Span(*sp) for sp in _collect(tree, code, first_line, opts, base)]


def _parse(code: str) -> tuple[ast.Module | None, int, int]:
    """``(tree, ast line number of the first source line, line of the syntax error or 0)``."""
    wrapped = code[:1] in (" ", "\t")
    src = "if 1:\n" + code if wrapped else code
    first_line = 2 if wrapped else 1
    try:
        with warnings.catch_warnings():
            # invalid escape sequences in string literals ("\d") warn at compile time; not our business
            warnings.simplefilter("ignore")
            return ast.parse(src), first_line, 0
    except SyntaxError as e:
        return None, first_line, max((e.lineno or 0) - first_line + 1, 0)
    except (ValueError, RecursionError, MemoryError):
        # ValueError: null bytes (3.11); RecursionError/MemoryError: pathologically nested input
        return None, first_line, 0


# --- line-regex fallback (unparsable Python and other languages) --------------------------------

# A statement keyword at the start of a line (after optional "}" / "} else" of C-like languages).
_KW_LINE = re.compile(
    r"^[ \t]*(?:\}[ \t]*)?(?:else[ \t]+)?"
    r"(?P<kw>elif|else if|if|while|for|foreach|until|unless|return)\b[ \t]*",
    re.M,
)
# (?<![\w.]): never start inside an identifier, which would make long names cost quadratic time
_AUG_ASSIGN = re.compile(
    r"(?<![\w.])(?P<stmt>[A-Za-z_][\w.]*(?:\[[^\]\n]*\])*[ \t]*(?:\+|-|\*\*?|//?|%|<<|>>|&|\||\^)=[ \t]*"
    r"[^;\r\n#]+|[A-Za-z_][\w.]*(?:\+\+|--)|(?:\+\+|--)[A-Za-z_][\w.]*)"
)
_KW_KIND = {"return": "return", "for": "loop", "foreach": "loop"}


def regex_code_spans(code: str, opts: CodeRuleOptions, base: int = 0, python: bool = True) -> list[RawSpan]:
    """Line-based spans for code that ``ast`` cannot read.

    After a keyword, a parenthesised head (``if (a > b) {``) is taken up to its matching
    parenthesis; otherwise the rest of the line minus a trailing ``:``/``{``/``;``/``then``/``do``
    and comment (``while i < n:``, ``return a + b;``).
    """
    out: list[RawSpan] = []
    comments = ("#",) if python else ("//", "#")  # "//" is floor division in Python
    for m in _KW_LINE.finditer(code):
        kw = m.group("kw")
        kind = _KW_KIND.get(kw, "condition")
        if (kind == "condition" and not opts.conditions) or (kind == "loop" and not opts.loops) or (
            kind == "return" and not opts.returns
        ):
            continue
        start = m.end()
        eol = code.find("\n", start)
        eol = len(code) if eol < 0 else eol
        if eol > start and code[eol - 1] == "\r":
            eol -= 1
        if start < eol and code[start] == "(":
            end = _matching_paren(code, start, eol)
            if end is None:
                end = eol
            else:
                start, end = start + 1, end  # the inside of the parentheses
        else:
            end = eol
            for marker in comments:  # a trailing comment ends the head
                k = code.find(marker, start, end)
                if k >= 0:
                    end = k
            while end > start and code[end - 1] in " \t:{;":
                end -= 1
            for word in (" then", " do"):
                if code.endswith(word, start, end):
                    end -= len(word)
            while end > start and code[end - 1] in " \t":
                end -= 1
        if end > start:
            out.append((base + start, base + end, kind))
    if opts.assignments:
        for m in _AUG_ASSIGN.finditer(code):
            s, e = m.span("stmt")
            while e > s and code[e - 1] in " \t":
                e -= 1
            out.append((base + s, base + e, "update"))
    return out


def _matching_paren(text: str, open_at: int, limit: int) -> int | None:
    depth = 0
    for i in range(open_at, limit):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
    return None


def code_spans(
    code: str, opts: CodeRuleOptions, base: int = 0, python: bool = True
) -> tuple[list[Span], bool]:
    """Spans of one code block and whether it was fully understood (see :func:`code_span_tuples`)."""
    spans, ok = code_span_tuples(code, opts, base, python)
    return [Span(*sp) for sp in spans], ok


def code_span_tuples(
    code: str, opts: CodeRuleOptions, base: int = 0, python: bool = True
) -> tuple[list[RawSpan], bool]:
    """Sorted ``(start, end, kind)`` spans of one code block and whether it was fully understood.

    ``python=False`` (a fence tagged with another language) goes straight to the line regex.
    For Python that does not parse, the lines before the reported syntax error are parsed with
    ``ast`` (when they parse on their own) and the line regex covers the rest, so one bad line
    (a Python 2 ``print x``, a truncated answer) does not cost the whole block.
    """
    if not python:
        return drop_nested(regex_code_spans(code, opts, base, python=False)), False
    tree, first_line, err_line = _parse(code)
    if tree is not None:
        return drop_nested(_collect(tree, code, first_line, opts, base)), True
    cut = _line_start(code, err_line) if err_line > 1 else 0
    prefix: list[RawSpan] = []
    if cut > 0:
        head = code[:cut]
        head_tree, head_first, _ = _parse(head)
        if head_tree is None:
            cut = 0
        else:
            prefix = _collect(head_tree, head, head_first, opts, base)
    return drop_nested(prefix + regex_code_spans(code[cut:], opts, base + cut)), False


def _collect(tree: ast.AST, code: str, first_line: int, opts: CodeRuleOptions, base: int) -> list[RawSpan]:
    # skip the ``if 1:`` wrapper itself, it is not in the source
    roots = list(tree.body[0].body) if first_line == 2 else [tree]  # type: ignore[attr-defined]
    found = _collect_nodes(roots, LineIndex(code, first_line), opts, "yield" in code)
    spans = [_close_parens(code, s) for s in found]
    if base:
        return [(a + base, b + base, kind) for a, b, kind in spans]
    return spans


def _close_parens(code: str, sp: RawSpan) -> RawSpan:
    """Take in the closing parentheses of a statement head (``if (a > b)``, ``while( n != 0)``): ``ast``
    ends the test inside them, which would leave the ``(`` marked and the ``)`` not."""
    start, end, kind = sp
    depth = code.count("(", start, end) - code.count(")", start, end)
    while depth > 0:
        k = end
        while k < len(code) and code[k] in " \t":
            k += 1
        if k >= len(code) or code[k] != ")":
            break
        end, depth = k + 1, depth - 1
    return sp if end == sp[1] else (start, end, kind)


def _line_start(code: str, lineno: int) -> int:
    """``str`` offset where 1-based line ``lineno`` starts (0 when the code has fewer lines)."""
    pos = 0
    for _ in range(lineno - 1):
        m = _LINE_END.search(code, pos)
        if m is None:
            return 0
        pos = m.end()
    return pos
