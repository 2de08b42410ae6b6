"""Code rules (extractors.rules.code via the ``rules`` extractor): hand-checked spans on real records."""

from __future__ import annotations

from preprocess.extractors.base import ExtractInput
from preprocess.extractors.rules.code import CodeRuleOptions, LineIndex, code_spans
from preprocess.extractors.rules.extractor import RuleExtractor, find_fences
from preprocess.shards import Domain


def run(text: str, domain: Domain = Domain.CODE, **options: bool):
    return RuleExtractor(**options).extract(ExtractInput("t", "", text, domain))


def marked(text: str, domain: Domain = Domain.CODE, status: str = "ok",
           **options: bool) -> list[tuple[str, str]]:
    res = run(text, domain, **options)
    assert res.status == status
    return [(text[s.start:s.end], s.kind) for s in res.spans]


def fence(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}\n```"


# MBPP task 1, 2, 3 (google-research/google-research mbpp/mbpp.jsonl, via ../shared/data/mbpp), the
# "code" field verbatim: CRLF line ends, tab indentation, trailing spaces.
MBPP_1 = ("R = 3\r\nC = 3\r\ndef min_cost(cost, m, n): \r\n"
          "\ttc = [[0 for x in range(C)] for x in range(R)] \r\n"
          "\ttc[0][0] = cost[0][0] \r\n\tfor i in range(1, m+1): \r\n"
          "\t\ttc[i][0] = tc[i-1][0] + cost[i][0] \r\n"
          "\tfor j in range(1, n+1): \r\n\t\ttc[0][j] = tc[0][j-1] + cost[0][j] \r\n"
          "\tfor i in range(1, m+1): \r\n\t\tfor j in range(1, n+1): \r\n"
          "\t\t\ttc[i][j] = min(tc[i-1][j-1], tc[i-1][j], tc[i][j-1]) + cost[i][j] \r\n"
          "\treturn tc[m][n]")
MBPP_2 = ("def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
          "  return (res) ")
MBPP_3 = ("import math\r\ndef is_not_prime(n):\r\n    result = False\r\n"
          "    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
          "        if n % i == 0:\r\n            result = True\r\n    return result")


def test_mbpp_1_loops_recurrences_and_return_with_crlf_and_tabs():
    # rules 2.0: loop heads start at "for"; "[[0 for x in range(C)] for x in range(R)]" is set-up (plain
    # walks over the input), the bounded loops "range(1, m+1)" carry the algorithm
    assert marked(fence(MBPP_1)) == [
        ("for i in range(1, m+1)", "loop"), ("tc[i][0] = tc[i-1][0] + cost[i][0]", "update"),
        ("for j in range(1, n+1)", "loop"), ("tc[0][j] = tc[0][j-1] + cost[0][j]", "update"),
        ("for i in range(1, m+1)", "loop"), ("for j in range(1, n+1)", "loop"),
        ("tc[i][j] = min(tc[i-1][j-1], tc[i-1][j], tc[i][j-1]) + cost[i][j]", "update"),
        ("tc[m][n]", "return"),
    ]


def test_mbpp_2_bare_return_is_glue_its_computation_is_dense():
    # rules 2.0: "return (res)" only names the result; the line computing it is the dense one
    assert marked(fence(MBPP_2)) == [("res = tuple(set(test_tup1) & set(test_tup2))", "update")]
    code = "def f(xs):\n    res = sorted(set(xs))\n    return res\n"
    assert marked(code) == [("res = sorted(set(xs))", "update")]
    assert marked(code, return_definitions=False) == []


def test_mbpp_3_condition_loop_update():
    assert marked(fence(MBPP_3)) == [("for i in range(2,int(math.sqrt(n)) + 1)", "loop"),
                                     ("if n % i == 0", "condition"), ("result = True", "update")]
    # the set-up assignment "result = False" is glue, not a recurrence
    assert ("result = False", "update") not in marked(fence(MBPP_3), return_definitions=True)


def test_conditions_comparisons_and_setup_glue():
    code = ("def f(a, n):\n    total = 0\n    k = n // 2\n    while k > 0 and a:\n        k -= 1\n"
            "    ok = [x for x in a if x % 2 == 0]\n    y = 1 if n < 3 else 2\n    a, b = b, a + b\n"
            "    assert n >= 0, 'neg'\n    return g(n == 1)\n")
    got = marked(fence(code))
    # rules 2.0: "k = n // 2" computes; "k -= 1" is an index step (k is not a result); "x in a"
    # walks the input; the comprehension's element "x" only names the loop variable
    assert got == [
        ("k = n // 2", "update"), ("while k > 0 and a", "condition"),
        ("x % 2 == 0", "condition"), ("n < 3", "condition"),
        ("a, b = b, a + b", "update"), ("n >= 0", "condition"), ("g(n == 1)", "return"),
    ]
    # comparisons outside conditions are their own kind
    assert marked(fence("x = f(a == b)")) == [("a == b", "compare")]


def test_non_ascii_identifiers_and_strings_use_str_offsets_not_utf8_bytes():
    code = ('def f(\u00e4, \u540d\u524d):\n    s = "h\u00e9llo \U0001f600 w\u00f6rld"\n'
            '    for ch in "\u00fc\u2192" + s:\n        if ch == "\u2192" and \u00e4:\n'
            '            \u00e4 += len("\u00e9")\n    return "\u2713" + \u540d\u524d\n')
    got = marked(fence(code))
    assert got == [('for ch in "\u00fc\u2192" + s', "loop"), ('if ch == "\u2192" and \u00e4', "condition"),
                   ('\u00e4 += len("\u00e9")', "update"), ('"\u2713" + \u540d\u524d', "return")]


def test_line_index_converts_byte_columns():
    idx = LineIndex("a\r\n\u00e9\u00e9 = 1\rz\n\U0001f600x")
    assert idx.offset(2, 4) == 5  # two 2-byte chars -> 2 characters after the line start (3)
    assert idx.offset(3, 1) == 11
    assert idx.offset(4, 4) == 13  # a 4-byte emoji is one str index


def test_crlf_lone_cr_and_tabs():
    code = "def f(x):\r\n\tif x:\r\t\treturn x + 1\n\treturn 0"
    assert marked(code) == [("if x", "condition"), ("x + 1", "return")]  # "return 0": a constant


def test_bare_code_without_fence_and_untagged_fence():
    code = "def f(n):\n    return n * 2\n"
    assert marked(code) == [("n * 2", "return")]
    assert marked(fence(code, lang="")) == [("n * 2", "return")]


def test_indented_block_keeps_offsets():
    text = "1. Write it:\n\n   ```python\n   if a > b:\n       m = a\n   ```\n"
    assert marked(text) == [("if a > b", "condition")]


def test_unparsable_python_falls_back_to_line_regex_and_is_counted():
    code = "def f(x):\n    if x > 1:\n        print x\n    while x < 10:\n        x += 2\n    return x+1\n"
    assert marked(fence(code), status="unparsable_code") == [
        ("x > 1", "condition"), ("x < 10", "condition"), ("x += 2", "update"), ("x+1", "return")]


def test_unparsable_tail_keeps_ast_spans_of_the_parseable_prefix():
    code = "def f(x):\n    y = 0\n    for i in x:\n        y = y * i\n    return y == 1\nprint y\n"
    spans, ok = code_spans(code, CodeRuleOptions())
    assert not ok
    assert [(code[s.start:s.end], s.kind) for s in spans] == [
        ("y = y * i", "update"), ("y == 1", "return")]


def test_other_language_uses_regex_and_is_reported():
    code = ("int f(int x) {\n  if (x > (1 + 2)) {\n    x++;\n  } else if (y) { return 0; }\n"
            "  while (x < 3) x += 2;\n  for (int i = 0; i < n; i++) {}\n  return x * 2;\n}")
    assert marked(fence(code, "c"), status="non_python_code") == [
        ("x > (1 + 2)", "condition"), ("x++", "update"), ("y", "condition"), ("x < 3", "condition"),
        ("x += 2", "update"), ("int i = 0; i < n; i++", "loop"), ("x * 2", "return")]


def test_prose_around_code_is_not_marked_for_code_but_is_for_math_and_other():
    text = "If 2 + 2 = 4 then:\n```python\nif a < b:\n    pass\n```\nSo 3 * 3 = 9."
    assert marked(text) == [("if a < b", "condition")]
    both = [("2 + 2 = 4", "equation"), ("if a < b", "condition"), ("3 * 3 = 9", "equation")]
    assert marked(text, Domain.OTHER) == both
    assert marked(text, Domain.MATH) == both
    assert marked(text, code_prose_math=True) == both


def test_fences_tildes_unclosed_and_info_strings():
    text = "~~~~ {.python}\nx = 1\n~~~~\n```py title=\"a.py\"\nwhile q: q.pop()\n"
    blocks = find_fences(text)
    assert [(text[b.start:b.end], b.lang) for b in blocks] == [
        ("x = 1\n", "python"), ("while q: q.pop()\n", "py")]
    assert marked(text) == [("while q", "condition"), ("q.pop()", "update")]


