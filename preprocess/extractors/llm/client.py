"""The paper's LLM span extractor (§2.1) through the OpenAI API or any OpenAI-compatible server.

One request per sample: the instruction and answer go in (``preprocess.extractors.llm.prompts``), verbatim
substrings of the answer come back through strict structured output, and we locate them in the
answer ourselves (exact match first, then whitespace-insensitive; never guessed: spans that are not
found are counted in ``ExtractResult.unmatched``).

What makes it usable on hundreds of thousands of samples:

- limits that hold for all worker processes on the machine (``preprocess.extractors.llm.limits``):
  requests in flight (``max_concurrency``), requests and tokens per minute, and a 429's pause of
  *all* senders until its Retry-After has passed; our own retry loop (the client's is switched off
  so every retry is counted) with exponential backoff that honours ``Retry-After``/``retry-after-ms``
  on 429, 5xx, timeouts, connection errors and 200s that are not answers (error bodies, no choices);
- a failure budget (``max_failure_rate``): when too many requests fail (a wrong port, a dead
  server) the run stops with ``FailureBudgetError`` instead of writing samples without spans;
- a persistent SQLite/WAL cache (``preprocess.extractors.llm.cache``) keyed by a hash of the exact request,
  so reruns, crashes and parallel workers never pay twice;
- the Batch API (``mode="batch"``, ``preprocess.extractors.llm.batch``), half price, resumable;
- a dry run (``dry_run=True``) that only counts tokens and dollars
  (``preprocess.extractors.llm.cost``), skipping
  samples already in the cache.

The API key is read from the environment variable named by ``api_key_env`` at request time and
never stored on the extractor (datatrove pickles pipelines to disk), logged or put in an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import openai

from preprocess.extractors.base import ExtractInput, ExtractorError, ExtractResult
from preprocess.extractors.llm.answers import (
    STATUS_DRY_RUN,
    STATUS_FAILED,
    Failure,
    answer_from_completion,
    interpret_answer,
    request_key,
    transient_problem,
)
from preprocess.extractors.llm.cache import CACHE_FILENAME, AnswerCache, CachedAnswer
from preprocess.extractors.llm.config import (
    OUTPUT_OPTIONS,
    FailureBudgetError,
    LLMConfig,
    LLMConfigError,
    redact,
    resolve_api_key,
)
from preprocess.extractors.llm.limits import SharedLimits
from preprocess.extractors.llm.prompts import PROMPT_VERSION, build_request_body

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
FAILURE_KINDS = ("connection_errors", "timeouts", "invalid_responses", "error_body", "empty_choices")
"""Counters of failed requests besides ``http_<status>`` (a 429 is pacing, not a failure)."""
SLOT_POLL_SECONDS = 0.01


def failure_counts(stats: Mapping[str, int]) -> dict[str, int]:
    """Failed requests by kind, from an extractor's counters (``summary()``)."""
    return {k: v for k, v in sorted(stats.items())
            if v and (k in FAILURE_KINDS or (k.startswith("http_") and k != "http_429"))}

def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms``, ``retry-after`` (seconds or HTTP date); None if absent."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_seconds(attempt: int, cfg: LLMConfig) -> float:
    """Exponential backoff with full jitter in [base*2^a / 2, base*2^a], capped."""
    d = min(cfg.backoff_max, cfg.backoff_base * (2 ** attempt))
    return d / 2 + random.random() * d / 2


