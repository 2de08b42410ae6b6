"""Math rules (extractors.rules.math via the ``rules`` extractor): hand-checked spans on real records."""

from __future__ import annotations

import pytest

from preprocess.extractors.base import ExtractInput
from preprocess.extractors.rules.extractor import RuleExtractor
from preprocess.shards import Domain


def marked(text: str, domain: Domain = Domain.MATH, **options: bool) -> list[tuple[str, str]]:
    res = RuleExtractor(**options).extract(ExtractInput("t", "", text, domain))
    assert res.status == "ok"
    return [(text[s.start:s.end], s.kind) for s in res.spans]


def texts(text: str, **options: bool) -> list[str]:
    return [t for t, _ in marked(text, **options)]


# GSM8K train record 0 (openai/grade-school-math, grade_school_math/data/train.jsonl, line 1), verbatim.
# Prompt: "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
# How many clips did Natalia sell altogether in April and May?"
GSM8K_0 = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
# GSM8K train record 1 (same file, line 2), verbatim.  Prompt: "Weng earns $12 an hour for babysitting. ..."
GSM8K_1 = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
           "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
# GSM8K train record 10 (same file, line 11), verbatim: non-ASCII apostrophes and algebra.
GSM8K_10 = ("Let S be the number of people on the first hundred years\u2019 ship.\n"
            "The second hundred years\u2019 ship had twice as many as the first, so it had 2S people.\n"
            "The third hundred years\u2019 ship had twice as many as the second, so it had 2 * 2S = "
            "<<2*2=4>>4S people.\nAll the ships had S + 2S + 4S = 7S = 847 people.\n"
            "Thus, the ship that the monster ate in the first hundred years had S = 847 / 7 = "
            "<<847/7=121>>121 people on it.\n#### 121")


def test_gsm8k_record_0_default_marks_operation_and_results_not_the_annotation_copy():
    # rules 2.0: a result takes its unit word ("24 clips", the extraction prompt's "72 clips"); the
    # merged span keeps the kind of the equation it continues
    assert marked(GSM8K_0) == [("48/2 =", "equation"), ("24 clips", "equation"), ("48+24 =", "equation"),
                               ("72 clips", "equation"), ("72", "final_answer")]


def test_gsm8k_record_0_with_calc_annotations():
    assert texts(GSM8K_0, calc_annotations=True) == [
        "48/2 = <<48/2=24>>24 clips", "48+24 = <<48+24=72>>72 clips", "72"]


def test_gsm8k_record_1_currency_and_x_operator():
    assert texts(GSM8K_1) == ["12/60 = $", "0.2", "0.2 x 50 = $", "10", "10"]
    # the prices must not be read as inline LaTeX ($<<...>>0.2 per minute ... $<<)
    assert all(kind != "latex" for _, kind in marked(GSM8K_1))


def test_gsm8k_record_10_unicode_offsets_and_variables():
    assert texts(GSM8K_10) == ["2 * 2S =", "4S", "2S + 4S = 7S = 847", "847 / 7 =", "121 people", "121"]


def test_equation_with_prices_and_units():
    assert texts("She pays $12 x 5 = $60 in total.") == ["$12 x 5 = $60"]
    assert texts("First 6 cards - 1 cards = <<6-1=5>>5 cards") == ["6 cards - 1 cards =", "5 cards"]
    assert texts("Then 5 cards * $500/card = $<<5*500=2500>>2500") == ["5 cards * $500/card = $", "2500"]
    assert texts("It is 20% * 50 = 10 and (3 + 4) * 2 = 14.") == ["20% * 50 = 10", "(3 + 4) * 2 = 14"]
    assert texts("So 1,200 + 3.5 = 1,203.5 apples") == ["1,200 + 3.5 = 1,203.5"]


def test_words_on_the_left_mark_the_operation_inside_the_annotation():
    got = marked("So she has twice as many = <<2*5=10>>10 pens.")
    assert got == [("2*5=10", "calc"), ("10 pens", "calc")]


def test_plain_numbers_and_prose_are_not_marked():
    assert texts("She has 5 apples and 3 pears. Is it 2024?") == []
    assert texts("a = b is a definition") == []


def test_final_answer_forms():
    assert texts("so\r\n#### 1,234\r\n") == ["1,234"]  # CRLF
    assert texts("x\n####   -7  ") == ["-7"]
    assert texts("Therefore the answer is 42.") == ["42"]
    assert texts("not a marker: a####b") == []


