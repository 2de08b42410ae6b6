"""The rho budget: keep a sample's highest-scoring spans up to a share of its supervised tokens.

The paper's GPT-4o spans mark rho = 0.25 (code) and 0.31 (math) of the supervised tokens (§3.2);
another extractor may mark more, and with rho near 0.5 priority masking comes close to uniform
masking.  ``--max-rho code=0.25,math=0.31`` (``PreprocessConfig.max_rho``) caps every sample of a
domain at that share, whatever the extractor, by dropping its lowest-priority spans:

- The budget counts tokens after alignment, not characters: at most
  ``floor(max_rho * supervised tokens)`` response tokens stay marked, supervised tokens being the
  response plus its EOS, as in the reported rho (:func:`budget_tokens`).
- Spans are taken by descending ``Span.score`` (ties: the earlier span first).  A span is kept whole
  when the tokens marked so far plus its own new ones stay within the budget; one that does not fit
  is skipped and the next one tried, so smaller spans of lower priority can fill what is left.
  Then the highest-priority skipped span fills the rest with its first tokens: the one span of a
  sample that is cut.  So a sample over its budget ends with exactly the budget marked, and a short
  answer whose one span is larger than the budget (``return re.findall(...)``) keeps the start of
  it instead of nothing (:func:`select_within_budget`).
- Deterministic: a pure function of the spans, their scores and the tokens; no randomness.

A sample already within its budget is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from preprocess.align import span_tokens
from preprocess.extractors.base import Span


def budget_tokens(max_rho: float, n_supervised: int) -> int:
    """``floor(max_rho * n_supervised)``, exact for the decimal written (0.29 of 100 tokens is 29, not
    the 28 that binary floating point gives)."""
    return math.floor(Fraction(str(max_rho)) * n_supervised)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a budget keeps of one sample's spans."""

    marked: np.ndarray  # bool per token index up to the last span token: still marked
    kept: np.ndarray  # bool per span: kept whole
    cut: int  # the span kept in part (its first new tokens), or -1


def select_within_budget(members: Sequence[np.ndarray], scores: Sequence[float], budget: int) -> Selection:
    """The spans and tokens kept under ``budget`` marked tokens (the module docstring says how).

    ``members[k]`` are the token indices span ``k`` covers, ascending (spans in position order;
    neighbours may share an edge token, which counts once); ``scores[k]`` its priority (NaN counts as
    the lowest).
    """
    if len(members) != len(scores):
        raise ValueError(f"{len(members)} spans but {len(scores)} scores")
    order = sorted(range(len(members)), key=lambda k: (-scores[k] if scores[k] == scores[k] else math.inf, k))
    size = max((int(m.max()) + 1 for m in members if len(m)), default=0)
    marked = np.zeros(size, dtype=bool)
    kept = np.zeros(len(members), dtype=bool)
    used, cut = 0, -1
    for k in order:
        m = members[k]
        new = m[~marked[m]]
        if used + len(new) <= budget:
            marked[new] = True
            used += len(new)
            kept[k] = True
        elif cut < 0:
            cut = k
    if cut >= 0 and used < budget:
        m = members[cut]
        marked[m[~marked[m]][: budget - used]] = True
    else:
        cut = -1
    return Selection(marked, kept, cut)


@dataclass(frozen=True, slots=True)
class Trimmed:
    """One sample's marks under its budget."""

    dense: np.ndarray  # bool per response token
    dropped_spans: int  # neither kept whole nor cut
    dropped_tokens: int  # marked before the budget, unmarked after


def trim_to_budget(ids: np.ndarray, offsets: Sequence[tuple[int, int]] | None, text: str,
                   spans: Sequence[Span], byte_table: np.ndarray | None, budget: int) -> Trimmed:
    """The tokens of ``text`` (ids, tokenizer offsets) that ``spans`` (validated, merged) mark, within
    ``budget`` tokens; aligned as :func:`preprocess.align.align_spans` does."""
    members = span_tokens(ids, offsets, text, spans, byte_table)
    dense = np.zeros(len(ids), dtype=bool)
    for m in members:
        dense[m] = True
    before = int(dense.sum())
    if before <= budget:
        return Trimmed(dense, 0, 0)
    sel = select_within_budget(members, [s.score for s in spans], budget)
    dense[:] = False
    dense[: len(sel.marked)] = sel.marked
    return Trimmed(dense, int((~sel.kept).sum()) - (sel.cut >= 0), before - int(dense.sum()))
