"""OpenAI Batch API mode of the LLM extractor: half price, results within 24 h, resumable.

Flow for the requests not in the cache:

1. requests already sitting in a submitted, not yet collected batch (recorded in the cache
   database) are *not* submitted again: we poll their batch;
2. the others are written as JSONL request files within the API limits (≤ 50,000 requests,
   ≤ 200 MB per file), uploaded with ``files.create(purpose="batch")`` and submitted with
   ``batches.create(endpoint="/v1/chat/completions", completion_window="24h")``; each batch id is
   recorded in the same transaction as its request ids, right after creation;
3. every batch is polled with ``batches.retrieve`` until it is terminal; its output and error files
   (``files.content``) are matched back by ``custom_id`` (= the cache key) and the answers land in
   the same cache as online answers, so a later online run, a rerun or another worker reuses them.

A process killed at any point resumes on rerun: uploaded but unsubmitted files are orphaned (they
cost nothing), submitted batches are polled, collected answers come from the cache.  The one
window that can double-submit is between ``batches.create`` returning and the state row being
committed (milliseconds).  Requests that fail inside a batch (or expire) are not cached, so the
next run submits them again.

CLI, for submitting without blocking and collecting later::

    dm-preprocess batch submit  --input data.jsonl --fraction code=0.1,math=0.5 --option cache_dir=c
    dm-preprocess batch status  --option cache_dir=c
    dm-preprocess batch collect --input data.jsonl ...   # waits, fills the cache
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import openai

from preprocess.extractors.llm.answers import Failure, answer_from_completion, transient_problem
from preprocess.extractors.llm.cache import AnswerCache, CachedAnswer
from preprocess.extractors.llm.config import LLMConfig, redact, resolve_api_key
from preprocess.extractors.llm.prompts import PROMPT_VERSION


class BatchOwner(Protocol):
    """What the runner needs of the extractor it works for (``LLMExtractor`` has these)."""

    config: LLMConfig
    cache: AnswerCache | None
    stats: Counter[str]

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def request_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One line of a Batch API input file."""
    rec = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def chunk_requests(todo: Mapping[str, Mapping[str, Any]], max_requests: int,
                   max_bytes: int) -> Iterator[tuple[list[str], bytes]]:
    """Split requests into input files of at most ``max_requests`` lines and ``max_bytes`` bytes."""
    ids: list[str] = []
    buf = io.BytesIO()
    for cid, body in todo.items():
        line = request_line(cid, body)
        if len(line) > max_bytes:
            raise ValueError(f"request {cid[:12]}… is {len(line)} bytes, "
                             f"over the batch file limit {max_bytes}")
        if ids and (len(ids) >= max_requests or buf.tell() + len(line) > max_bytes):
            yield ids, buf.getvalue()
            ids, buf = [], io.BytesIO()
        ids.append(cid)
        buf.write(line)
    if ids:
        yield ids, buf.getvalue()


def parse_output_file(data: bytes, where: str) -> tuple[dict[str, CachedAnswer], dict[str, str]]:
    """Answers (HTTP 200 lines) and per-request errors of a Batch output or error file."""

    answers: dict[str, CachedAnswer] = {}
    errors: dict[str, str] = {}
    for lineno, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            cid = rec["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s:%d: unreadable batch result line skipped", where, lineno)
            continue
        resp = rec.get("response") or {}
        if rec.get("error") or resp.get("status_code") != 200:
            err = rec.get("error") or (resp.get("body") or {}).get("error") or {}
            code = err.get("code") or resp.get("status_code")
            errors[cid] = f"batch: {code}: {err.get('message', '')}"[:300]
            continue
        body = resp.get("body") or {}
        problem = transient_problem(body)
        if problem is not None:  # not an answer: not cached, so the next run resubmits it
            errors[cid] = f"batch: 200 with {problem}"
            continue
        answers[cid] = answer_from_completion(body)
    return answers, errors


