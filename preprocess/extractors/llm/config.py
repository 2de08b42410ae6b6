"""Options of the LLM extractor (``LLMConfig``) and handling of its API key (never stored or logged)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from preprocess.extractors.base import ExtractorError

log = logging.getLogger(__name__)

_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_\-*.]{3,}")


class LLMConfigError(ExtractorError):
    """A problem no retry can fix (bad key, unknown model, missing key variable): stop the run."""


class FailureBudgetError(ExtractorError):
    """Too many requests or samples failed (``max_failure_rate``): stop before writing a shard."""


OUTPUT_OPTIONS = frozenset({"model", "temperature", "seed", "max_output_tokens"})
"""The options that change what is written (they are in the request, hence the answer); every other
option is operational (where and how fast to ask) and stays out of the output fingerprint."""


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
    """Requests in flight at once on this machine, all worker processes together (``limits``)."""
    requests_per_minute: float | None = None
    """Requests per minute on this machine, all processes together; None = no limit."""
    tokens_per_minute: float | None = None
    """Input + output tokens per minute on this machine, all processes together; None = no limit."""
    limits_dir: str | None = None
    """Folder of the shared limit files (lock files); None = the system's temporary folder."""
    max_failure_rate: float = 0.05
    """Stop the run when more than this share of requests (after ``failure_budget_after`` requests)
    or of a shard's requested samples failed; 1 disables the budget."""
    failure_budget_after: int = 100
    """Requests of a shard before the request share is checked (the sample share is checked always)."""
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
    """'IN,OUT' USD per 1M tokens for the dry-run estimate; default from ``cost.PRICES``."""
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
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"llm extractor option max_failure_rate={self.max_failure_rate}: "
                             "expected a share in [0, 1]")
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"llm extractor option {name}={getattr(self, name)}: must be > 0")
        if self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("llm extractor options: max_retries must be >= 0 and timeout > 0")
        if self.prices is not None:
            from preprocess.extractors.llm.cost import parse_prices

            parse_prices(self.prices)  # fail at construction, not after hours of work
        if self.cache_dir and self.cache_dir.lower() != "none":
            # absolute, so worker processes started elsewhere share the same file
            self.cache_dir = str(Path(self.cache_dir).expanduser().resolve())
        if self.batch_max_requests > 50_000:
            raise ValueError("batch_max_requests: the Batch API accepts at most 50,000 requests per file")


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