def test_boxed_nested_braces():
    text = r"Thus $x = \frac{1}{2}$ and \boxed{\frac{a^{2}}{\sqrt{b_{1}}}} done"
    got = marked(text)
    assert (r"\frac{a^{2}}{\sqrt{b_{1}}}", "final_answer") in got
    assert ("x = \\frac{1}{2}", "latex") in got
    # an escaped brace inside does not close the box; an unclosed box marks nothing (and does not crash)
    assert texts(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]
    assert texts(r"\boxed{1 + {2") == []


def test_latex_delimiters():
    text = ("Display $$a^2+b^2=c^2$$ and \\[ \\sum_i i \\] and \\(x_1\\) and\n"
            "\\begin{align*}\ny &= 2x \\\\\n\\end{align*}\n")
    # rules 2.0: the "\\\\" row break is glue; "\\(x_1\\)" is an inline mention (no relation)
    assert texts(text) == ["a^2+b^2=c^2", "\\sum_i i", "y &= 2x"]


def test_inline_dollar_follows_pandoc_rule():
    assert texts("It costs $5 and $6 more.") == []  # closing $ after a space: prices
    assert texts("We have $a + b = c$ here.") == ["a + b = c"]
    assert texts("We have $a + b = c$ here.", inline_dollar=False) == []
    assert texts("pay $5+$3") == []  # closing $ followed by a digit
    assert texts(r"escaped \$5 and $y=1$") == ["y=1"]


def test_unicode_operators_and_offsets():
    text = "Zo\u00eb\u2019s caf\u00e9: 3 \u00d7 4 = 12 \u20ac and 10 \u00f7 2 = 5 \U0001f600 ok"
    assert texts(text) == ["3 \u00d7 4 = 12", "10 \u00f7 2 = 5"]


@pytest.mark.parametrize("off, expected", [
    ("equations", ["72"]),  # only the final answer is left
    ("final_answer", ["48/2 =", "24 clips", "48+24 =", "72 clips"]),
    ("latex", ["48/2 =", "24 clips", "48+24 =", "72 clips", "72"]),  # no LaTeX in GSM8K: unchanged
])
def test_options_switch_rule_groups_off(off: str, expected: list[str]):
    assert texts(GSM8K_0, **{off: False}) == expected


def test_implicit_multiplication_and_chains():
    assert texts("Then 2(3 + 4) = 14 and 2 + 3 = 5 * 2 = 10.") == ["2(3 + 4) = 14", "2 + 3 = 5 * 2 = 10"]


def test_variable_mentions_are_not_dense_statements_are():
    r"""MATH-500-style prose: a bare ``$x$``, ``$(j,k)$``, ``$\dots$`` or ``$6432$`` names something; a
    formula with a relation states something (the rules 1.0 marked every ``$...$``)."""
    text = (r"Let $M$ be the least multiple. The pairs $(j,k)$ that work are $(1,n - 1),$ $\dots,$ for a "
            r"total of $n - 1$ pairs, on the positive $x$-axis, and $6432$ is even. We get $j + k = n.$ "
            r"Since $0\leq x\leq 8$, $x \in [0, 8]$.")
    assert texts(text) == ["j + k = n", r"0\leq x\leq 8", "x \\in [0, 8]"]


def test_boxed_wrapper_and_trailing_punctuation_are_glue():
    assert texts(r"is $12+11 = \boxed{23}$.") == ["12+11 =", "23"]
    assert texts(r"so $a = 0,$ or $b = 1.$") == ["a = 0", "b = 1"]
    align = "\\begin{align*}\nx &= 1 + 1 \\\\\n&= \\boxed{2}.\n\\end{align*}"
    assert texts(align) == ["x &= 1 + 1", "&=", "2"]


def test_asy_drawing_code_is_not_math():
    """``[asy]`` blocks are drawing code: labels like ``"$A$"`` and coordinates ``dir(18+72*i)`` are not
    math; the sentences around the block are."""
    text = ("Each angle measures $360/5=72$ degrees, so $\\boxed{72}$ degrees.\n\n[asy]\nsize(150);\n"
            "int i;\nfor(i=0;i<=4;++i)\n{\ndraw(origin--dir(18+72*i));\n"
            "label(\"$x = 2$\", (1+2=3, 0), N);\n}\n[/asy]\nThen $2 + 2 = 4$.")
    assert texts(text) == ["360/5=72", "72", "2 + 2 = 4"]
    # an unclosed block runs to the end
    assert texts("So $1+1=2$.\n[asy]\nlabel(\"$y = 3$\");") == ["1+1=2"]