def test_fstrings_are_not_descended_and_match_guards_are_conditions():
    code = "match p:\n    case (x, y) if x > y:\n        s = f'{x == y}'\n"
    assert marked(code) == [("x > y", "condition")]


def test_nested_function_in_loop_is_not_in_the_loop():
    # "z = f(1)" would be an operative call if g's body counted as the loop's
    code = "for i in range(1, n):\n    def g():\n        z = f(1)\n        return z + 1\n    w = h(i)\n"
    assert marked(code) == [("for i in range(1, n)", "loop"), ("z + 1", "return"), ("w = h(i)", "update")]


def test_options_switch_code_rules_off():
    text = fence(MBPP_3)
    assert marked(text, loops=False, assignments=False) == [("if n % i == 0", "condition")]
    assert marked(text, conditions=False, returns=False) == [
        ("for i in range(2,int(math.sqrt(n)) + 1)", "loop"), ("n % i == 0", "compare"),
        ("result = True", "update")]


def test_syntax_warnings_and_null_bytes_do_not_escape(recwarn):
    assert marked('import re\nif re.match("\\d", s):\n    pass\n') == [('if re.match("\\d", s)', "condition")]
    assert not [w for w in recwarn if issubclass(w.category, SyntaxWarning)]
    res = run("if a\x00:\n    return b\n")
    assert res.status == "unparsable_code"