def _run_coro(coro: Any) -> Any:
    """Run a coroutine from sync code, also when the caller already sits in an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ---- the extractor ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Miss:
    """One attempt that brought no answer: the counter it goes to and whether a retry may help."""

    kind: str
    message: str
    retryable: bool = True
    retry_after: float | None = None


class LLMExtractor:
    """``get_extractor("llm", model=..., base_url=..., mode=..., ...)``; see ``LLMConfig``."""

    name = "llm"
    operational_options = frozenset(f.name for f in fields(LLMConfig)) - OUTPUT_OPTIONS
    """Options that do not change the output: kept out of the shard fingerprint."""
    retryable_statuses = frozenset({STATUS_FAILED})
    """Sample statuses a rerun may turn into answers (``--retry-failed``): failures are not cached."""

    def __init__(self, **options: Any):
        self.config = LLMConfig(**options)
        c = self.config
        self.version = f"{PROMPT_VERSION}+{c.model}+t{c.temperature:g}"
        cd = c.cache_dir
        self.cache = None
        if cd and cd.lower() != "none" and (not c.dry_run or (Path(cd) / CACHE_FILENAME).is_file()):
            self.cache = AnswerCache(cd)  # a dry run reads an existing cache and creates none
        self.limits = SharedLimits(c.limits_dir, c.base_url or "https://api.openai.com/v1", c.model,
                                   max_concurrency=c.max_concurrency, rpm=c.requests_per_minute,
                                   tpm=c.tokens_per_minute)
        self.stats: Counter = Counter()
        self.dry_run_estimate: Any = None  # cost.CostEstimate, summed over dry-run batches

    def __repr__(self) -> str:  # no key in here, ever (it is not even stored)
        c = self.config
        return (f"LLMExtractor(model={c.model!r}, base_url={c.base_url!r}, mode={c.mode!r}, "
                f"version={self.version!r})")

    def __getstate__(self) -> dict[str, Any]:  # picklable for multi-process pipelines
        return {"config": self.config, "version": self.version, "stats": self.stats,
                "dry_run_estimate": self.dry_run_estimate, "limits": self.limits,
                "cache_dir": str(self.cache.path.parent) if self.cache is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config, self.version, self.stats = state["config"], state["version"], state["stats"]
        self.dry_run_estimate, self.limits = state["dry_run_estimate"], state["limits"]
        self.cache = AnswerCache(state["cache_dir"]) if state["cache_dir"] else None

    def request_body(self, item: ExtractInput) -> dict[str, Any]:
        c = self.config
        return build_request_body(item, model=c.model, temperature=c.temperature,
                                  max_output_tokens=c.max_output_tokens, seed=c.seed)

    # -- public entry point --
    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        """Spans for every item, in order; cached answers first, the rest from the API."""
        bodies = [self.request_body(it) for it in items]
        keys = [request_key(b) for b in bodies]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        todo: dict[str, dict[str, Any]] = {}
        for k, b in zip(keys, bodies):
            if k not in cached:
                todo.setdefault(k, b)
        self.stats["samples"] += len(items)
        self.stats["cache_hits"] += len(items) - sum(k not in cached for k in keys)

        if self.config.dry_run:
            return self._dry_run(items, keys, cached)
        answers: dict[str, CachedAnswer | Failure] = dict(cached)
        if todo:
            if self.config.mode == "batch":
                from preprocess.extractors.llm.batch import run_batches

                answers.update(run_batches(self, todo))
            else:
                answers.update(_run_coro(self._run_online(todo)))
        results = []
        for it, k in zip(items, keys):
            a = answers.get(k, Failure("no answer"))
            r = ExtractResult(status=STATUS_FAILED) if isinstance(a, Failure) else interpret_answer(a, it)
            self.stats[f"status_{r.status}"] += 1
            self.stats["unmatched"] += r.unmatched
            results.append(r)
        log.info("llm extractor: %d samples, %d cached, %d requested; totals %s",
                 len(items), len(items) - len(todo), len(todo), dict(self.stats))
        return results

    # -- failure budget --
    def check_failure_budget(self, *, final: bool = False) -> None:
        """Raise ``FailureBudgetError`` when more than ``max_failure_rate`` of the requests (once
        ``failure_budget_after`` were sent) or, with ``final``, of the samples sent failed."""
        c, s = self.config, self.stats
        requests, failed = s["requests"], s["failed_requests"]
        asked, lost = s["samples"] - s["cache_hits"], s[f"status_{STATUS_FAILED}"]
        if requests >= c.failure_budget_after and failed > c.max_failure_rate * requests:
            what = f"{failed} of {requests} requests failed"
        elif final and asked > 0 and lost > c.max_failure_rate * asked:
            what = f"{lost} of {asked} samples got no answer ({failed} of {requests} requests failed)"
        else:
            return
        kinds = ", ".join(f"{k} {v}" for k, v in failure_counts(s).items()) or "none"
        raise FailureBudgetError(
            f"llm extractor: {what} (by kind: {kinds}), more than max_failure_rate={c.max_failure_rate:g}; "
            f"stopped before writing the shard. Check base_url={c.base_url!r} and model={c.model!r}; "
            f"failures are not cached, so a rerun asks only for them")

    def check_publishable(self) -> None:
        """Pipeline hook, called before a shard is written: raise if these results must not be."""
        if self.config.dry_run:
            raise ExtractorError("llm extractor: dry_run=true only estimates the cost and writes no "
                                 "shards; use 'dm-preprocess run --dry-run' or 'dm-preprocess cost'")
        self.check_failure_budget(final=True)

    # -- dry run --
    def _dry_run(self, items: Sequence[ExtractInput], keys: Sequence[str],
                 cached: Mapping[str, CachedAnswer]) -> list[ExtractResult]:
        from preprocess.extractors.llm.cost import estimate_cost

        c = self.config
        seen: set[str] = set()
        fresh = []
        for it, k in zip(items, keys):
            if k not in cached and k not in seen:
                seen.add(k)
                fresh.append(it)
        est = estimate_cost(fresh, c.model, None, c.prices, c.mode, preselected=True,
                            max_output_tokens=c.max_output_tokens)
        if self.dry_run_estimate is None:
            self.dry_run_estimate = est
        else:
            for name, t in est.per_domain.items():
                acc = self.dry_run_estimate.per_domain.setdefault(name, type(t)())
                acc.items += t.items
                acc.selected += t.selected
                acc.input_tokens += t.input_tokens
                acc.output_tokens += t.output_tokens
        self.stats["dry_run_cached_skipped"] += len(items) - len(fresh)
        log.info("llm dry run (cumulative; %d cached samples skipped):\n%s",
                 self.stats["dry_run_cached_skipped"], self.dry_run_estimate.format())
        return [ExtractResult(status=STATUS_DRY_RUN) for _ in items]

    # -- online mode --
    def _client(self, api_key: str, *, sync: bool = False) -> Any:
        c = self.config
        cls = openai.OpenAI if sync else openai.AsyncOpenAI
        # max_retries=0: our loop retries, so each retry is counted and the 429 pause is shared.
        return cls(api_key=api_key, base_url=c.base_url, timeout=c.timeout, max_retries=0)

    async def _run_online(self, todo: Mapping[str, dict[str, Any]]) -> dict[str, CachedAnswer | Failure]:
        api_key = resolve_api_key(self.config)
        sem = asyncio.Semaphore(self.config.max_concurrency)  # this process's share of the slots
        polling = asyncio.Lock()  # one task per process polls the shared slots at a time
        count = self._token_counter()
        out: dict[str, CachedAnswer | Failure] = {}
        client = self._client(api_key)
        try:
            with self.limits:  # the shared limit files, open for this batch
                tasks = {asyncio.create_task(self._one(client, sem, polling, k, b, api_key, count(b))): k
                         for k, b in todo.items()}
                pending = set(tasks)
                while pending:  # the first exception (401, failure budget) cancels the rest
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                    for t in done:
                        if t.exception() is not None:
                            for p in pending:
                                p.cancel()
                            await asyncio.gather(*pending, return_exceptions=True)
                            raise t.exception()
                        out[tasks[t]] = t.result()
        finally:
            await client.close()
        return out

    def _token_counter(self) -> Any:
        """Input tokens of a request body, for the tokens-per-minute limit (0 when there is none)."""
        if self.config.tokens_per_minute is None:
            return lambda body: 0
        from preprocess.extractors.llm.cost import (
            count_body_input_tokens,
            encoding_name_for_model,
            load_encoding,
        )

        enc = load_encoding(encoding_name_for_model(self.config.model)[0])
        return lambda body: count_body_input_tokens(body, enc)

    async def _one(self, client: Any, sem: asyncio.Semaphore, polling: asyncio.Lock, key: str,
                   body: dict[str, Any], api_key: str, tokens: int) -> CachedAnswer | Failure:
        c = self.config
        last = "unknown error"
        for attempt in range(c.max_retries + 1):
            async with sem:
                async with polling:
                    while (slot := self.limits.try_slot()) is None:
                        await asyncio.sleep(SLOT_POLL_SECONDS)
                try:
                    # Waited out holding the slot, so requests queued behind a 429 also wait.
                    wait = self.limits.reserve(tokens)
                    while wait > 0:
                        await asyncio.sleep(wait)
                        wait = self.limits.pause_left()
                    self.stats["requests"] += 1
                    got = await self._send(client, body, api_key)
                finally:
                    self.limits.release_slot(slot)
            if isinstance(got, CachedAnswer):
                self.stats["input_tokens"] += got.input_tokens
                self.stats["output_tokens"] += got.output_tokens
                self.limits.charge_tokens(got.output_tokens)
                if self.cache is not None:
                    self.cache.put(key, got, model=c.model, prompt_version=PROMPT_VERSION)
                return got
            self.stats[got.kind] += 1
            last = got.message
            if got.kind == "http_429":
                if got.retry_after is not None:
                    self.limits.pause(min(got.retry_after, c.backoff_max))
            else:
                self.stats["failed_requests"] += 1
                self.check_failure_budget()
            if not got.retryable:
                log.warning("llm request %s… failed permanently: %s", key[:12], last)
                return Failure(last)
            if attempt == c.max_retries:
                break
            self.stats["retries"] += 1
            delay = min(c.backoff_max, got.retry_after) if got.retry_after is not None \
                else backoff_seconds(attempt, c)
            await asyncio.sleep(delay)
        log.warning("llm request %s… failed after %d attempts: %s", key[:12], c.max_retries + 1, last)
        return Failure(last)

    async def _send(self, client: Any, body: dict[str, Any], api_key: str) -> CachedAnswer | _Miss:
        """One attempt: the answer, or what went wrong (a 401/403/404 raises ``LLMConfigError``)."""
        c = self.config
        try:
            resp = await client.chat.completions.create(**body)
        except openai.APIResponseValidationError:
            return _Miss("invalid_responses", "invalid response body (not a chat completion)")
        except openai.APITimeoutError:
            return _Miss("timeouts", f"timeout after {c.timeout:g}s")
        except openai.APIConnectionError as e:
            return _Miss("connection_errors", redact(f"connection error: {e}", api_key))
        except openai.APIStatusError as e:
            status = e.status_code
            msg = redact(f"HTTP {status}: {e.message}", api_key)
            if status in (401, 403, 404):
                raise LLMConfigError(f"{msg} (model={c.model!r}, base_url={c.base_url!r}, "
                                     f"key from ${c.api_key_env})") from None
            return _Miss(f"http_{status}", msg, status in RETRYABLE_STATUS,
                         retry_after_seconds(e.response.headers))
        if not hasattr(resp, "model_dump"):  # a 200 that is not JSON (e.g. a proxy's page)
            return _Miss("invalid_responses", "invalid response body (not a chat completion)")
        d = resp.model_dump()
        problem = transient_problem(d)
        if problem is not None:
            return _Miss(problem, f"HTTP 200 without an answer ({problem})")
        return answer_from_completion(d)

    def summary(self) -> dict[str, int]:
        """Counters so far: requests, retries, failed_requests, cache_hits, status_*, tokens, http_* ..."""
        return dict(self.stats)
