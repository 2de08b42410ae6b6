"""Tokenization and span alignment: character spans of the response -> per-token INFO_DENSE marks.

A token is marked when the character range it covers overlaps a marked span (half-open ranges).

Where do token character ranges come from?  The tokenizer's offset mapping is the obvious source,
but byte-level BPE offsets have known quirks (huggingface/tokenizers #1517, #1553, #1688 and
older #156/#3796-style reports): leading spaces included or trimmed depending on
``trim_offsets``/post-processor settings, several byte tokens of one multi-byte character sharing
(or shifting) a range.  So for byte-level BPE tokenizers without a normalizer we do not trust the
offsets at all: each token id maps to an exact byte string (the GPT-2 byte alphabet is
invertible), the cumulative byte lengths give exact byte ranges, and spans are converted from
characters to bytes instead.  This is checked per sample (the token bytes must add up to the
UTF-8 length of the text); any mismatch falls back to validated offsets and is counted.  Other
families (SentencePiece/Metaspace, WordPiece with normalizers) use offsets, which are validated
(inside the text, start <= end) before use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.extractors.base import Span


class AlignmentError(ValueError):
    """Offsets that cannot describe the text they claim to (out of range, end before start)."""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable-character table used by every ByteLevel tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _has_byte_level(component: dict[str, Any] | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    if component.get("type") == "Sequence":
        return any(_has_byte_level(c) for c in component.get("pretokenizers", component.get("decoders", [])))
    return False


def byte_length_table(backend: Any) -> np.ndarray | None:
    """Exact UTF-8 byte length of every token id for byte-level BPE tokenizers, else ``None``.

    ``None`` when the tokenizer normalises text (lengths would no longer add up to the input) or
    is not byte-level; callers then use validated offsets.
    """
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        return None
    if not _has_byte_level(spec.get("pre_tokenizer")):
        return None
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = max([*vocab.values(), *added.keys()]) + 1
    table = np.zeros(size, dtype=np.int64)
    for tok, i in vocab.items():
        try:
            table[i] = len(bytes(decoder[c] for c in tok))
        except KeyError:
            return None  # a vocab entry outside the byte alphabet: not a pure byte-level vocab
    for i, added_tok in added.items():
        if added_tok.lstrip or added_tok.rstrip:
            return None  # these swallow neighbouring whitespace, so lengths would not add up
        table[i] = len(added_tok.content.encode("utf-8"))
    return table


def char_to_byte_positions(text: str) -> np.ndarray:
    """``pos[c]`` = byte offset of character ``c`` in UTF-8 (length ``len(text) + 1``)."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    lead = np.flatnonzero((b & 0xC0) != 0x80)
    return np.concatenate([lead, [len(b)]]).astype(np.int64)


def mark_overlaps(tok_starts: np.ndarray, tok_ends: np.ndarray, span_starts: np.ndarray,
                  span_ends: np.ndarray) -> np.ndarray:
    """Bool per token: does ``[tok_start, tok_end)`` overlap any span?  Spans sorted and disjoint.

    A zero-width token (some special/added tokens) counts as the point ``[s, s+1)``.
    Vectorised: for each token, the first span ending after the token's start is the only
    candidate; it overlaps iff it starts before the token's end.
    """
    if len(span_starts) == 0 or len(tok_starts) == 0:
        return np.zeros(len(tok_starts), dtype=bool)
    ends = np.maximum(tok_ends, tok_starts + 1)
    k = np.searchsorted(span_ends, tok_starts, side="right")
    inside = k < len(span_ends)
    k = np.minimum(k, len(span_ends) - 1)
    return inside & (span_starts[k] < ends)


def validate_offsets(offsets: np.ndarray, text_len: int) -> None:
    if offsets.size == 0:
        return
    s, e = offsets[:, 0], offsets[:, 1]
    if (s < 0).any() or (e > text_len).any() or (s > e).any():
        bad = int(np.flatnonzero((s < 0) | (e > text_len) | (s > e))[0])
        raise AlignmentError(f"token {bad} has offsets {tuple(offsets[bad])} for a text of {text_len} chars")


@dataclass(frozen=True, slots=True)
class AlignResult:
    dense: np.ndarray  # bool per response token
    method: str  # "bytes" (exact), "offsets" (validated tokenizer offsets), "none" (no spans)


def spans_to_arrays(spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray]:
    return (np.fromiter((s.start for s in spans), dtype=np.int64, count=len(spans)),
            np.fromiter((s.end for s in spans), dtype=np.int64, count=len(spans)))


