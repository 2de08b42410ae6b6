"""LLM extractor end to end through the real ``openai`` client against a local stub server.

Over 400 lines: one scenario per behaviour of a long-running API client (retries, rate limits,
cache, batch, secrets), each needing its own stub-server setup; splitting would scatter the shared fixtures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess.assets import SAMPLE_PATH
from preprocess.extractors.base import ExtractInput, Span
from preprocess.extractors.llm.answers import interpret_answer, locate_spans, request_key
from preprocess.extractors.llm.batch import chunk_requests
from preprocess.extractors.llm.cache import AnswerCache, CachedAnswer
from preprocess.extractors.llm.client import LLMExtractor, retry_after_seconds
from preprocess.extractors.llm.config import LLMConfigError, redact
from preprocess.extractors.llm.prompts import PROMPT_VERSION, system_prompt
from preprocess.extractors.registry import get_extractor
from preprocess.shards import Domain

try:
    from tests.openai_stub_server import StubOpenAI
except ImportError:  # tests/ is on sys.path under pytest's default import mode
    from openai_stub_server import StubOpenAI

KEY = "sk-proj-THIS-IS-A-TEST-SECRET-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def _items(n_math: int, n_code: int) -> list[ExtractInput]:
    recs = [json.loads(line) for line in SAMPLE_PATH.open(encoding="utf-8") if line.strip()]
    math = [r for r in recs if r["domain"] == "math"][:n_math]
    code = [r for r in recs if r["domain"] == "code"][:n_code]
    return [ExtractInput(r["id"], r["prompt"], r["response"], Domain.parse(r["domain"])) for r in math + code]


@pytest.fixture
def stub():
    with StubOpenAI(lifetime=120, max_requests=2000) as s:
        yield s


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _x(stub: StubOpenAI, tmp_path: Path, **kw) -> LLMExtractor:
    opts = dict(base_url=stub.base_url, cache_dir=str(tmp_path / "cache"), backoff_base="0.01",
                max_concurrency="8", limits_dir=str(tmp_path / "limits"))
    opts.update(kw)
    return get_extractor("llm", **opts)


# ---- span location ----------------------------------------------------------------------------
def test_locate_exact_whitespace_tolerant_and_occurrences():
    resp = "x = a + b\nif x > 0:\n    y = x  *  2\nif x > 0:\n    z = 1"
    spans, unmatched = locate_spans(resp, [
        {"text": "a + b", "kind": "pivot", "occurrence": 1},
        {"text": "y = x * 2", "kind": "pivot", "occurrence": 1},     # whitespace differs
        {"text": "if x > 0", "kind": "condition", "occurrence": 2},  # second occurrence
        {"text": "if x > 0", "kind": "condition", "occurrence": 3},  # only two: unmatched
        {"text": "x>0", "kind": "condition", "occurrence": 0},       # every (whitespace-free) match
        {"text": "not there", "kind": "pivot", "occurrence": 1},
        {"text": "   ", "kind": "pivot", "occurrence": 1},
        {"text": 7, "kind": "pivot", "occurrence": 1},
        {"text": "z = 1", "kind": "bogus", "occurrence": True},       # bool is not an index
    ], ("condition", "pivot"))
    assert unmatched == 5
    got = [(resp[s.start:s.end], s.kind) for s in spans]
    assert got[0] == ("a + b", "pivot")
    assert got[1] == ("y = x  *  2", "pivot")
    assert spans[2].start == resp.rindex("if x > 0")
    assert [resp[s.start:s.end] for s in spans[3:]] == ["x > 0", "x > 0"]


def test_unknown_kind_becomes_dense():
    spans, un = locate_spans("return n", [{"text": "return n", "kind": "weird", "occurrence": 1}], ("pivot",))
    assert spans == [Span(0, 8, "dense")] and un == 0


def test_interpret_answer_statuses():
    it = ExtractInput("k", "q", "a = 1\n#### 1", Domain.MATH)
    ok = '{"spans": [{"text": "#### 1", "kind": "result", "occurrence": 1}]}'
    assert interpret_answer(CachedAnswer(ok, None, "stop"), it).spans == [Span(6, 12, "result")]
    assert interpret_answer(CachedAnswer(ok, None, "content_filter"), it).status == "llm_refused"
    assert interpret_answer(CachedAnswer(ok, None, "length"), it).status == "llm_malformed"
    assert interpret_answer(CachedAnswer('{"spans": {}}', None, "stop"), it).status == "llm_malformed"
    assert interpret_answer(CachedAnswer(None, None, "no_choices"), it).status == "llm_malformed"


def test_options_from_strings_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = LLMExtractor(max_concurrency="32", timeout="5.5", dry_run="true", seed="none",
                     cache_dir=str(tmp_path), base_url="none", mode="batch")
    c = x.config
    assert (c.max_concurrency, c.timeout, c.dry_run, c.seed, c.base_url) == (32, 5.5, True, None, None)
    assert x.name == "llm" and PROMPT_VERSION in x.version and "gpt-4o" in x.version
    with pytest.raises(ValueError, match="max_concurrency"):
        LLMExtractor(max_concurrency="many", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mode"):
        LLMExtractor(mode="offline", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="prices"):
        LLMExtractor(prices="cheap", cache_dir=str(tmp_path))
    assert Path(LLMExtractor(cache_dir="rel/cache").config.cache_dir).is_absolute()
    with pytest.raises(ValueError, match="50,000"):
        LLMExtractor(batch_max_requests=60000, cache_dir=str(tmp_path))


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert 0 <= retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 1
    assert retry_after_seconds({}) is None


# ---- online mode end to end -----------------------------------------------------------------------
def test_end_to_end_spans_and_second_run_costs_nothing(stub, tmp_path):
    items = _items(12, 8)
    x = _x(stub, tmp_path)
    res = x.extract_batch(items)
    assert stub.counts["chat"] == len(items)
    assert all(r.status == "ok" and r.unmatched == 0 for r in res)
    # The stub answers with the GSM8K calculator annotations; they must land on the exact text.
    first = items[0]
    texts = [first.response[s.start:s.end] for s in res[0].spans]
    assert texts and all(t.startswith("<<") or t.startswith("####") for t in texts)
    assert sum(bool(r.spans) for r in res[12:]) >= 4  # code: conditions/returns found
    # What went over the wire: the paper's model by default, strict structured output.
    body = stub.last_body
    assert body["model"] == "gpt-4o" and body["temperature"] == 0
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    item = rf["json_schema"]["schema"]["properties"]["spans"]["items"]
    assert item["additionalProperties"] is False and set(item["required"]) == set(item["properties"])
    sent_for = next(it for it in items if it.response in body["messages"][1]["content"])
    assert body["messages"][0]["content"] == system_prompt(sent_for.domain)
    # A fresh extractor (new process in real life) on the same cache: zero requests.
    y = _x(stub, tmp_path)
    res2 = y.extract_batch(items)
    assert stub.counts["chat"] == len(items)
    assert y.stats["cache_hits"] == len(items) and y.stats["requests"] == 0
    assert [r.spans for r in res2] == [r.spans for r in res]
    # Another model or prompt text is another cache key.
    z = _x(stub, tmp_path, model="gpt-4o-mini")
    z.extract_batch(items[:2])
    assert stub.counts["chat"] == len(items) + 2


def test_duplicate_samples_are_requested_once(stub, tmp_path):
    it = _items(1, 0)[0]
    twin = ExtractInput("other-id", it.prompt, it.response, it.domain)
    res = _x(stub, tmp_path).extract_batch([it, twin, it])
    assert stub.counts["chat"] == 1 and res[0].spans == res[1].spans == res[2].spans


def test_429_retry_after_is_honoured_and_counted(stub, tmp_path):
    items = _items(3, 0)
    stub.script(items[0].prompt, ["429:0.4", "500", "ok"])
    stub.script(items[1].prompt, ["429ms:300", "ok"])
    x = _x(stub, tmp_path)
    t0 = time.monotonic()
    res = x.extract_batch(items)
    assert time.monotonic() - t0 >= 0.4
    assert [r.status for r in res] == ["ok"] * 3
    assert x.stats["http_429"] == 2 and x.stats["http_500"] == 1 and x.stats["retries"] == 3
    assert stub.counts["chat"] == 3 + 3 == x.stats["requests"]


def test_429_pauses_every_sender(stub, tmp_path):
    a, b = _items(2, 0)
    stub.script(a.prompt, ["429:0.5", "ok"])
    x = _x(stub, tmp_path, max_concurrency="1")
    assert [r.status for r in x.extract_batch([a, b])] == ["ok", "ok"]
    t_a = min(t for t, u in stub.arrivals if a.prompt in u)
    t_b = min(t for t, u in stub.arrivals if b.prompt in u)
    assert t_b - t_a >= 0.45  # b was queued behind a's 429 and waited for its Retry-After


def test_timeout_is_retried(stub, tmp_path):
    items = _items(2, 0)
    stub.script(items[0].prompt, ["timeout:1.5", "ok"])
    x = _x(stub, tmp_path, timeout="0.5", max_retries="2")
    res = x.extract_batch(items)
    assert [r.status for r in res] == ["ok", "ok"] and x.stats["timeouts"] == 1


def test_non_json_200_is_retried_then_failed(stub, tmp_path):
    items = _items(2, 0)
    stub.script(items[0].prompt, ["garbage", "ok"])
    stub.script(items[1].prompt, ["garbage"] * 3)
    x = _x(stub, tmp_path, max_retries="2")
    assert [r.status for r in x.extract_batch(items)] == ["ok", "llm_failed"]
    assert x.stats["invalid_responses"] == 4


def test_exhausted_retries_fail_and_are_not_cached(stub, tmp_path):
    items = _items(2, 0)
    stub.script(items[0].prompt, ["500", "500", "500"])
    x = _x(stub, tmp_path, max_retries="2")
    res = x.extract_batch(items)
    assert [r.status for r in res] == ["llm_failed", "ok"]
    assert x.stats["retries"] == 2 and stub.counts["chat"] == 4
    res2 = _x(stub, tmp_path).extract_batch(items)  # rerun: only the failed one is asked again
    assert [r.status for r in res2] == ["ok", "ok"] and stub.counts["chat"] == 5


def test_bad_answers_are_recorded_per_sample_and_cached(stub, tmp_path):
    items = _items(6, 0)
    for it, b in zip(items, ["malformed", "refusal", "length", "notfound"]):
        stub.script(it.prompt, [b])
    stub.script(items[4].prompt, [{"spans": [
        {"text": items[4].response.split("\n")[0], "kind": "operation", "occurrence": 1},
        {"text": "hallucinated 12345", "kind": "result", "occurrence": 1}]}])
    x = _x(stub, tmp_path)
    res = x.extract_batch(items)
    assert [r.status for r in res] == ["llm_malformed", "llm_refused", "llm_malformed", "ok", "ok", "ok"]
    assert res[3].unmatched == 1 and res[3].spans == []
    assert res[4].unmatched == 1 and len(res[4].spans) == 1 and res[4].spans[0].start == 0
    assert x.stats["status_llm_malformed"] == 2 and x.stats["unmatched"] == 2
    res2 = _x(stub, tmp_path).extract_batch(items)  # paid-for answers are not asked again
    assert stub.counts["chat"] == 6 and [r.status for r in res2] == [r.status for r in res]


def test_concurrency_is_bounded(tmp_path):
    with StubOpenAI(latency=0.05, lifetime=60) as s:
        x = _x(s, tmp_path, max_concurrency="4")
        res = x.extract_batch(_items(24, 0))
        assert all(r.status == "ok" for r in res)
        assert 2 <= s.max_inflight <= 4


def test_works_inside_a_running_event_loop(stub, tmp_path):
    items = _items(2, 0)

    async def main():
        return _x(stub, tmp_path).extract_batch(items)

    assert [r.status for r in asyncio.run(main())] == ["ok", "ok"]


# ---- the API key ------------------------------------------------------------------------------
def test_api_key_never_in_errors_logs_repr_or_pickle(stub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    items = _items(1, 0)
    stub.script(items[0].prompt, ["401"])
    x = _x(stub, tmp_path)
    with pytest.raises(LLMConfigError) as ei:
        x.extract_batch(items)
    assert stub.auth_headers[-1] == f"Bearer {KEY}"  # the key was sent, and echoed back by the server
    assert "401" in str(ei.value)
    for text in (str(ei.value), repr(ei.value), caplog.text, repr(x)):
        assert KEY not in text and KEY[8:20] not in text
    assert KEY.encode() not in pickle.dumps(x)
    y = pickle.loads(pickle.dumps(x))  # as a worker process gets it: same cache, same config
    assert y.cache is not None and y.cache.path == x.cache.path and y.config == x.config
    assert redact(f"bad key {KEY[:10]}***abc", KEY) == "bad key sk-***"


def test_missing_key_for_openai_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    x = LLMExtractor(cache_dir=str(tmp_path), api_key_env="OPENAI_API_KEY")
    with pytest.raises(LLMConfigError, match="OPENAI_API_KEY is not set"):
        x.extract_batch(_items(1, 0))


# ---- dry run ------------------------------------------------------------------------------
def test_dry_run_makes_no_request_and_skips_cached(stub, tmp_path):
    items = _items(6, 4)
    _x(stub, tmp_path).extract_batch(items[:3])
    n = stub.counts["requests"]
    x = _x(stub, tmp_path, dry_run="1")
    res = x.extract_batch(items)
    assert stub.counts["requests"] == n and {r.status for r in res} == {"llm_dry_run"}
    est = x.dry_run_estimate
    assert est.selected == 7 and x.stats["dry_run_cached_skipped"] == 3
    assert est.cost_usd("online") > 0 and est.cost_usd("batch") == pytest.approx(est.cost_usd("online") / 2)


# ---- Batch API ----------------------------------------------------------------------------------
def test_chunking_respects_request_and_byte_limits():
    todo = {f"id{i}": {"x": "a" * 100} for i in range(10)}
    chunks = list(chunk_requests(todo, max_requests=4, max_bytes=10_000))
    assert [len(ids) for ids, _ in chunks] == [4, 4, 2]
    chunks = list(chunk_requests(todo, max_requests=50, max_bytes=400))
    assert all(len(blob) <= 400 for _, blob in chunks) and sum(len(i) for i, _ in chunks) == 10
    lines = [json.loads(line) for _, b in chunks for line in b.splitlines()]
    assert all(x["url"] == "/v1/chat/completions" and x["method"] == "POST" for x in lines)
    with pytest.raises(ValueError, match="over the batch file limit"):
        list(chunk_requests(todo, max_requests=5, max_bytes=50))


def test_batch_mode_matches_online_and_fills_the_cache(stub, tmp_path):
    items = _items(10, 6)
    stub.script(items[2].prompt, ["500"])  # fails inside the batch: error file, not cached
    x = _x(stub, tmp_path, mode="batch", batch_poll_interval="0.01", batch_max_requests="7")
    res = x.extract_batch(items)
    assert stub.counts["batches_created"] == 3 and stub.counts["files_uploaded"] == 3
    assert stub.counts["chat"] == 0  # nothing went through the online endpoint
    assert [r.status for r in res].count("llm_failed") == 1 and res[2].status == "llm_failed"
    assert x.stats["batch_answers"] == 15 and x.stats["batch_errors"] == 1
    online = _x(stub, tmp_path / "other").extract_batch(items)
    assert [r.spans for i, r in enumerate(res) if i != 2] == [r.spans for i, r in enumerate(online) if i != 2]
    # Online rerun on the batch cache: only the failed request is sent.
    before = stub.counts["chat"]
    again = _x(stub, tmp_path).extract_batch(items)
    assert stub.counts["chat"] == before + 1 and all(r.status == "ok" for r in again)


def test_batch_rerun_polls_instead_of_resubmitting(tmp_path):
    items = _items(5, 0)
    with StubOpenAI(batch_steps=4, lifetime=60) as s:
        x = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01", batch_max_wait="0")
        with pytest.raises(TimeoutError, match="rerun to resume"):
            x.extract_batch(items)  # "killed" while the batch runs
        assert s.counts["batches_created"] == 1
        y = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01")
        res = y.extract_batch(items)
        assert s.counts["batches_created"] == 1 and y.stats.get("batches_submitted", 0) == 0
        assert all(r.status == "ok" for r in res)
        assert [b.collected for b in y.cache.batches()] == [True]


def test_expired_batch_resubmits_only_the_missing(tmp_path):
    items = _items(4, 0)
    with StubOpenAI(lifetime=60) as s:
        s.expire_markers.add(items[1].prompt)
        x = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01")
        res = x.extract_batch(items)
        assert [r.status for r in res] == ["ok", "llm_failed", "ok", "ok"]
        s.expire_markers.clear()
        res2 = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01").extract_batch(items)
        assert all(r.status == "ok" for r in res2) and s.counts["batches_created"] == 2
        first, second = s.batches.values()  # insertion order
        assert (first["status"], second["status"]) == ("expired", "completed")
        assert (first["request_counts"]["total"], second["request_counts"]["total"]) == (4, 1)


def test_failed_batch_is_reported_and_resubmitted(tmp_path, caplog):
    items = _items(3, 0)
    with StubOpenAI(lifetime=60) as s:
        s.fail_batches = True
        res = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01").extract_batch(items)
        assert [r.status for r in res] == ["llm_failed"] * 3
        assert "token_limit_exceeded" in caplog.text
        s.fail_batches = False
        res = _x(s, tmp_path, mode="batch", batch_poll_interval="0.01").extract_batch(items)
        assert [r.status for r in res] == ["ok"] * 3 and s.counts["batches_created"] == 2


# ---- cache safety -------------------------------------------------------------------------------
def _writer(cache_dir: str, tag: str, n: int) -> None:
    c = AnswerCache(cache_dir)
    for i in range(n):
        c.put(f"{tag}-{i}", CachedAnswer('{"spans": []}', None, "stop", i, 1), model="m", prompt_version="v")


def test_cache_shared_by_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"p{j}", 150)) for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = AnswerCache(tmp_path)
    assert len(c) == 450
    assert c.get_many(["p1-149"])["p1-149"].input_tokens == 149


def test_cache_survives_kill(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]);"
            "from preprocess.extractors.llm.cache import AnswerCache, CachedAnswer\n"
            "c = AnswerCache(sys.argv[1]); i = 0\n"
            "while True:\n"
            "    c.put_many([(f'k{i}-{j}', CachedAnswer('x' * 2000, None, 'stop')) for j in range(50)],"
            " model='m', prompt_version='v'); i += 1\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(REPO)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not (tmp_path / "llm_cache.sqlite").exists() or
                                            len(AnswerCache(tmp_path)) < 500):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    conn = sqlite3.connect(tmp_path / "llm_cache.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert n >= 500 and n % 50 == 0  # whole transactions only


def test_request_key_depends_on_every_request_field():
    it = _items(1, 0)[0]
    x = LLMExtractor(cache_dir="none")
    base = request_key(x.request_body(it))
    assert base == request_key(x.request_body(ExtractInput("another-id", it.prompt, it.response, it.domain)))
    assert base != request_key(LLMExtractor(cache_dir="none", temperature="0.5").request_body(it))
    assert base != request_key(x.request_body(ExtractInput(it.key, it.prompt, it.response + " ", it.domain)))


def test_batch_cli_submit_status_collect_then_online_run_is_free(tmp_path, capsys):
    from preprocess.cli.main import main
    from preprocess.extractors.base import fraction_selected

    items = _items(6, 6)
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": it.key, "prompt": it.prompt, "response": it.response,
                                     "domain": it.domain.name.lower()}) + "\n" for it in items))
    with StubOpenAI(batch_steps=3, lifetime=60) as s:
        opts = ["--option", f"base_url={s.base_url}", "--option", f"cache_dir={tmp_path / 'cache'}",
                "--option", "batch_poll_interval=0.01"]
        sel = ["--input", str(p), "--fraction", "code=0.5"]
        assert main(["batch", "submit", *sel, *opts]) == 0
        assert s.counts["batches_created"] == 1
        assert main(["batch", "status", *opts]) == 0
        assert "\topen" in capsys.readouterr().out
        assert main(["batch", "collect", *sel, *opts]) == 0
        assert s.counts["batches_created"] == 1  # collect polled the submitted batch
        chosen = [it for it in items if it.domain == Domain.MATH or fraction_selected(it.key, 0.5)]
        x = _x(s, tmp_path)
        res = x.extract_batch(chosen)
        assert s.counts["chat"] == 0 and x.stats["cache_hits"] == len(chosen)
        assert all(r.status == "ok" for r in res)
