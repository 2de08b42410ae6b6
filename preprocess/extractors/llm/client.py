"""The paper's LLM span extractor (§2.1) through the OpenAI API or any OpenAI-compatible server.

One request per sample: the instruction and answer go in (``preprocess.extractors.llm.prompts``), verbatim
substrings of the answer come back through strict structured output, and we locate them in the
answer ourselves (exact match first, then whitespace-insensitive; never guessed: spans that are not
found are counted in ``ExtractResult.unmatched``).

What makes it usable on hundreds of thousands of samples:

- a bounded number of requests in flight (``max_concurrency``, an ``asyncio.Semaphore``), our own
  retry loop (the client's is switched off so every retry is counted) with exponential backoff
  that honours ``Retry-After``/``retry-after-ms`` on 429, 5xx, timeouts and connection errors;
  a 429 pauses *all* senders until its Retry-After has passed, instead of each task hammering;
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
from dataclasses import dataclass, field
from typing import Any

import openai

from preprocess.extractors.base import ExtractInput, ExtractResult
from preprocess.extractors.llm.answers import (
    STATUS_DRY_RUN,
    STATUS_FAILED,
    Failure,
    answer_from_completion,
    interpret_answer,
    request_key,
)
from preprocess.extractors.llm.cache import AnswerCache, CachedAnswer
from preprocess.extractors.llm.config import LLMConfig, LLMConfigError, redact, resolve_api_key
from preprocess.extractors.llm.prompts import PROMPT_VERSION, build_request_body

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
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
class _Shared:
    """State shared by the request tasks of one batch: the global 429 pause."""

    pause_until: float = 0.0
    fatal: BaseException | None = None
    stats: Counter = field(default_factory=Counter)


class LLMExtractor:
    """``get_extractor("llm", model=..., base_url=..., mode=..., ...)``; see ``LLMConfig``."""

    name = "llm"

    def __init__(self, **options: Any):
        self.config = LLMConfig(**options)
        c = self.config
        self.version = f"{PROMPT_VERSION}+{c.model}+t{c.temperature:g}"
        cd = c.cache_dir
        self.cache = AnswerCache(cd) if cd and cd.lower() != "none" else None
        self.stats: Counter = Counter()
        self.dry_run_estimate: Any = None  # cost.CostEstimate, summed over dry-run batches

    def __repr__(self) -> str:  # no key in here, ever (it is not even stored)
        c = self.config
        return (f"LLMExtractor(model={c.model!r}, base_url={c.base_url!r}, mode={c.mode!r}, "
                f"version={self.version!r})")

    def __getstate__(self) -> dict[str, Any]:  # picklable for multi-process pipelines
        return {"config": self.config, "version": self.version, "stats": self.stats,
                "dry_run_estimate": self.dry_run_estimate,
                "cache_dir": str(self.cache.path.parent) if self.cache is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config, self.version, self.stats = state["config"], state["version"], state["stats"]
        self.dry_run_estimate = state["dry_run_estimate"]
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
        shared = _Shared()
        sem = asyncio.Semaphore(self.config.max_concurrency)
        out: dict[str, CachedAnswer | Failure] = {}
        client = self._client(api_key)
        try:
            tasks = {asyncio.create_task(self._one(client, sem, shared, k, b, api_key)): k
                     for k, b in todo.items()}
            pending = set(tasks)
            while pending:
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
            self.stats.update(shared.stats)
        return out

    async def _one(self, client: Any, sem: asyncio.Semaphore, shared: _Shared, key: str,
                   body: dict[str, Any], api_key: str) -> CachedAnswer | Failure:
        c = self.config
        last = "unknown error"
        for attempt in range(c.max_retries + 1):
            retry_after: float | None = None
            async with sem:
                # Checked after acquiring the slot, so tasks queued behind a 429 also wait it out.
                wait = shared.pause_until - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                shared.stats["requests"] += 1
                try:
                    resp = await client.chat.completions.create(**body)
                    if not hasattr(resp, "model_dump"):  # a 200 that is not JSON (e.g. a proxy's page)
                        raise ValueError("not a chat completion")
                except (openai.APIResponseValidationError, ValueError):
                    shared.stats["invalid_responses"] += 1
                    last = "invalid response body (not a chat completion)"
                except openai.APITimeoutError:
                    shared.stats["timeouts"] += 1
                    last = f"timeout after {c.timeout:g}s"
                except openai.APIConnectionError as e:
                    shared.stats["connection_errors"] += 1
                    last = redact(f"connection error: {e}", api_key)
                except openai.APIStatusError as e:
                    status = e.status_code
                    msg = redact(f"HTTP {status}: {e.message}", api_key)
                    if status in (401, 403, 404):
                        raise LLMConfigError(f"{msg} (model={c.model!r}, base_url={c.base_url!r}, "
                                             f"key from ${c.api_key_env})") from None
                    if status not in RETRYABLE_STATUS:
                        shared.stats[f"http_{status}"] += 1
                        log.warning("llm request %s… failed permanently: %s", key[:12], msg)
                        return Failure(msg)
                    shared.stats[f"http_{status}"] += 1
                    last = msg
                    retry_after = retry_after_seconds(e.response.headers)
                    if status == 429 and retry_after is not None:
                        shared.pause_until = max(shared.pause_until,
                                                 time.monotonic() + min(retry_after, c.backoff_max))
                else:
                    answer = answer_from_completion(resp)
                    shared.stats["input_tokens"] += answer.input_tokens
                    shared.stats["output_tokens"] += answer.output_tokens
                    if self.cache is not None:
                        self.cache.put(key, answer, model=c.model, prompt_version=PROMPT_VERSION)
                    return answer
            if attempt == c.max_retries:
                break
            shared.stats["retries"] += 1
            if retry_after is not None:
                delay = min(c.backoff_max, retry_after)
            else:
                delay = backoff_seconds(attempt, c)
            await asyncio.sleep(delay)
        log.warning("llm request %s… failed after %d attempts: %s", key[:12], c.max_retries + 1, last)
        return Failure(last)

    def summary(self) -> dict[str, int]:
        """Counters so far: requests, retries, cache_hits, status_*, tokens, http_* ..."""
        return dict(self.stats)


