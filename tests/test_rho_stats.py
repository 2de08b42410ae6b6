"""``dm-preprocess stats``: the per-domain rho distribution (histogram, percentiles) and its outliers."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from preprocess.cli.main import main
from preprocess.extractors.base import ExtractInput, ExtractResult, Span
from preprocess.extractors.registry import EXTRACTORS
from preprocess.rho_stats import histogram, sample_rhos
from preprocess.shards import ShardedDataset


class ShareExtractor:
    """Marks a known share of each response: all of ``full-*``, none of ``empty-*``, a third otherwise."""

    name = "test-share"
    version = "1"

    def __init__(self, **_: object) -> None:
        pass

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        out = []
        for it in items:
            n = len(it.response)
            end = n if it.key.startswith("full") else 0 if it.key.startswith("empty") else n // 3
            out.append(ExtractResult(spans=[Span(0, end)] if end else []))
        return out


EXTRACTORS["test-share"] = ShareExtractor


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rho")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
    rows = [{"id": f"{kind}-{k}", "prompt": "q", "response": f"{words} {k}", "domain": dom}
            for k in range(12) for kind, dom in (("mid", "math"), ("mid", "code"))]
    rows += [{"id": "full-1", "prompt": "q", "response": words, "domain": "math"},
             {"id": "empty-1", "prompt": "q", "response": words, "domain": "math"}]
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp / "out"
    assert main(["run", "--input", str(inp), "--output", str(out), "--workers", "1", "--num-shards", "2",
                 "--extractor", "test-share", "--no-chat-template"]) == 0
    return out


def test_sample_rhos_match_the_samples(built: Path) -> None:
    ds = ShardedDataset(built)
    got = sample_rhos(ds)
    assert sorted(got) == ["code", "math"]
    for name, d in got.items():
        for i, rho, dense in zip(d.index.tolist(), d.rho.tolist(), d.dense.tolist()):
            s = ds[i]
            assert s.selected and ["other", "code", "math"][s.domain] == name
            assert dense == int(s.info_dense.sum()) and rho == pytest.approx(dense / int(s.supervised.sum()))
    assert len(got["math"].rho) == 14 and len(got["code"].rho) == 12


def test_histogram_bins_are_closed_on_the_right() -> None:
    assert histogram(np.array([0.0, 0.05, 0.051, 0.25, 0.2500001])) == [
        (0.0, 2), (0.05, 1), (0.1, 0), (0.15000000000000002, 0), (0.2, 1), (0.25, 1)]
    assert histogram(np.zeros(0)) == []


def test_stats_prints_distribution_and_outliers(built: Path, capsys) -> None:
    assert main(["stats", str(built), "--outliers", "3"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for name, n in (("code", 12), ("math", 14)):
        m = re.search(rf"{name}: rho of {n} extracted samples: mean ([\d.]+), p10 ([\d.]+), median ([\d.]+), "
                      rf"p90 ([\d.]+), max ([\d.]+)", flat)
        assert m, text
        mean, p10, med, p90, top = map(float, m.groups())
        assert p10 <= med <= p90 <= top
    assert "█" in text
    assert re.search(r"math: 1 sample\(s\) with rho > 0\.62: #\d+ full-1 \(0\.9\d\)", flat), flat
    assert re.search(r"math: 1 sample\(s\) with no info-dense token: #\d+ empty-1 \(0\.00\)", flat), flat
    assert not re.search(r"code: \d+ sample\(s\) with", flat)  # a third marked: no code outliers
    assert main(["stats", str(built), "--rho-above", "0.2", "--outliers", "2"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert re.search(r"code: 12 sample\(s\) with rho > 0\.20: .*\.\.\. \(10 more\)", flat), flat
