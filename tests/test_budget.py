"""The rho budget (``preprocess.budget``): the pure selection, its alignment, and a pipeline run with it."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from preprocess.align import align_spans, byte_length_table, span_tokens
from preprocess.assets import SAMPLE_PATH, TOKENIZER_DIR
from preprocess.budget import budget_tokens, select_within_budget, trim_to_budget
from preprocess.extractors.base import ExtractInput, Span, parse_fractions, validate_spans
from preprocess.extractors.registry import get_extractor
from preprocess.pipeline.config import PreprocessConfig
from preprocess.pipeline.driver import run_pipeline
from preprocess.shards import Domain, ShardedDataset


@st.composite
def _spans(draw: st.DrawFn) -> tuple[list[np.ndarray], list[float], int]:
    """Token runs in position order (neighbours may share an edge token), scores, a budget."""
    n = draw(st.integers(0, 12))
    members, pos = [], 0
    for _ in range(n):
        pos = max(0, pos - draw(st.integers(0, 1)))  # share the previous span's last token, or not
        length = draw(st.integers(0, 6))
        members.append(np.arange(pos, pos + length))
        pos += length + draw(st.integers(0, 3))
    scores = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.5]), min_size=n, max_size=n))
    return members, scores, draw(st.integers(0, 40))


def _union(members: list[np.ndarray], keep: np.ndarray) -> set[int]:
    return {int(t) for m, k in zip(members, keep) if k for t in m}


@settings(max_examples=300, deadline=None)
@given(_spans())
def test_select_within_budget_properties(case) -> None:
    members, scores, budget = case
    sel = select_within_budget(members, scores, budget)
    marked = {int(t) for t in np.flatnonzero(sel.marked)}
    everything = _union(members, np.ones(len(members), dtype=bool))
    whole = _union(members, sel.kept)
    assert marked <= everything and whole <= marked
    if len(everything) <= budget:  # within budget: nothing dropped, nothing cut
        assert sel.kept.all() and sel.cut == -1 and marked == everything
    else:  # over budget: trimmed to exactly the budget, by at most one cut span
        assert len(marked) == budget
        assert marked - whole <= ({int(t) for t in members[sel.cut]} if sel.cut >= 0 else set())
    for m, k in zip(members, sel.kept):
        if not k:  # maximal: a span not kept whole does not fit beside the whole ones
            assert len(whole | {int(t) for t in m}) > budget
    if members:  # the top span (highest score, then earliest) is kept whole iff it fits alone
        top = min(range(len(members)), key=lambda k: (-scores[k], k))
        assert sel.kept[top] == (len(members[top]) <= budget)
    # only the order of scores matters, and the result is deterministic
    again = select_within_budget(members, [3 * s + 7 for s in scores], budget)
    assert np.array_equal(sel.marked, again.marked) and np.array_equal(sel.kept, again.kept)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(0, 41))
def test_equal_scores_keep_the_earliest_spans(n: int, budget: int) -> None:
    members = [np.array([2 * k, 2 * k + 1]) for k in range(n)]  # disjoint, two tokens each
    sel = select_within_budget(members, [0.0] * n, budget)
    assert sel.kept.tolist() == [k < budget // 2 for k in range(n)]
    assert np.flatnonzero(sel.marked).tolist() == list(range(min(budget, 2 * n)))


def test_higher_score_wins_over_position() -> None:
    members = [np.arange(0, 3), np.arange(5, 8), np.arange(10, 11)]
    sel = select_within_budget(members, [1.0, 2.0, 0.0], 4)
    assert sel.kept.tolist() == [False, True, True] and sel.cut == -1
    sel = select_within_budget(members, [1.0, 2.0, float("nan")], 5)  # NaN last; span 0 fills the rest
    assert sel.kept.tolist() == [False, True, True] and sel.cut == 0
    assert np.flatnonzero(sel.marked).tolist() == [0, 5, 6, 7, 10]
    assert np.flatnonzero(select_within_budget([np.arange(0, 9)], [1.0], 4).marked).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="scores"):
        select_within_budget(members, [1.0], 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 4096))
def test_budget_tokens_is_exact(percent: int, n: int) -> None:
    rho = percent / 100
    b = budget_tokens(rho, n)
    assert Fraction(b, n) <= Fraction(percent, 100) < Fraction(b + 1, n)
    assert b / n <= rho


def test_max_rho_uses_the_fraction_parser() -> None:
    assert parse_fractions("code=0.25,math=0.31", "--max-rho") == {"code": 0.25, "math": 0.31}
    with pytest.raises(ValueError, match="--max-rho"):
        parse_fractions("code=1.5", "--max-rho")
    with pytest.raises(ValueError, match="max_rho"):
        PreprocessConfig(inputs=["x"], output_dir="y", max_rho="code")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


_TEXT = "def f(xs):\n    if len(xs) > 2:\n        return sum(x * x for x in xs)  # é ü 😀\n    return 0\n"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_TEXT) - 1), st.integers(1, 12)), max_size=8),
       st.booleans(), st.integers(0, 30))
def test_span_tokens_and_trim_match_the_aligner(tok, raw, by_bytes: bool, budget: int) -> None:
    spans = validate_spans([Span(a, min(a + w, len(_TEXT)), score=float(a % 3)) for a, w in raw], _TEXT)
    enc = tok(_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    table = byte_length_table(tok.backend_tokenizer) if by_bytes else None
    members = span_tokens(ids, enc["offset_mapping"], _TEXT, spans, table)
    union = np.zeros(len(ids), dtype=bool)
    for m in members:
        union[m] = True
    full = align_spans(ids, enc["offset_mapping"], _TEXT, spans, table).dense
    assert np.array_equal(union, full)
    t = trim_to_budget(ids, enc["offset_mapping"], _TEXT, spans, table, budget)
    assert int(t.dense.sum()) <= budget
    assert not (t.dense & ~full).any()  # the budget only unmarks
    assert int(full.sum()) - int(t.dense.sum()) == t.dropped_tokens
    assert int(t.dense.sum()) == min(budget, int(full.sum()))  # over budget: exactly the budget
    assert (t.dropped_tokens > 0) == (int(full.sum()) > budget) and t.dropped_spans <= len(spans)


def test_rules_scores_follow_kind_priority() -> None:
    from preprocess.extractors.rules.extractor import KIND_PRIORITY

    text = "Half of 48 is 48/2 = 24.\nShe sold 48 + 24 = 72 clips.\n#### 72"
    (res,) = get_extractor("rules").extract_batch([ExtractInput("k", "", text, Domain.MATH)])
    by_text = {text[s.start:s.end]: s.score for s in res.spans}
    assert by_text["72"] == KIND_PRIORITY["final_answer"]
    assert by_text["48 + 24 = 72"] == KIND_PRIORITY["equation"] < KIND_PRIORITY["final_answer"]


def _rows(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[::25][:80]), encoding="utf-8")
    return p


def test_pipeline_with_budget(tmp_path: Path) -> None:
    """rho at or under budget per sample, only unmarking, counted, fingerprinted, byte-identical reruns."""
    inp = _rows(tmp_path)
    budget = {"code": 0.2, "math": 0.15}
    base = dict(inputs=[inp], extractor="rules", workers=1, num_shards=2)
    free = ShardedDataset(run_pipeline(PreprocessConfig(output_dir=tmp_path / "free", **base)))
    outs = [run_pipeline(PreprocessConfig(output_dir=tmp_path / d, max_rho=budget, batch_size=bs, **base))
            for d, bs in (("a", 512), ("b", 7))]
    files = [{p.name: p.read_bytes() for p in sorted(o.iterdir()) if p.is_file()} for o in outs]
    assert files[0] == files[1]  # deterministic, and independent of the batch size
    ds = ShardedDataset(outs[0])
    assert ds.index["config_fingerprint"] != free.index["config_fingerprint"]
    assert ds.index["config"]["max_rho"] == budget
    trimmed = {"code": 0, "math": 0}
    for s, f in zip(ds, free, strict=True):
        name = Domain(s.domain).name.lower()
        n_sup, n_dense, n_free = int(s.supervised.sum()), int(s.info_dense.sum()), int(f.info_dense.sum())
        assert n_dense <= budget[name] * n_sup + 1e-9
        assert not (s.info_dense & ~f.info_dense).any()
        if n_free <= budget_tokens(budget[name], n_sup):
            assert np.array_equal(s.flags, f.flags)  # within budget: untouched
        else:
            trimmed[name] += 1
            assert n_dense == budget_tokens(budget[name], n_sup)  # trimmed to exactly the budget
    doms = ds.index["domains"]
    for name, d in doms.items():
        assert d["budget_samples"] == trimmed[name] > 0
        assert d["budget_dropped_tokens"] == free.index["domains"][name]["dense_tokens"] - d["dense_tokens"]
        assert 0 < d["budget_dropped_spans"]
        assert d["rho"] <= budget[name]