class BatchRunner:
    """Submit, poll and collect batches for one extractor configuration."""

    def __init__(self, extractor: BatchOwner, client: Any, cache: AnswerCache):
        self.x = extractor
        self.cfg = extractor.config
        self.client = client
        self.cache = cache

    def submit(self, todo: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Submit requests not already in an open batch; return the ids of all batches involved."""
        open_map = self.cache.open_batches_for(todo)
        fresh = {k: v for k, v in todo.items() if k not in open_map}
        batch_ids = sorted(set(open_map.values()))
        if open_map:
            log.info("batch: %d requests already submitted in %d open batch(es); polling them",
                     len(open_map), len(batch_ids))
        for ids, blob in chunk_requests(fresh, self.cfg.batch_max_requests, self.cfg.batch_max_bytes):
            f = self.client.files.create(file=("requests.jsonl", blob, "application/jsonl"), purpose="batch")
            meta = {"prompt_version": PROMPT_VERSION, "model": self.cfg.model}
            b = self.client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h",
                                           metadata=meta)
            self.cache.record_batch(b.id, f.id, b.status, ids)
            self.x.stats["batches_submitted"] += 1
            self.x.stats["batch_requests_submitted"] += len(ids)
            log.info("batch: submitted %s with %d requests (%.1f MB)", b.id, len(ids), len(blob) / 1e6)
            batch_ids.append(b.id)
        return batch_ids

    def poll_once(self, batch_id: str) -> tuple[bool, dict[str, str]]:
        """Retrieve one batch; if terminal, collect its files into the cache. (done?, errors)"""
        b = self.client.batches.retrieve(batch_id)
        self.x.stats["batch_polls"] += 1
        if b.status not in TERMINAL:
            self.cache.update_batch(batch_id, b.status)
            return False, {}
        errors: dict[str, str] = {}
        answers: dict[str, CachedAnswer] = {}
        for fid in (b.output_file_id, b.error_file_id):
            if fid:
                data = self.client.files.content(fid).content
                a, e = parse_output_file(data, f"batch {batch_id} file {fid}")
                answers.update(a)
                errors.update(e)
        if answers:
            self.cache.put_many(list(answers.items()), model=self.cfg.model, prompt_version=PROMPT_VERSION,
                                source="batch")
            for a in answers.values():
                self.x.stats["input_tokens"] += a.input_tokens
                self.x.stats["output_tokens"] += a.output_tokens
        self.x.stats["batch_answers"] += len(answers)
        self.x.stats["batch_errors"] += len(errors)
        self.cache.update_batch(batch_id, b.status, collected=True)
        if b.status != "completed":
            why = "; ".join(f"{e.code}: {e.message}" for e in (getattr(b.errors, "data", None) or [])[:3])
            log.warning("batch %s ended %s%s; %d answers collected, the rest is resubmitted on rerun",
                        batch_id, b.status, f" ({why})" if why else "", len(answers))
        return True, errors

    def wait(self, batch_ids: list[str], max_wait: float | None) -> dict[str, str]:
        """Poll until every batch is terminal and collected; errors by custom_id."""
        deadline = None if max_wait is None else time.monotonic() + max_wait
        pending = list(dict.fromkeys(batch_ids))
        errors: dict[str, str] = {}
        while pending:
            still = []
            for bid in pending:
                done, e = self.poll_once(bid)
                errors.update(e)
                if not done:
                    still.append(bid)
            pending = still
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batches still running after {max_wait:g}s: {pending}; "
                                   "rerun to resume polling (nothing is resubmitted)")
            log.info("batch: %d batch(es) still running; next poll in %gs", len(pending),
                     self.cfg.batch_poll_interval)
            time.sleep(self.cfg.batch_poll_interval)
        return errors


def run_batches(extractor: BatchOwner,
                todo: Mapping[str, Mapping[str, Any]]) -> dict[str, CachedAnswer | Failure]:
    """Batch-mode body of ``LLMExtractor.extract_batch``: submit/poll/collect, answers by key."""
    if extractor.cache is None:
        raise ValueError("mode=batch needs cache_dir: batch state and results live in the cache")
    api_key = resolve_api_key(extractor.config)
    c = extractor.config
    client = openai.OpenAI(api_key=api_key, base_url=c.base_url, timeout=c.timeout, max_retries=c.max_retries)
    try:
        runner = BatchRunner(extractor, client, extractor.cache)
        ids = runner.submit(todo)
        errors = runner.wait(ids, c.batch_max_wait)
    except openai.APIStatusError as e:
        msg = f"Batch API call failed: HTTP {e.status_code}: {e.message}"
        raise RuntimeError(redact(msg, api_key)) from None
    finally:
        client.close()
    got = extractor.cache.get_many(todo)
    out: dict[str, CachedAnswer | Failure] = dict(got)
    for k in todo:
        if k not in got:
            out[k] = Failure(errors.get(k, "batch: no result for this request"))
    return out
