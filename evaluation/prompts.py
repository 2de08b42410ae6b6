"""Every benchmark prompt template, in one place.

Why these wordings: GSM8K and MBPP use exactly the prompt layout of the training data
(``preprocess/assets/sample/sample.jsonl``: the bare GSM8K question, answered with ``#### N``; the
MBPP task text followed by ``Your code should pass these tests:`` and the asserts, answered in a
```python fence), so an SFT'd checkpoint is evaluated in the format it learned.  MATH-500 asks for
``\\boxed{}`` as is customary (its gold answers are LaTeX); HumanEval shows the function stub in a
fence and asks for the completed function in one.  The answer extractors (``scoring.py``) accept
``#### N``, ``\\boxed{}`` and the last number for math, and the first ```python fence or the raw
text for code, so a model that prefers another format is not penalised for it.

The model's chat template (when the tokenizer has one) wraps these as a single user turn; see
``generate.encode_prompts``.
"""

from __future__ import annotations

GSM8K_TEMPLATE = "{question}"
MATH500_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
MBPP_TEMPLATE = "{text}\nYour code should pass these tests:\n{tests}"
HUMANEVAL_TEMPLATE = ("Complete the following Python function. Reply with the complete function in a "
                      "```python code block.\n```python\n{prompt}```")


def gsm8k_prompt(record: dict) -> str:
    return GSM8K_TEMPLATE.format(question=record["question"].strip())


def math500_prompt(record: dict) -> str:
    return MATH500_TEMPLATE.format(problem=record["problem"].strip())


def mbpp_prompt(record: dict) -> str:
    return MBPP_TEMPLATE.format(text=record["text"].strip(), tests="\n".join(record["test_list"]))


def humaneval_prompt(record: dict) -> str:
    return HUMANEVAL_TEMPLATE.format(prompt=record["prompt"])


PROMPTS = {"gsm8k": gsm8k_prompt, "math500": math500_prompt, "mbpp": mbpp_prompt,
           "humaneval": humaneval_prompt}
