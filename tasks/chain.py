"""The built-in task: arithmetic chains whose information-dense tokens are known exactly.

A problem is a start value and a few additions/subtractions of one-digit numbers; the response is
the worked chain, one step a line, then the answer in GSM8K's ``####`` form::

    prompt:    7 + 2 - 3 + 1 =
    response:  7+2=9
               9-3=6
               6+1=7
               #### 7

Why this task (see docs/builtin_task.md for the longer argument):

* the tiny default learns it in minutes on two CPU cores: every number up to ``max_value`` is one
  token of the bundled tokenizer, so a step is one lookup ``(value, sign, operand) -> value``;
* the split between "syntax" and "logic" is exact: the left side of each line is a copy (of the
  previous result and of an operand from the prompt) and the ``+``/``-``/``=``/newline glue is
  fixed by the prompt, while each result and the final answer must be computed.  Those results are
  the ground-truth information-dense spans (:func:`truth_spans`), so the rule-based extractor can be
  scored against them and the masking ablations have a task where "the dense tokens" is not a
  matter of opinion;
* exact match of the final answer is a crisp metric, near 0 for an untrained model;
* held-out problems are disjoint from training problems by construction: a problem belongs to the
  held-out set iff a hash of its prompt says so (:func:`is_heldout`), whatever the seed or sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from preprocess.extractors.base import ExtractInput, ExtractResult, Span

DOMAIN = "math"
HELDOUT_PERCENT = 15
"""Share of all problems (by prompt hash) reserved for evaluation; training never draws them."""
_ANSWER = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """The problem family: values stay in [0, max_value], operands in [1, max_operand]."""

    min_steps: int = 2
    max_steps: int = 3
    max_value: int = 9
    max_operand: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"ChainSpec: need 1 <= min_steps <= max_steps, got {self.min_steps}, "
                             f"{self.max_steps}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError(f"ChainSpec: need 1 <= max_operand <= max_value, got {self.max_operand}, "
                             f"{self.max_value}")


@dataclass(frozen=True, slots=True)
class Problem:
    """Start value and the signed operands applied in order."""

    start: int
    ops: tuple[int, ...]

    @property
    def values(self) -> list[int]:
        """The chain of results, first the start value: [start, start+ops[0], ...]."""
        out = [self.start]
        for op in self.ops:
            out.append(out[-1] + op)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        return f"{self.start} " + " ".join(f"{'+' if op > 0 else '-'} {abs(op)}" for op in self.ops) + " ="

    @property
    def response(self) -> str:
        vals = self.values
        lines = [f"{a}{'+' if op > 0 else '-'}{abs(op)}={b}" for a, op, b in zip(vals, self.ops, vals[1:])]
        return "\n".join(lines) + f"\n#### {self.answer}"


def is_heldout(prompt: str) -> bool:
    """Whether a problem is reserved for evaluation (a fixed hash of its prompt; seed-independent)."""
    h = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % 100 < HELDOUT_PERCENT


def random_problem(rng: random.Random, spec: ChainSpec) -> Problem:
    """One problem; every step is drawn among the operands that keep the value in range."""
    value = rng.randint(0, spec.max_value)
    ops = []
    for _ in range(rng.randint(spec.min_steps, spec.max_steps)):
        choices = [s * k for k in range(1, spec.max_operand + 1) for s in (1, -1)
                   if 0 <= value + s * k <= spec.max_value]
        op = rng.choice(choices)
        ops.append(op)
        value += op
    return Problem(value - sum(ops), tuple(ops))


def problems(split: str, n: int, *, seed: int = 0, spec: ChainSpec = ChainSpec()) -> Iterator[Problem]:
    """``n`` problems of ``split`` ("train" or "heldout"), deterministic in (split, n, seed, spec).

    Training problems may repeat; held-out ones are distinct (so accuracy is over ``n`` problems).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: must be train or heldout, got {split!r}")
    rng = random.Random(f"chain:{split}:{seed}")
    want_heldout = split == "heldout"
    seen: set[str] = set()
    made = tries = 0
    while made < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct {split} problems from {spec}")
        p = random_problem(rng, spec)
        prompt = p.prompt
        if is_heldout(prompt) != want_heldout or (want_heldout and prompt in seen):
            continue
        seen.add(prompt)
        made += 1
        yield p


def record(p: Problem, key: str) -> dict:
    """The preprocessor's JSONL record for one problem."""
    return {"id": key, "domain": DOMAIN, "prompt": p.prompt, "response": p.response}


def truth_spans(response: str) -> list[Span]:
    """The computed values of a chain response: every result right of ``=`` and the final answer.

    Parsed from the text (so it also scores generated responses' layout), not from a Problem: the
    preprocessor's extractors see only (prompt, response).
    """
    spans = [Span(m.start(1), m.end(1), "result") for m in re.finditer(r"=(\d+)", response)]
    spans += [Span(m.start(1), m.end(1), "final_answer") for m in _ANSWER.finditer(response)]
    return sorted(spans)


def parse_answer(text: str) -> int | None:
    """The integer after the first ``####`` of a generated response, or None."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


class ChainTruthExtractor:
    """The exact information-dense spans of the built-in task (:func:`truth_spans`)."""

    name = "chain-truth"
    version = "1"

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        return [ExtractResult(spans=truth_spans(it.response)) for it in items]


def span_agreement(extractor_name: str, n: int = 1000, *, seed: int = 0) -> dict[str, float]:
    """Character-level precision and recall of an extractor's spans against :func:`truth_spans` on
    ``n`` training problems, plus each side's share of marked response characters."""
    from preprocess.extractors.registry import get_extractor
    from preprocess.shards import Domain

    probs = list(problems("train", n, seed=seed))
    found = get_extractor(extractor_name).extract_batch(
        [ExtractInput(key=f"chain-{i}", prompt=p.prompt, response=p.response, domain=Domain.MATH)
         for i, p in enumerate(probs)])
    tp = marked = true = chars = 0
    for p, res in zip(probs, found):
        truth = {i for s in truth_spans(p.response) for i in range(s.start, s.end)}
        got = {i for s in res.spans for i in range(s.start, s.end)}
        tp, marked, true = tp + len(truth & got), marked + len(got), true + len(truth)
        chars += len(p.response)
    return {"precision": tp / max(marked, 1), "recall": tp / max(true, 1),
            "share_marked": marked / chars, "share_true": true / chars}
