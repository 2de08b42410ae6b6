"""What comes back from the LLM: request keys, answer statuses, and spans located in the response.

Shared by the online client (``preprocess.extractors.llm.client``) and the Batch API runner
(``preprocess.extractors.llm.batch``); split from the client so that neither imports the other's
module for these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from preprocess.extractors.base import ExtractInput, ExtractResult, Span, validate_spans
from preprocess.extractors.llm.cache import CachedAnswer
from preprocess.extractors.llm.prompts import KINDS, PROMPT_VERSION

STATUS_OK = "ok"
STATUS_REFUSED = "llm_refused"
STATUS_MALFORMED = "llm_malformed"
STATUS_FAILED = "llm_failed"
STATUS_DRY_RUN = "llm_dry_run"


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


def transient_problem(d: Mapping[str, Any]) -> str | None:
    """Why an HTTP 200 body is not an answer, or None: ``error_body`` (an error object, as proxies
    and some servers send for a 5xx) or ``empty_choices`` (no choice at all).  Both are usually
    passing server faults, so they are retried and never cached."""
    if d.get("error"):
        return "error_body"
    choices = d.get("choices")
    if not choices or not isinstance(choices[0], Mapping):
        return "empty_choices"
    return None


def answer_from_completion(d: Mapping[str, Any]) -> CachedAnswer:
    """Content/refusal/finish reason/usage of a chat completion's JSON dict that has a choice
    (``transient_problem`` is None)."""
    usage = d.get("usage") or {}
    choices = d["choices"]
    msg = choices[0].get("message") or {}
    return CachedAnswer(msg.get("content"), msg.get("refusal"), choices[0].get("finish_reason"),
                        int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
