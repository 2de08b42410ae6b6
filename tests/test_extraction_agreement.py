"""The hand-labelled agreement set, its readers, the agreement metrics, and the calibrated rules on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.agreement_labels import AGREEMENT_SET, LabelError, read_labels
from benchmarks.extraction_agreement import PAPER_RHO, Labelled, Scored, main, prf, table
from preprocess.extractors.base import Span
from preprocess.shards import Domain

try:
    from tests.openai_stub_server import StubOpenAI
except ImportError:  # tests/ is on sys.path under pytest's default import mode
    from openai_stub_server import StubOpenAI

SET_DIR = AGREEMENT_SET.parent


def test_set_size_sources_licences_and_span_texts():
    recs = read_labels(str(AGREEMENT_SET))  # the reader checks every span's text against its offsets
    by_domain = Counter(r.domain for r in recs)
    assert by_domain[Domain.CODE] >= 60 and by_domain[Domain.MATH] >= 60
    assert len({r.source for r in recs}) >= 6
    assert len({r.key for r in recs}) == len(recs)
    # a fixed held-out third per source
    for src in {r.source for r in recs}:
        grp = [r for r in recs if r.source == src]
        assert abs(sum(r.split == "heldout" for r in grp) - len(grp) / 3) <= 1, src
    provenance = (SET_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    raw = [json.loads(line) for line in AGREEMENT_SET.read_text(encoding="utf-8").splitlines()]
    for rec in raw:
        assert rec["license"] in ("MIT", "CC-BY-4.0") and f"`{rec['source']}`" in provenance
    assert (SET_DIR / "GUIDELINE.md").exists()


def _write(tmp_path: Path, recs: list[dict], name: str = "labels.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return p


def _rec(**kw) -> dict:
    base = {"id": "a", "source": "s", "domain": "math", "split": "heldout", "prompt": "", "license": "MIT",
            "response": "So 2 + 2 = 4 and x.", "spans": [{"start": 3, "end": 12, "kind": "operation",
                                                           "text": "2 + 2 = 4"}]}
    return base | kw


def test_reader_names_file_line_and_field(tmp_path):
    ok = _rec()
    assert read_labels(str(_write(tmp_path, [ok])))[0].spans == (Span(3, 12, "operation"),)
    bad_text = _rec(spans=[{"start": 3, "end": 12, "kind": "operation", "text": "2 + 2 = 5"}])
    with pytest.raises(LabelError, match=r"labels.jsonl:2: field 'spans\[0\]'.*'2 \+ 2 = 5'"):
        read_labels(str(_write(tmp_path, [ok, bad_text])))
    with pytest.raises(LabelError, match=r"labels.jsonl:1: field 'split'"):
        read_labels(str(_write(tmp_path, [_rec(split="train")])))
    with pytest.raises(LabelError, match=r"labels.jsonl:1: missing field 'response'"):
        read_labels(str(_write(tmp_path, [{k: v for k, v in ok.items() if k != "response"}])))


def test_spans_format_reads_offsets_verbatim_texts_and_json_strings(tmp_path):
    """The adapter for external extractions (the paper's GPT-4o set has its own column names)."""
    text = "if a > b:\n    return a\nreturn b"
    recs = [{"output": text, "dense": [{"text": "if a > b"}, {"text": "return", "occurrence": 2}]},
            {"output": text, "dense": json.dumps([[0, 8]])}]
    p = _write(tmp_path, recs, "hub.jsonl")
    got = read_labels(f"spans:{p}", {"spans": "dense", "domain": "code"})
    assert [r.spans for r in got] == [(Span(0, 8, "dense"), Span(23, 29, "dense")), (Span(0, 8, "dense"),)]
    assert {r.domain for r in got} == {Domain.CODE} and {r.source for r in got} == {"hub"}
    p2 = _write(tmp_path, [{"output": text, "dense": [{"text": "while"}]}], "bad.jsonl")
    with pytest.raises(LabelError, match=r"bad.jsonl:1: field 'dense\[0\]': text 'while' is not in the"):
        read_labels(f"spans:{p2}", {"spans": "dense", "domain": "code"})
    with pytest.raises(LabelError, match="unknown --field"):
        read_labels(f"spans:{p}", {"answer": "x"})


def test_token_prf_and_rho_by_hand():
    rec = Labelled("k", "s", Domain.MATH, "heldout", "", "x", ())
    ref, pred = np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    assert prf([Scored(rec, ref, pred)]) == (0.5, 0.5, 0.5)
    (dom, src) = table([Scored(rec, ref, pred)])
    assert dom.n == src.n == 1 and dom.f1_calibration is None and dom.f1_heldout == 0.5
    assert dom.rho == dom.rho_ref == pytest.approx(2 / 5)  # over response + EOS
    assert prf([Scored(rec, ref, np.zeros(4, bool))]) == (0.0, 0.0, 0.0)


def test_calibrated_rules_meet_the_targets_on_both_splits(tmp_path, capsys):
    """Rules 2.0.0 on the hand-labelled set: token F1 >= 0.6 per domain, on the calibration two thirds
    and on the held-out third; math rho within ±0.08 of the paper on every source; code rho within
    ±0.08 of what the labels themselves mark on every source (bare functions are denser than the
    paper's OPC-SFT answers: see docs/extraction_agreement.md)."""
    rows = {r.group: r for r in main(["--json", str(tmp_path / "r.json")])}
    assert "| **code** |" in capsys.readouterr().out
    for d in ("code", "math"):
        r = rows[f"**{d}**"]
        assert min(r.f1, r.f1_calibration, r.f1_heldout) >= 0.6, r
    for name, r in rows.items():
        if name.startswith("math: "):
            assert abs(r.rho - PAPER_RHO[Domain.MATH]) <= 0.08, r
        elif name.startswith("code: "):
            assert abs(r.rho - r.rho_ref) <= 0.08, r
    assert json.loads((tmp_path / "r.json").read_text())["extractor"] == "rules"
    none = {r.group: r for r in main(["--extractor", "none"])}
    assert none["**math**"].recall == 0.0 and none["**math**"].rho == 0.0


def test_llm_extractor_through_an_openai_compatible_server(tmp_path, monkeypatch):
    """``--extractor llm`` drives the real client; the local stub answers with rule-made spans."""
    monkeypatch.setenv("AGREEMENT_TEST_KEY", "sk-test-0123456789")
    recs = [json.loads(line) for line in AGREEMENT_SET.read_text(encoding="utf-8").splitlines()]
    sub = _write(tmp_path, [r for r in recs if r["source"] == "gsm8k-test"][:3]
                 + [r for r in recs if r["source"] == "mbpp-test"][:2])
    with StubOpenAI(lifetime=60, max_requests=50) as stub:
        rows = main(["--labels", str(sub), "--extractor", "llm", "--base-url", stub.base_url,
                     "--api-key-env", "AGREEMENT_TEST_KEY", "--cache-dir", str(tmp_path / "cache")])
        assert stub.counts["chat"] == 5
    got = {r.group: r for r in rows}
    assert got["**math**"].n == 3 and got["**code**"].n == 2
    # the stub marks calculator annotations (which the labels leave out as machine copies) and code
    # lines starting with if/for/return: some agreement on code, little on math
    assert got["**code**"].precision > 0.3 and 0 < got["**math**"].rho < 1
