"""Answer extraction and checking: math by symbolic equivalence, code by running the tests.

Math: the model's final answer is taken from (in this order) the last ``\\boxed{...}``, the text
after the last ``####``, or the last number in the text; it is compared with the gold answer by
``math_verify`` (``1/2`` = ``0.5`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``), not by string equality.

Code: the program is the first ```python fenced block of the completion (or the first bare ```
block, or the raw text when there is none; an unterminated fence, cut by the length limit, runs to
the end).  HumanEval runs ``prompt + completion`` (a completion that restates the whole function
simply redefines it) and the harness calls the benchmark's ``check`` with its ``entry_point``; MBPP
runs the completion, and the harness runs its setup code and ``assert`` lines against it.  The
completion runs in ``evaluation.sandbox``; the tests run outside it (``evaluation.verdict``).
"""

from __future__ import annotations

import ast
import builtins
import re

from math_verify import parse, verify

from evaluation.sandbox import Program

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
PYTHON_FENCES = ("python", "python3", "py")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None when absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_math_answer(text: str) -> str | None:
    """The model's final answer as a string: boxed, else after ``####``, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_gold(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K ``answer`` field (commas removed)."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer has no '#### N' line")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


def math_equal(gold: str, predicted: str | None) -> bool:
    """Symbolic equivalence of two answer strings (LaTeX or plain) with math_verify."""
    if predicted is None:
        return False
    gold_parsed = parse(f"${gold}$")
    if not gold_parsed:
        gold_parsed = parse(gold)
    pred_parsed = parse(f"${predicted}$")
    if not pred_parsed:
        pred_parsed = parse(predicted)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == predicted.strip()
    return bool(verify(gold_parsed, pred_parsed))


def score_math(gold: str, completion: str) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a math completion."""
    extracted = extract_math_answer(completion)
    return math_equal(gold, extracted), extracted


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Markdown fenced blocks as (info string lower-cased, body); an unterminated one runs to the end."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang, body = stripped[3:].strip().lower(), []
        elif stripped.startswith("```"):
            blocks.append((lang, "".join(body)))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        blocks.append((lang, "".join(body)))
    return blocks


def extract_code(text: str) -> str:
    """First ```python block, else the first bare ``` block, else the raw text."""
    blocks = fenced_blocks(text)
    for lang, body in blocks:
        if lang in PYTHON_FENCES:
            return body
    for lang, body in blocks:
        if not lang:
            return body
    return text


def humaneval_program(record: dict, completion: str) -> Program:
    """HumanEval: the solution is prompt + completion; the tests (with the prompt's helpers, such as
    ``encode_cyclic``) call ``check(<the solution's entry_point>)``."""
    code = extract_code(completion)
    return Program(solution=f"{record['prompt']}{code}\n", prelude=record["prompt"], tests=record["test"],
                   entry_point=record["entry_point"])


def mbpp_program(record: dict, completion: str) -> Program:
    """MBPP: the solution is the completion; the tests are ``test_setup_code`` then the ``assert`` lines.

    The setup runs with the tests: the one test-split task that has setup code (task 367) builds
    its test trees with the solution's own ``Node`` class (as handles into the candidate).
    """
    tests = "\n".join([record.get("test_setup_code") or "", *record["test_list"]])
    return Program(solution=extract_code(completion), tests=tests + "\n", interface=_shadowed(record["code"]))


def _shadowed(reference: str) -> tuple[str, ...]:
    """Built-in names the reference solution defines (MBPP task 126's function is named ``sum``)."""
    try:
        tree = ast.parse(reference)
    except SyntaxError:
        return ()
    return tuple(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                 and hasattr(builtins, n.name))


PROGRAM_BUILDERS = {"humaneval": humaneval_program, "mbpp": mbpp_program}