def test_untagged_fence_that_is_not_python_is_not_a_parse_failure():
    text = "```python\nif a:\n    b = 1\n```\nUsage:\n```\n>>> f(2)\n[0, 1]\n```\n"
    assert marked(text, status="non_python_code") == [("if a", "condition")]
    # a Python-tagged fence or bare code that does not parse is counted as a failure
    assert run(fence("print 'x'")).status == "unparsable_code"
    assert run("print 'x'").status == "unparsable_code"


def test_recurrences_through_attributes_and_subscripts():
    code = ("def f(self, dp, i):\n    self.n = self.n + 1\n    self.a = self.b\n    dp[i] = dp[i - 1] * 2\n"
            "    x = y\n")
    assert marked(code) == [("self.n = self.n + 1", "update"), ("dp[i] = dp[i - 1] * 2", "update")]


def test_loop_bookkeeping_is_glue_the_operative_call_is_dense():
    """The issue's case: ``temp = []`` set-up in a loop is glue, ``temp.append(grid[i-1][j])`` changes the
    algorithm's state; index steps are glue unless the step itself is the result."""
    code = ("def columns(grid, n):\n    out = []\n    for j in range(1, n):\n        temp = []\n"
            "        i = 1\n        while i < n:\n            temp.append(grid[i-1][j])\n            i += 1\n"
            "        out.append(temp)\n    return out\n")
    assert marked(code) == [("for j in range(1, n)", "loop"), ("while i < n", "condition"),
                            ("temp.append(grid[i-1][j])", "update"), ("out.append(temp)", "update")]
    counter = ("def count(xs):\n    c = 0\n    for x in xs:\n        if x > 0:\n            c += 1\n"
               "    return c\n")
    assert marked(counter) == [("if x > 0", "condition"), ("c += 1", "update")]
    # a temporary is glue, a new value for the result is not
    swap = ("def f(a, m):\n    for i in range(1, len(a)):\n        t = a[i]\n        a[i] = a[0]\n"
            "        if a[i] > m:\n            m = a[i]\n    return m\n")
    assert marked(swap) == [("for i in range(1, len(a))", "loop"), ("a[i] = a[0]", "update"),
                            ("if a[i] > m", "condition"), ("m = a[i]", "update")]


def test_plain_walks_and_comprehension_wrappers():
    code = ("def f(xs, n):\n    for x in xs:\n        print(x)\n    for i in range(len(xs)):\n        g(i)\n"
            "    return sum(x * x for x in xs if x > n)\n")
    # "print" is not a state change; the walks over xs are structure; the generator's element and
    # filter are the computation, "sum(" and "for x in xs" around them are glue
    assert marked(code) == [("g(i)", "update"), ("x * x", "return"), ("x > n", "condition")]
