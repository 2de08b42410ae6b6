"""Cost estimator: offline tiktoken encodings, token counts equal to what is sent, prices, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.assets import SAMPLE_PATH
from preprocess.cli.main import main
from preprocess.extractors.base import (
    ExtractInput,
    fraction_for,
    fraction_selected,
    parse_fractions,
    read_inputs,
)
from preprocess.extractors.llm import cost
from preprocess.extractors.llm.cost import (
    CostEstimate,
    DomainTally,
    encoding_name_for_model,
    estimate_cost,
    load_encoding,
    parse_prices,
)
from preprocess.extractors.registry import get_extractor
from preprocess.records import FieldMap
from preprocess.shards import Domain

try:
    from tests.openai_stub_server import StubOpenAI
except ImportError:
    from openai_stub_server import StubOpenAI

REPO = Path(__file__).resolve().parents[1]
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_NO_NET = """
import socket
def _refuse(*a, **k):
    raise OSError("network disabled in this test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def _items() -> list[ExtractInput]:
    rejects: list = []
    items = list(read_inputs([SAMPLE_PATH], FieldMap(), rejects))
    assert not rejects
    return items


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_encodings_load_offline_and_are_genuine(no_network):
    load_encoding.cache_clear()
    enc = load_encoding("o200k_base")
    assert enc.n_vocab == 200019
    assert enc.encode("hello world") == [24912, 2375]  # published o200k ids
    assert load_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    with pytest.raises(ValueError, match="no offline copy"):
        load_encoding("p50k_base")


def test_same_as_tiktokens_own_encoding_offline(tmp_path):
    """tiktoken itself, fed our file through TIKTOKEN_CACHE_DIR with the network off, agrees."""
    raw = gzip.decompress((cost.TIKTOKEN_DIR / "o200k_base.tiktoken.gz").read_bytes())
    (tmp_path / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(raw)
    texts = [it.response for it in _items()[::97]] + ["naïve café 東京 🙂 x<=y\n\n\tdef f():", "it's they'll"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = _NO_NET + (
        "import json, sys, tiktoken\n"
        "enc = tiktoken.get_encoding('o200k_base')\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "print(json.dumps([enc.encode(t) for t in texts]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json")], capture_output=True,
                         text=True, env={"TIKTOKEN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         timeout=120, check=True)
    theirs = json.loads(out.stdout)
    ours = load_encoding("o200k_base")
    assert [ours.encode(t) for t in texts] == theirs


def test_model_to_encoding():
    assert encoding_name_for_model("gpt-4o") == ("o200k_base", True)
    assert encoding_name_for_model("gpt-4o-2024-08-06") == ("o200k_base", True)
    assert encoding_name_for_model("gpt-4") == ("cl100k_base", True)
    assert encoding_name_for_model("Qwen2.5-72B-Instruct") == ("o200k_base", False)
    est = estimate_cost(_items()[:3], "Qwen2.5-72B-Instruct", prices="0.5,1")
    assert any("approximation" in n for n in est.notes)


def test_estimate_equals_tokens_the_server_received(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    items = _items()[:30] + _items()[-10:]
    with StubOpenAI(lifetime=60) as s:
        x = get_extractor("llm", base_url=s.base_url, cache_dir=str(tmp_path),
                          limits_dir=str(tmp_path / "limits"))
        x.extract_batch(items)
        received = s.counts["prompt_tokens"]
    est = estimate_cost(items, "gpt-4o", preselected=True)
    assert received > 0 and est.input_tokens == received
    assert x.stats["input_tokens"] == received  # usage reported back is what the extractor counts


def test_fractions_prices_and_modes():
    items = _items()
    est = estimate_cost(items, "gpt-4o", fractions="code=0.1,math=0.5", mode="online")
    want_code = sum(it.domain == Domain.CODE and fraction_selected(it.key, 0.1) for it in items)
    want_math = sum(it.domain == Domain.MATH and fraction_selected(it.key, 0.5) for it in items)
    assert est.per_domain["code"].selected == want_code and est.per_domain["math"].selected == want_math
    assert est.per_domain["code"].items + est.per_domain["math"].items == len(items)
    online = (est.input_tokens * 2.5 + est.output_tokens * 10.0) / 1e6
    assert est.cost_usd("online") == pytest.approx(online)
    assert est.cost_usd("batch") == pytest.approx(online / 2)
    cheap = estimate_cost(items[:50], "gpt-4o", prices="input=1,output=2")
    assert (cheap.input_price, cheap.output_price) == (1.0, 2.0)
    assert estimate_cost(items[:5], "gpt-4o-mini-2024-07-18").input_price == 0.15
    none = estimate_cost(items[:5], "my-model")
    assert none.cost_usd() is None and "no price known" in none.format()
    with pytest.raises(ValueError, match="mode"):
        estimate_cost(items[:1], mode="cheap")


def test_output_model_is_bounded_and_grows_with_the_answer():
    enc = load_encoding("o200k_base")
    short = ExtractInput("a", "q", "x = 1", Domain.MATH)
    long = ExtractInput("b", "q", "x = 1 + 2\n" * 200, Domain.MATH)
    assert 0 < cost.estimate_output_tokens(short, enc) < cost.estimate_output_tokens(long, enc)
    assert cost.estimate_output_tokens(long, enc, max_output_tokens=50) == 50


def test_parsers_reject_bad_values():
    assert parse_prices("2.5,10") == (2.5, 10.0) == parse_prices({"input": 2.5, "output": 10})
    with pytest.raises(ValueError, match="prices"):
        parse_prices("cheap")
    assert parse_fractions("code=0.1") == {"code": 0.1}
    assert fraction_for(parse_fractions(None), Domain.MATH) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_fractions({"math": 1.5})
    with pytest.raises(ValueError, match="unknown domain"):
        parse_fractions("poetry=0.5")


def test_scaling_uses_per_selected_sample_averages():
    est = CostEstimate("gpt-4o", "o200k_base", "online", "v", 2.5, 10.0)
    est.per_domain["code"] = DomainTally(items=100, selected=10, input_tokens=7000, output_tokens=500)
    big = est.scaled({"code": 436_000})
    t = big.per_domain["code"]
    assert (t.items, t.selected, t.input_tokens, t.output_tokens) == (436_000, 43_600, 30_520_000, 2_180_000)
    with pytest.raises(ValueError, match="math"):
        est.scaled({"math": 10})
    est.fractions = {"code": 0.2}  # known fraction: used instead of the measured 10/100
    assert est.scaled({"code": 1000}).per_domain["code"].selected == 200


def test_cli_reports_bad_records_with_location(tmp_path, capsys):
    good = json.dumps({"id": "m1", "domain": "math", "prompt": "1+1?", "response": "1+1 = 2\n#### 2"})
    p = tmp_path / "in.jsonl"
    no_response = json.dumps({"id": "x", "domain": "math", "prompt": "p"})
    bad_domain = json.dumps({"id": "y", "domain": "poetry", "prompt": "p", "response": "r"})
    p.write_text("\n".join([good, "{not json", no_response, bad_domain]) + "\n")
    assert main(["cost", "--input", str(p), "--json"]) == 1
    out, err = capsys.readouterr()
    assert "in.jsonl:2: malformed_json" in err and "in.jsonl:3: missing_field field 'response'" in err
    assert "in.jsonl:4: unknown_domain field 'domain'" in err
    data = json.loads(out)
    assert data[0]["selected"] == 1 and data[-1] == {"invalid_records": 3}
    assert main(["cost", "--input", str(p), "--allow-invalid", "--scale", "math=1000"]) == 0
    out, _ = capsys.readouterr()
    assert "cost online" in out and "1000" in out


def test_cli_as_module_offline(tmp_path):
    """`dm-preprocess cost` in a fresh process with the network disabled."""
    code = _NO_NET + ("import runpy, sys\n"
                      "sys.argv = ['x', 'cost', '--input', sys.argv[1],"
                      " '--fraction', 'code=0.1', '--fraction', 'math=0.5']\n"
                      "runpy.run_module('preprocess.cli', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code, str(SAMPLE_PATH)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "encoding=o200k_base" in out.stdout and "batch: $" in out.stdout
