"""The paper's LLM span extractor (§2.1) through the OpenAI API or any OpenAI-compatible server.

One request per sample: the instruction and answer go in (``preprocess.prompts``), verbatim
substrings of the answer come back through strict structured output, and we locate them in the
answer ourselves (exact match first, then whitespace-insensitive; never guessed: spans that are not
found are counted in ``ExtractResult.unmatched``).

What makes it usable on hundreds of thousands of samples:

- a bounded number of requests in flight (``max_concurrency``, an ``asyncio.Semaphore``), our own
  retry loop (the client's is switched off so every retry is counted) with exponential backoff
  that honours ``Retry-After``/``retry-after-ms`` on 429, 5xx, timeouts and connection errors;
  a 429 pauses *all* senders until its Retry-After has passed, instead of each task hammering;
- a persistent SQLite/WAL cache (``preprocess.llm_cache``) keyed by a hash of the exact request,
  so reruns, crashes and parallel workers never pay twice;
- the Batch API (``mode="batch"``, ``preprocess.llm_batch``), half price, resumable;
- a dry run (``dry_run=True``) that only counts tokens and dollars (``preprocess.cost``), skipping
  samples already in the cache.

The API key is read from the environment variable named by ``api_key_env`` at request time and
never stored on the extractor (datatrove pickles pipelines to disk), logged or put in an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import openai

from preprocess.llm_cache import AnswerCache, CachedAnswer
from preprocess.prompts import KINDS, PROMPT_VERSION, build_request_body
from preprocess.spans import ExtractInput, ExtractResult, Span, register_extractor, validate_spans

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_REFUSED = "llm_refused"
STATUS_MALFORMED = "llm_malformed"
STATUS_FAILED = "llm_failed"
STATUS_DRY_RUN = "llm_dry_run"
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_\-*.]{3,}")


class LLMConfigError(RuntimeError):
    """A problem no retry can fix (bad key, unknown model, missing key variable): stop the run."""


@dataclass(kw_only=True, slots=True)
class LLMConfig:
    """Options of the ``llm`` extractor; strings (from ``--extractor-option k=v``) are converted."""

    model: str = "gpt-4o"
    """Chat model name; part of the cache key and of ``version``."""
    base_url: str | None = None
    """OpenAI-compatible endpoint (e.g. ``http://host:8000/v1``); None = api.openai.com."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself is never an option)."""
    mode: str = "online"
    """'online' (concurrent chat requests) or 'batch' (OpenAI Batch API, half price, ≤ 24 h)."""
    max_concurrency: int = 16
    """Requests in flight at once; raise it to your rate limit (RPM x latency / 60)."""
    max_retries: int = 6
    """Retries per request after 429/5xx/timeouts/connection errors (not counting the first try)."""
    timeout: float = 120.0
    """Seconds per HTTP request before it counts as a (retryable) timeout."""
    backoff_base: float = 1.0
    """First backoff in seconds, doubled each retry, with jitter, when there is no Retry-After."""
    backoff_max: float = 60.0
    """Upper bound on one wait, also applied to a server's Retry-After."""
    cache_dir: str | None = "cache/llm"
    """Folder of the SQLite answer cache; '' or 'none' disables caching (not recommended)."""
    temperature: float = 0.0
    max_output_tokens: int = 4096
    seed: int | None = None
    """Sent as ``seed`` when set (best-effort determinism on OpenAI)."""
    prices: str | None = None
    """'IN,OUT' USD per 1M tokens for the dry-run estimate; default from ``preprocess.cost.PRICES``."""
    dry_run: bool = False
    """Only estimate tokens and cost (for the samples not cached yet); make no request."""
    batch_poll_interval: float = 30.0
    batch_max_wait: float | None = None
    """Seconds to wait for batches before raising (rerun resumes polling); None = up to 24 h."""
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, str) or f.type == "str":
                continue
            if f.type == "str | None":
                setattr(self, f.name, None if v.strip().lower() in ("", "none", "null") else v)
            elif v.strip().lower() in ("none", "null", ""):
                setattr(self, f.name, None)
            elif f.type == "bool":
                if v.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"llm extractor option {f.name}={v!r}: expected true/false")
                setattr(self, f.name, v.strip().lower() in ("1", "true", "yes"))
            else:
                conv = int if "int" in f.type else float
                try:
                    setattr(self, f.name, conv(v))
                except ValueError:
                    raise ValueError(f"llm extractor option {f.name}={v!r}: "
                                     f"expected {conv.__name__}") from None
        if self.mode not in ("online", "batch"):
            raise ValueError(f"llm extractor option mode={self.mode!r}: expected 'online' or 'batch'")
        for name in ("max_concurrency", "max_output_tokens", "batch_max_requests", "batch_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"llm extractor option {name}={getattr(self, name)}: must be >= 1")
        if self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("llm extractor options: max_retries must be >= 0 and timeout > 0")
        if self.prices is not None:
            from preprocess.cost import parse_prices

            parse_prices(self.prices)  # fail at construction, not after hours of work
        if self.cache_dir and self.cache_dir.lower() != "none":
            # absolute, so worker processes started elsewhere share the same file
            self.cache_dir = str(Path(self.cache_dir).expanduser().resolve())
        if self.batch_max_requests > 50_000:
            raise ValueError("batch_max_requests: the Batch API accepts at most 50,000 requests per file")


@dataclass(frozen=True, slots=True)
class Failure:
    """A request that produced no answer after all retries (not cached: a rerun retries it)."""

    reason: str


def request_key(body: Mapping[str, Any]) -> str:
    """Cache key / Batch ``custom_id``: sha256 of the canonical request body plus prompt version.

    The body holds model, messages (prompt version's text, instruction, answer), schema and
    sampling settings, so any change to them is a different key.
    """
    blob = json.dumps({"v": PROMPT_VERSION, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---- locating spans in the response ----------------------------------------------------------
class _Haystack:
    """The response plus a whitespace-free copy with a map back to original offsets."""

    def __init__(self, text: str):
        self.text = text
        pos = [i for i, ch in enumerate(text) if not ch.isspace()]
        self.squeezed = "".join(text[i] for i in pos)
        self.pos = pos

    def find_all(self, needle: str) -> list[tuple[int, int]]:
        """Exact occurrences (overlapping allowed); if none, whitespace-insensitive ones."""
        hits = _find_all(self.text, needle)
        if hits:
            return [(h, h + len(needle)) for h in hits]
        sq = "".join(needle.split())
        if not sq:
            return []
        return [(self.pos[h], self.pos[h + len(sq) - 1] + 1) for h in _find_all(self.squeezed, sq)]


def _find_all(hay: str, needle: str) -> list[int]:
    out, i = [], hay.find(needle)
    while i >= 0 and needle:
        out.append(i)
        i = hay.find(needle, i + 1)
    return out


def locate_spans(response: str, proposed: Sequence[Mapping[str, Any]],
                 allowed_kinds: Sequence[str] = ()) -> tuple[list[Span], int]:
    """Turn the model's ``{"text", "kind", "occurrence"}`` items into spans; count the misses.

    Occurrence policy: ``k >= 1`` takes the k-th match (exact matches are preferred to
    whitespace-insensitive ones); ``0`` takes every match; a ``k`` beyond the number of matches, a
    text not found, an empty text or an ill-typed item counts as unmatched: never guessed.
    """
    hay = _Haystack(response)
    spans: list[Span] = []
    unmatched = 0
    for p in proposed:
        text, occ = (p.get("text"), p.get("occurrence", 1)) if isinstance(p, Mapping) else (None, None)
        if not isinstance(text, str) or not text.strip() or not isinstance(occ, int) or isinstance(occ, bool):
            unmatched += 1
            continue
        kind = p.get("kind")
        if not isinstance(kind, str) or (allowed_kinds and kind not in allowed_kinds):
            kind = "dense"
        hits = hay.find_all(text)
        if occ == 0 and hits:
            spans.extend(Span(s, e, kind) for s, e in hits)
        elif 1 <= occ <= len(hits):
            s, e = hits[occ - 1]
            spans.append(Span(s, e, kind))
        else:
            unmatched += 1
    return spans, unmatched


def interpret_answer(answer: CachedAnswer, item: ExtractInput) -> ExtractResult:
    """Map one API answer to spans and a status (refused / malformed / ok + unmatched)."""
    if answer.refusal or answer.finish_reason == "content_filter":
        return ExtractResult(status=STATUS_REFUSED)
    if answer.finish_reason == "length":  # truncated JSON: never half-parse it
        return ExtractResult(status=STATUS_MALFORMED)
    try:
        data = json.loads(answer.content or "")
    except json.JSONDecodeError:
        return ExtractResult(status=STATUS_MALFORMED)
    if not isinstance(data, dict) or not isinstance(data.get("spans"), list):
        return ExtractResult(status=STATUS_MALFORMED)
    spans, unmatched = locate_spans(item.response, data["spans"], KINDS[item.domain])
    return ExtractResult(spans=validate_spans(spans, item.response), status=STATUS_OK, unmatched=unmatched)


# ---- secrets -----------------------------------------------------------------------------------
def redact(text: str, secret: str | None) -> str:
    """Remove the key (and anything key-shaped, e.g. a server's 'Incorrect API key: sk-ab***')."""
    if secret:
        text = text.replace(secret, "***")
    return _KEYLIKE.sub("sk-***", text)


def resolve_api_key(cfg: LLMConfig) -> str:
    """The key from the environment; local servers without auth get a placeholder."""
    key = os.environ.get(cfg.api_key_env, "")
    if key:
        return key
    if cfg.base_url is None:
        raise LLMConfigError(f"environment variable {cfg.api_key_env} is not set (needed for the OpenAI "
                             "API); set it, or point base_url at an OpenAI-compatible server")
    log.warning("environment variable %s is not set; sending a placeholder key to %s",
                cfg.api_key_env, cfg.base_url)
    return "no-key"


# ---- retry timing ------------------------------------------------------------------------------
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


@register_extractor("llm")
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
        self.dry_run_estimate: Any = None  # preprocess.cost.CostEstimate, summed over dry-run batches

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
                from preprocess.llm_batch import run_batches

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
        from preprocess.cost import estimate_cost

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
                    answer = _answer_from_completion(resp)
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


def _answer_from_completion(resp: Any) -> CachedAnswer:
    """Pull content/refusal/finish reason/usage out of a ChatCompletion (or its JSON dict)."""
    d = resp if isinstance(resp, dict) else resp.model_dump()
    usage = d.get("usage") or {}
    choices = d.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return CachedAnswer(None, None, "no_choices", int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0))
    msg = choices[0].get("message") or {}
    return CachedAnswer(msg.get("content"), msg.get("refusal"), choices[0].get("finish_reason"),
                        int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def answer_from_completion_json(body: Mapping[str, Any]) -> CachedAnswer:
    """Same as for a client response, for the JSON bodies found in Batch API output files."""
    return _answer_from_completion(dict(body))