def _token_bounds(ids: np.ndarray, offsets: Sequence[tuple[int, int]] | None, text: str,
                  spans: Sequence[Span], byte_table: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(token starts, token ends, span starts, span ends, method)`` in one unit: exact bytes when the
    byte lengths add up to the text, else validated tokenizer offsets (characters)."""
    ss, se = spans_to_arrays(spans)
    n = len(ids)
    if byte_table is not None and n and int(ids.max()) < len(byte_table):
        blen = byte_table[ids]
        t_end = np.cumsum(blen)
        if int(t_end[-1]) == len(text.encode("utf-8")):
            if not text.isascii():
                pos = char_to_byte_positions(text)
                ss, se = pos[ss], pos[se]
            return t_end - blen, t_end, ss, se, "bytes"
    if offsets is None:
        raise AlignmentError("no offsets available and byte lengths do not add up to the text")
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    validate_offsets(off, len(text))
    return off[:, 0], off[:, 1], ss, se, "offsets"


def align_spans(ids: np.ndarray, offsets: Sequence[tuple[int, int]] | None, text: str, spans: Sequence[Span],
                byte_table: np.ndarray | None) -> AlignResult:
    """INFO_DENSE mark per token of ``text`` for validated, merged ``spans`` (character indices)."""
    if not spans:
        return AlignResult(np.zeros(len(ids), dtype=bool), "none")
    ts, te, ss, se, method = _token_bounds(ids, offsets, text, spans, byte_table)
    return AlignResult(mark_overlaps(ts, te, ss, se), method)


def span_tokens(ids: np.ndarray, offsets: Sequence[tuple[int, int]] | None, text: str, spans: Sequence[Span],
                byte_table: np.ndarray | None) -> list[np.ndarray]:
    """Per span of ``spans`` (validated, merged), the indices of the tokens of ``text`` it overlaps.

    The same tokens :func:`align_spans` marks, span by span: their union is its ``dense`` (a token
    on the edge of two spans belongs to both; a zero-width token counts as ``[s, s+1)``, as in
    :func:`mark_overlaps`).  Byte bounds are non-decreasing, so each span's tokens are one run found
    by binary search; offsets need not be, so there every span is compared with every token.
    """
    if not spans:
        return []
    ts, te, ss, se, _ = _token_bounds(ids, offsets, text, spans, byte_table)
    ends = np.maximum(te, ts + 1)
    if len(ts) < 2 or ((np.diff(ts) >= 0).all() and (np.diff(ends) >= 0).all()):
        first = np.searchsorted(ends, ss, side="right")
        end = np.searchsorted(ts, se, side="left")
        return [np.arange(a, max(a, b)) for a, b in zip(first.tolist(), end.tolist())]
    return [np.flatnonzero((ts < b) & (ends > a)) for a, b in zip(ss.tolist(), se.tolist())]


_SENTINELS = ("\x00dm-sentinel-A\x00", " \n dm sentinel B \t ")


class TokenizerSpec:
    """Everything a shard worker needs from the tokenizer, resolved once and picklable.

    The driver loads the HF tokenizer once (``TokenizerBundle``) and ships this to the workers, so
    a worker neither imports ``transformers`` (seconds per process) nor touches the hub, and every
    shard -- also on SLURM nodes started hours later -- uses the very same tokenizer definition.
    ``transformers`` is loaded lazily in a worker only for prompts that need a real Jinja render
    (``messages`` input, or templates that transform their content).
    """

    # A plain class, not a dataclass: datatrove writes its executor (and this) to executor.json,
    # where a dataclass would be expanded field by field -- megabytes of tokenizer JSON.
    def __init__(self, *, name_or_path: str, backend_json: str, vocab_size: int, eos_id: int,
                 bos_id: int | None, pad_id: int | None, mask_id: int | None, has_chat_template: bool,
                 use_chat_template: bool, affixes: tuple[str, str] | None, byte_table: np.ndarray | None,
                 fingerprint_hex: str) -> None:
        self.name_or_path = name_or_path
        self.backend_json = backend_json
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.has_chat_template = has_chat_template
        self.use_chat_template = use_chat_template
        self.affixes = affixes
        self.byte_table = byte_table
        self.fingerprint_hex = fingerprint_hex

    def __repr__(self) -> str:
        return f"TokenizerSpec({self.name_or_path!r}, fingerprint={self.fingerprint_hex[:16]})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_backend", None)
        state.pop("_hf_tokenizer", None)
        return state

    @property
    def backend(self) -> Any:
        b = self.__dict__.get("_backend")
        if b is None:
            from tokenizers import Tokenizer

            b = self.__dict__["_backend"] = Tokenizer.from_str(self.backend_json)
            b.no_truncation()  # a tokenizer.json may carry truncation/padding; we need every token
            b.no_padding()
        return b

    def _hf(self) -> Any:
        hf = self.__dict__.get("_hf_tokenizer")
        if hf is None:
            from transformers import AutoTokenizer

            hf = self.__dict__["_hf_tokenizer"] = AutoTokenizer.from_pretrained(self.name_or_path)
        return hf

    def render_prompt(self, prompt: str | None, messages: list[dict[str, str]] | None) -> str:
        """Prompt text: chat-template user turn(s) with the generation prompt, or the raw prompt."""
        if messages is not None:
            if not self.has_chat_template:
                raise ValueError("messages input needs a tokenizer with a chat template")
            return self._hf().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt is not None
        if not self.use_chat_template:
            return prompt
        if self.affixes is not None:
            return self.affixes[0] + prompt + self.affixes[1]
        return self._hf().apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=False)

    def fingerprint(self) -> str:
        return self.fingerprint_hex

    def info(self) -> dict[str, Any]:
        return {
            "name_or_path": self.name_or_path,
            "fingerprint": self.fingerprint_hex,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "bos_token_id": self.bos_id,
            "mask_token_id": self.mask_id,
            "chat_template_used": self.use_chat_template,
            "alignment": "bytes" if self.byte_table is not None else "offsets",
        }


class TokenizerBundle:
    """The target model's HF tokenizer (driver side), with what the pipeline needs precomputed.

    - ``render_prompt``: chat-template prompt text.  The template is rendered once around sentinels;
      if the result is verifiably ``prefix + content + suffix`` for two different sentinels (i.e.
      the template does not transform the content), later prompts are built by concatenation,
      which is ~100x cheaper than a Jinja render per record.  Otherwise every prompt is rendered.
    - ``byte_table``: exact byte lengths for byte-level BPE (see module docstring).
    - ``spec()``: the picklable subset shipped to shard workers.
    """

    def __init__(self, name_or_path: str | Path, use_chat_template: bool = True) -> None:
        from transformers import AutoTokenizer

        self.name_or_path = str(name_or_path)
        self.hf = AutoTokenizer.from_pretrained(self.name_or_path)
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{name_or_path}: need a fast (Rust `tokenizers`) tokenizer for offsets")
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.vocab_size = len(self.hf)
        self.eos_id = self.hf.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{name_or_path}: tokenizer has no eos_token; responses must end with EOS")
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))
        self.use_chat_template = use_chat_template and self.has_chat_template
        self.byte_table = byte_length_table(backend)
        self._affixes = self._chat_affixes() if self.use_chat_template else None

    def _chat_affixes(self) -> tuple[str, str] | None:
        def render(content: str) -> str:
            return self.hf.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)

        a = render(_SENTINELS[0])
        if a.count(_SENTINELS[0]) != 1:
            return None
        prefix, suffix = a.split(_SENTINELS[0])
        if render(_SENTINELS[1]) != prefix + _SENTINELS[1] + suffix:
            return None
        return prefix, suffix

    def render_prompt(self, prompt: str | None, messages: list[dict[str, str]] | None) -> str:
        return self.spec().render_prompt(prompt, messages) if messages is None else \
            self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def fingerprint(self) -> str:
        """sha256 over the full tokenizer definition and chat template: any change invalidates caches."""
        h = hashlib.sha256(self.backend.to_str().encode("utf-8"))
        h.update((getattr(self.hf, "chat_template", None) or "").encode("utf-8"))
        return h.hexdigest()

    def spec(self) -> TokenizerSpec:
        spec = self.__dict__.get("_spec")
        if spec is None:
            spec = self.__dict__["_spec"] = TokenizerSpec(
                name_or_path=self.name_or_path, backend_json=self.backend.to_str(),
                vocab_size=self.vocab_size,
                eos_id=self.eos_id, bos_id=self.hf.bos_token_id, pad_id=self.hf.pad_token_id,
                mask_id=getattr(self.hf, "mask_token_id", None), has_chat_template=self.has_chat_template,
                use_chat_template=self.use_chat_template, affixes=self._affixes, byte_table=self.byte_table,
                fingerprint_hex=self.fingerprint())
            spec.__dict__["_backend"] = self.backend
            spec.__dict__["_hf_tokenizer"] = self.hf
        return spec

    def info(self) -> dict[str, Any]:
        return self.spec().info()
