"""Versioned prompts and the strict JSON schema for the LLM span extractor (paper §2.1).

The paper feeds the SFT instruction and the target answer to GPT-4o and asks for the "core logic
spans" under per-domain rules: control-flow conditions and algorithm pivots for code; core
mathematical operations and key intermediate and final results for math.  We ask for *verbatim
substrings* of the answer (never offsets: models cannot count characters) through structured
output, and locate them ourselves (``preprocess.extractors.llm.client.locate_spans``).

``PROMPT_VERSION`` is part of the cache key and of the extractor's ``version`` string: change it
whenever a prompt or the schema changes, so cached answers and shard fingerprints of the old
prompt are never mixed with the new ones.
"""

from __future__ import annotations

from typing import Any

from preprocess.extractors.base import ExtractInput
from preprocess.shards import Domain

PROMPT_VERSION = "dense-v1"

# Span kinds the model may emit per domain; they become ``Span.kind``.
KINDS: dict[Domain, tuple[str, ...]] = {
    Domain.CODE: ("condition", "pivot"),
    Domain.MATH: ("operation", "result"),
    Domain.OTHER: ("key",),
}

_COMMON = """\
You annotate training data for a diffusion language model. Given an instruction and its answer,
you return the information-dense spans of the ANSWER: the few places where the reasoning is
decided, as opposed to boilerplate, syntax glue, restated context and connective words.

Output rules (strict):
- Every "text" must be copied VERBATIM from the answer: same characters, same spacing, same case.
  Never paraphrase, never normalise numbers, never join pieces that are not adjacent, never quote
  the instruction.
- Keep each span short and self-contained (typically 3 to 80 characters; one condition, one
  expression or one result), not whole paragraphs or whole functions.
- "occurrence" is 1 when the text appears once in the answer; when the same text appears several
  times, it is the 1-based index of the occurrence you mean, counted from the start of the answer;
  use 0 to mean every occurrence.
- Return the spans in the order they appear. Aim for roughly a quarter to a third of the answer.
- If nothing qualifies, return an empty list.
"""

_RULES: dict[Domain, str] = {
    Domain.CODE: """\
Domain: CODE. Information-dense spans are:
- kind "condition": control-flow conditions: the test expressions of if/elif/while, loop headers
  with their bounds or iterables (for ... in ...), ternary and guard conditions, early-return and
  break/continue guards, exception conditions.
- kind "pivot": algorithm pivot points: the statements that carry the algorithm itself: recurrence
  or update rules, key index arithmetic, accumulator updates, the core call that solves the task
  (e.g. sorted(..., key=...), a heap push/pop, a DP transition), and the returned expression.
Not dense: imports, def lines, docstrings, comments, prints, variable initialisations to
constants, bare "else:", "pass", closing brackets, test scaffolding.

Example answer:
    def count_even(xs):
        n = 0
        for x in xs:
            if x % 2 == 0:
                n += 1
        return n
Example output: {"spans": [{"text": "for x in xs", "kind": "condition", "occurrence": 1},
{"text": "if x % 2 == 0", "kind": "condition", "occurrence": 1},
{"text": "n += 1", "kind": "pivot", "occurrence": 1}, {"text": "return n", "kind": "pivot", "occurrence": 1}]}
""",
    Domain.MATH: """\
Domain: MATH. Information-dense spans are:
- kind "operation": core mathematical operations: the expressions and equations that carry a
  computation step (e.g. "3 * 12 = 36", "48/2", "x + 5 = 20"), including calculator annotations
  such as "<<48/2=24>>".
- kind "result": key intermediate and final results: the numbers (with their unit when adjacent)
  that later steps use, and the final answer (e.g. "#### 72", "72 clips").
Not dense: restatements of the question, connective phrases ("so", "therefore", "we know that"),
units or words standing alone.

Example answer:
    She buys 3 * 4 = <<3*4=12>>12 apples. She eats 2, so 12 - 2 = <<12-2=10>>10 are left.
    #### 10
Example output: {"spans": [{"text": "3 * 4 = <<3*4=12>>12", "kind": "operation", "occurrence": 1},
{"text": "12 - 2 = <<12-2=10>>10", "kind": "operation", "occurrence": 1},
{"text": "#### 10", "kind": "result", "occurrence": 1}]}
""",
    Domain.OTHER: """\
Domain: GENERAL. Information-dense spans (kind "key") are the key facts, decisions and
conclusions of the answer; not connective words, formatting or restated context.
""",
}


def system_prompt(domain: Domain) -> str:
    """The system message for one domain: common output rules plus the paper's domain rules."""
    return _COMMON + "\n" + _RULES[domain]


def user_prompt(item: ExtractInput) -> str:
    """The user message: instruction and answer inside explicit tags, so quoting stays unambiguous."""
    return (
        "<instruction>\n" + item.prompt + "\n</instruction>\n\n"
        "<answer>\n" + item.response + "\n</answer>\n\n"
        "Return the information-dense spans of the answer as JSON."
    )


def build_messages(item: ExtractInput) -> list[dict[str, str]]:
    """Chat messages for one sample; the estimator counts exactly these (``llm.cost``)."""
    return [
        {"role": "system", "content": system_prompt(item.domain)},
        {"role": "user", "content": user_prompt(item)},
    ]


def response_schema(domain: Domain) -> dict[str, Any]:
    """Strict JSON schema for structured output (all fields required, no extra properties)."""
    span = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "description": "verbatim substring of the answer"},
            "kind": {"type": "string", "enum": list(KINDS[domain])},
            "occurrence": {
                "type": "integer",
                "description": "1-based occurrence of text in the answer; 0 = every occurrence",
            },
        },
        "required": ["text", "kind", "occurrence"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"spans": {"type": "array", "items": span}},
        "required": ["spans"],
        "additionalProperties": False,
    }


def response_format(domain: Domain) -> dict[str, Any]:
    """The ``response_format`` argument of ``chat.completions.create`` for one domain."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": f"dense_spans_{domain.name.lower()}",
            "strict": True,
            "schema": response_schema(domain),
        },
    }


def build_request_body(item: ExtractInput, *, model: str, temperature: float,
                       max_output_tokens: int, seed: int | None) -> dict[str, Any]:
    """The full chat-completions body for one sample; shared by online and Batch API modes.

    Both modes send exactly this body, so the cache key (a hash of it) is the same whichever
    mode produced an answer, and a Batch API result serves a later online rerun.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": build_messages(item),
        "response_format": response_format(item.domain),
        "temperature": temperature,
        "max_tokens": max_output_tokens,
    }
    if seed is not None:
        body["seed"] = seed
    return body
