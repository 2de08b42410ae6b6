"""The LLM extractor's operational safety, end to end through the real ``openai`` client against the
local fault-injecting stub server: transient answers, the failure budget (also through
``dm-preprocess run``), limits shared by worker processes, the dry run, operational options out of
the fingerprint and ``--retry-failed``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.assets import SAMPLE_PATH
from preprocess.cli.main import main
from preprocess.extractors.base import ExtractInput, ExtractorError
from preprocess.extractors.llm.config import FailureBudgetError
from preprocess.extractors.llm.limits import BURST_SECONDS, SharedLimits
from preprocess.extractors.registry import get_extractor
from preprocess.pipeline.config import PreprocessConfig
from preprocess.pipeline.driver import run_pipeline
from preprocess.shards import INDEX_FILE, Domain

try:
    from tests.openai_stub_server import StubOpenAI
except ImportError:  # tests/ is on sys.path under pytest's default import mode
    from openai_stub_server import StubOpenAI

REPO = Path(__file__).resolve().parents[1]
FAST = {"backoff_base": 0.01}  # retries without the production backoff


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-operations-0123456789")


@pytest.fixture
def stub():
    with StubOpenAI(lifetime=120, max_requests=5000) as s:
        yield s


def _records(n_math: int, n_code: int) -> list[dict]:
    recs = [json.loads(line) for line in SAMPLE_PATH.open(encoding="utf-8") if line.strip()]
    return ([r for r in recs if r["domain"] == "math"][:n_math] +
            [r for r in recs if r["domain"] == "code"][:n_code])


def _items(n_math: int, n_code: int = 0) -> list[ExtractInput]:
    return [ExtractInput(r["id"], r["prompt"], r["response"], Domain.parse(r["domain"]))
            for r in _records(n_math, n_code)]


def _x(stub: StubOpenAI, tmp_path: Path, **kw):
    opts = dict(base_url=stub.base_url, cache_dir=str(tmp_path / "cache"),
                limits_dir=str(tmp_path / "limits"), max_concurrency=8, **FAST)
    opts.update(kw)
    return get_extractor("llm", **opts)


def _input(tmp_path: Path, n_math: int = 12, n_code: int = 4) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _records(n_math, n_code)), encoding="utf-8")
    return p


def _options(stub_url: str, tmp_path: Path, cache: str = "cache", **kw) -> dict:
    return {"base_url": stub_url, "cache_dir": str(tmp_path / cache), "limits_dir": str(tmp_path / "limits"),
            **FAST, **kw}


def _cfg(inp: Path, out: Path, options: dict, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[inp], output_dir=out, extractor="llm", extractor_options=options,
                            num_shards=kw.pop("num_shards", 3), workers=kw.pop("workers", 1), **kw)


def _cli_options(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--extractor-option", f"{k}={v}")]


def _closed_port_url() -> str:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _data_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


# ---- transient answers ------------------------------------------------------------------------
def test_answers_without_a_choice_are_retried_and_never_cached(stub, tmp_path):
    items = _items(4)
    stub.script(items[0].prompt, ["empty_choices", "ok"])
    stub.script(items[1].prompt, ["error200", "reset", "ok"])
    stub.script(items[2].prompt, ["empty_choices"] * 3)
    x = _x(stub, tmp_path, max_retries=2)
    res = x.extract_batch(items)
    assert [r.status for r in res] == ["ok", "ok", "llm_failed", "ok"]
    assert x.stats["empty_choices"] == 4 and x.stats["error_body"] == 1
    assert x.stats["connection_errors"] == 1 and x.stats["failed_requests"] == 6
    assert len(x.cache) == 3  # the empty answers were not stored ...
    again = _x(stub, tmp_path).extract_batch(items)  # ... so a rerun asks for exactly that one again
    assert [r.status for r in again] == ["ok"] * 4 and stub.counts["chat"] == 9 + 1


def test_batch_results_without_an_answer_are_resubmitted_not_cached(stub, tmp_path):
    items = _items(4)
    stub.script(items[0].prompt, ["empty_choices"])
    stub.script(items[1].prompt, ["error200"])
    opts = dict(mode="batch", batch_poll_interval=0.01, max_failure_rate=1)
    res = _x(stub, tmp_path, **opts).extract_batch(items)
    assert [r.status for r in res] == ["llm_failed", "llm_failed", "ok", "ok"]
    again = _x(stub, tmp_path, **opts).extract_batch(items)
    assert [r.status for r in again] == ["ok"] * 4
    assert [b["request_counts"]["total"] for b in stub.batches.values()] == [4, 2]


# ---- failure budget ---------------------------------------------------------------------------
def test_failure_budget_stops_after_the_first_hundred_requests(stub, tmp_path):
    items = _items(60)
    stub.script("<answer>", ["500"] * 10_000)  # every request of every sample
    x = _x(stub, tmp_path, max_retries=6)
    with pytest.raises(FailureBudgetError) as ei:
        x.extract_batch(items)
    msg = str(ei.value)
    m = re.search(r"(\d+) of (\d+) requests failed \(by kind: http_500 (\d+)\)", msg)
    assert "\n" not in msg and m and m.group(1) == m.group(3) and int(m.group(2)) >= 100
    assert 100 <= stub.counts["chat"] <= 100 + 2 * 8  # stopped at once (plus what was in flight)


def test_failure_budget_is_configurable(stub, tmp_path):
    items = _items(30)
    for it in items[:3]:  # 10 % of the samples fail for good
        stub.script(it.prompt, ["500"] * 3)
    x = _x(stub, tmp_path, max_retries=2, max_failure_rate=0.35, failure_budget_after=30)
    res = x.extract_batch(items)  # 9 of 36 requests failed: under 35 %
    assert [r.status for r in res].count("llm_failed") == 3
    x.check_publishable()
    y = _x(stub, tmp_path / "y", max_retries=0, max_failure_rate=0.05)
    for it in items[:3]:
        stub.script(it.prompt, ["500"])
    y.extract_batch(items)  # 3 of 30 requests failed: the request share needs 100 requests first
    with pytest.raises(FailureBudgetError, match="3 of 30 samples got no answer"):
        y.check_publishable()  # but a shard with 10 % lost samples is not written


@pytest.mark.slow  # two pipeline runs
def test_wrong_port_stops_the_run_and_a_rerun_completes(stub, tmp_path, capsys):
    inp, out = _input(tmp_path), tmp_path / "out"
    bad = _options(_closed_port_url(), tmp_path, max_retries=1)
    run = ["run", "--input", str(inp), "--output", str(out), "--extractor", "llm", "--num-shards", "3",
           "--workers", "1"]
    assert main([*run, *_cli_options(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: llm extractor: ") and "connection_errors" in err[-1]
    assert not list(out.glob("shard_*.json")) and not (out / INDEX_FILE).exists()  # nothing looks done
    # Same folder, right port (an operational option): runs, and the summary shows what was asked.
    good = _options(stub.base_url, tmp_path, max_retries=1)
    assert main([*run, *_cli_options(good)]) == 0
    text = capsys.readouterr().out
    assert "extractor requests: 16 (retries 0, cache hits 0 of 16 samples)" in text
    assert "failed requests 0" in text and "WARNING" not in text
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["extract_status"] == {"ok": 16} and index["domains"]["math"]["rho"] > 0.1


def test_summary_warns_loudly_when_rho_is_near_zero(stub, tmp_path, capsys):
    inp, out = _input(tmp_path, 6, 0), tmp_path / "out"
    stub.script("<answer>", ["notfound"] * 100)  # the model quotes text that is not in the answer
    opts = _options(stub.base_url, tmp_path)
    assert main(["run", "--input", str(inp), "--output", str(out), "--extractor", "llm", "--num-shards", "1",
                 "--workers", "1", *_cli_options(opts)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "WARNING: domain math: rho 0.0000 over 6 extracted samples" in text
    assert "extractor requests: 6" in text
    assert main(["stats", str(out)]) == 0
    assert "WARNING: domain math" in " ".join(capsys.readouterr().out.split())


# ---- limits shared by the worker processes ------------------------------------------------------
@pytest.mark.slow  # a pool of two worker processes
def test_concurrency_limit_holds_across_worker_processes(tmp_path):
    inp = _input(tmp_path, 24, 0)
    with StubOpenAI(latency=0.15, lifetime=120) as s:
        opts = _options(s.base_url, tmp_path, max_concurrency=3)
        assert main(["run", "--input", str(inp), "--output", str(tmp_path / "out"), "--extractor", "llm",
                     "--num-shards", "2", "--workers", "2", *_cli_options(opts)]) == 0
        assert s.counts["chat"] == 24
        # Two workers with 3 each would put 6 in flight; the machine-wide slots allow 3.
        assert 2 <= s.max_inflight <= 3


def test_slots_and_pause_are_shared_and_freed_when_a_holder_dies(tmp_path):
    # Two objects open their own files, so their flock locks conflict like two processes'.
    with (SharedLimits(tmp_path, "http://h/v1", "m", max_concurrency=2) as a,
          SharedLimits(tmp_path, "http://h/v1", "m", max_concurrency=2) as b):
        assert a.try_slot() is not None and a.try_slot() is not None
        assert b.try_slot() is None  # both slots of the machine are taken
        a.release_slot(0)
        assert b.try_slot() == 0
        a.pause(2.0)  # a 429 seen by one process ...
        assert 1.0 < b.pause_left() <= 2.0 and b.reserve(0) > 1.0  # ... holds the other one too
    code = ("import sys, time; sys.path.insert(0, sys.argv[2])\n"
            "from preprocess.extractors.llm.limits import SharedLimits\n"
            "x = SharedLimits(sys.argv[1], 'http://h/v1', 'm', max_concurrency=1).__enter__()\n"
            "assert x.try_slot() == 0; print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(REPO)], stdout=subprocess.PIPE)
    with SharedLimits(tmp_path, "http://h/v1", "m", max_concurrency=1) as c:
        try:
            assert p.stdout.readline().strip() == b"held"
            assert c.try_slot() is None
        finally:
            os.kill(p.pid, signal.SIGKILL)  # killed while holding its slot ...
            p.wait()
        assert c.try_slot() == 0  # ... which the kernel released


def test_requests_and_tokens_per_minute(stub, tmp_path):
    items = _items(30)
    rpm = 600.0  # 10 per second after a burst of one second's worth
    x = _x(stub, tmp_path, requests_per_minute=rpm)
    x.extract_batch(items)
    times = sorted(t for t, _ in stub.arrivals)
    expected = (len(items) - 1 - rpm / 60 * BURST_SECONDS) / (rpm / 60)  # 1.9 s
    assert times[-1] - times[0] >= expected - 0.25  # less the first connection's set-up
    before = len(stub.arrivals)
    tokens = _items(6)
    per_request = stub.prompt_tokens[next(u for _, u in stub.arrivals if tokens[0].prompt in u)]
    y = _x(stub, tmp_path / "y", tokens_per_minute=per_request * 60 * 2)  # about 2 requests per second
    y.extract_batch(tokens)
    t = sorted(t for t, _ in stub.arrivals[before:])
    # 3 ride the burst (one second's worth, counted before sending), then 0.5 s apart and more:
    # the answers' tokens are charged when they arrive.
    assert len(t) == 6 and t[-1] - t[0] >= 1.4


# ---- dry run ----------------------------------------------------------------------------------
def test_dry_run_prints_the_estimate_and_writes_nothing(stub, tmp_path, capsys):
    inp, out = _input(tmp_path), tmp_path / "out"
    opts = _options(stub.base_url, tmp_path)
    run = ["run", "--input", str(inp), "--output", str(out), "--extractor", "llm", *_cli_options(opts)]
    assert main([*run, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 16 samples selected, 0 already in the cache" in text and "$" in text
    assert not out.exists() and not (tmp_path / "cache").exists() and stub.counts["requests"] == 0
    assert main([*run, "--extractor-option", "dry_run=true"]) == 0  # the option means the same
    assert not out.exists()
    _x(stub, tmp_path).extract_batch(_items(4))  # answers in the cache are free
    assert main([*run, "--dry-run"]) == 0
    assert "4 already in the cache" in capsys.readouterr().out
    files = sorted(tmp_path.rglob("*"))
    assert main(["cost", "--input", str(inp), "--model", "gpt-4o"]) == 0  # the corpus-level estimate
    assert "gpt-4o" in capsys.readouterr().out and sorted(tmp_path.rglob("*")) == files
    with pytest.raises(ExtractorError, match="writes no shards"):  # the API refuses to write one too
        run_pipeline(_cfg(inp, out, {**opts, "dry_run": True}, num_shards=1))
    assert not list(out.glob("shard_*.json"))


# ---- reruns: operational options, --retry-failed ------------------------------------------------
def test_retry_failed_rewrites_only_those_shards_byte_identical_to_a_clean_run(stub, tmp_path):
    inp = _input(tmp_path, 12, 6)
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_pipeline(_cfg(inp, clean, _options(stub.base_url, tmp_path, cache="clean_cache")))
    first = _records(12, 6)[0]  # the first line lands in shard 0
    stub.script(first["prompt"], ["500"])
    flaky = _options(stub.base_url, tmp_path, max_retries=0, max_failure_rate=1)
    run_pipeline(_cfg(inp, out, flaky))
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["extract_status"]["llm_failed"] == 1
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    # Other concurrency, timeout and cache folder: the same output, so nothing is rebuilt.
    calm = _options(stub.base_url, tmp_path, cache="cache2", max_concurrency=2, timeout=30)
    n = stub.counts["chat"]
    run_pipeline(_cfg(inp, out, calm))
    assert stub.counts["chat"] == n
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")} == before
    # --retry-failed: shard 0 is rebuilt (one request: the rest come from the cache), 1 and 2 are not.
    run_pipeline(_cfg(inp, out, {**flaky, "max_failure_rate": 0.05}, retry_failed=True))
    assert stub.counts["chat"] == n + 1
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    assert {k for k in after if after[k] != before[k]} == {k for k in after if k.startswith("shard_00000")}
    assert _data_files(out) == _data_files(clean)
