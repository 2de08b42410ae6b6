"""The ``confidence`` extractor: masked-token loss of a diffusion LM picks the dense tokens."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.extractors.base import ExtractInput
from preprocess.extractors.registry import get_extractor
from preprocess.shards import Domain

REPO = Path(__file__).resolve().parents[1]

ITEMS = [
    ExtractInput("m1", "How many clips?", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
                 Domain.MATH),
    ExtractInput("c1", "Sum a list.",
                 "def f(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n", Domain.CODE),
    ExtractInput("e", "", "  ", Domain.MATH),
    ExtractInput("o1", "", "Use `sorted(xs)` and then 2 + 2 = 4.", Domain.OTHER),
]


def _share(item: ExtractInput, res, tok) -> float:
    off = tok(item.response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    marked = sum(any(a < s.end and b > s.start for s in res.spans) for a, b in off)
    return marked / len(off)


def test_deterministic_batch_invariant_and_marks_the_share():
    ex = get_extractor("confidence", batch_size="3")
    a = ex.extract_batch(ITEMS)
    assert [r.status for r in a] == ["ok", "ok", "empty_response", "ok"]
    # one at a time, other batch size: same spans (maskings are seeded per sample key)
    b = [get_extractor("confidence", batch_size=1).extract_batch([it])[0] for it in ITEMS]
    assert [r.spans for r in a] == [r.spans for r in b]
    tok = ex._bundle.tokenizer
    assert _share(ITEMS[0], a[0], tok) == pytest.approx(0.31, abs=0.05)
    assert _share(ITEMS[1], a[1], tok) == pytest.approx(0.25, abs=0.05)
    for it, r in zip(ITEMS, a):
        for s in r.spans:
            assert 0 <= s.start < s.end <= len(it.response) and s.kind == "confidence"
    other = get_extractor("confidence", seed=1).extract_batch(ITEMS[:1])[0]
    assert other.spans != a[0].spans  # another seed, another (random-init) model: another choice


def test_entropy_score_truncation_and_options():
    ex = get_extractor("confidence", score="entropy", max_length="8", share_math="0.5", prompt="false")
    (res,) = ex.extract_batch(ITEMS[:1])
    assert res.status == "truncated" and res.spans and max(s.end for s in res.spans) < len(ITEMS[0].response)
    assert "entropy" in ex.version and "noprompt" in ex.version
    clone = pickle.loads(pickle.dumps(ex))  # pipeline workers: config travels, the model does not
    assert clone._bundle is None and clone.extract_batch(ITEMS[:1])[0].spans == res.spans
    with pytest.raises(ValueError, match="score='logit'"):
        get_extractor("confidence", score="logit")
    with pytest.raises(ValueError, match="passes='two'"):
        get_extractor("confidence", passes="two")


def test_importing_the_extractor_does_not_import_the_trainer_or_torch():
    code = ("import sys, preprocess.extractors.registry; "
            "print('trainer' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, check=True).stdout.split()
    assert out == ["False", "False"]
