"""The ``confidence`` extractor: the tokens a diffusion LM finds hardest are the dense ones.

The paper names model-confidence priority as future work: instead of rules or GPT-4o, let the model
itself say where the information is.  For each response we run the masked-diffusion forward pass
``passes`` times: pass ``2k`` masks each response token with probability ``mask_rate`` (seeded per
sample key, so the choice does not depend on batching), pass ``2k + 1`` masks exactly the
complement, so every token is predicted at least once from a half-masked context.  A token's score
is its mean masked-token cross-entropy (``score="loss"``) or the mean entropy of the predicted
distribution (``score="entropy"``), and the top ``share`` of response tokens by score (per domain,
by default the paper's GPT-4o rho: code 0.25, math 0.31) become the spans, in characters of the
response through the tokenizer's offsets.

Any model :func:`trainer.modeling.load_model` loads works: ``model="tiny"`` (the random-initialised
default: its scores are noise, which the agreement benchmark shows) or a checkpoint path / hub id
(LLaDA, Dream, LLaDA2, an exported run).  ``device="auto"`` takes a GPU when there is one.  The
trainer (and torch) is imported when the first batch is extracted, never at import time, so the
preprocessor stays light; the model is not pickled with the extractor (pipeline workers load it).

``status`` is ``"ok"``, ``"truncated"`` (the response was longer than ``max_length`` tokens; its tail
is never marked) or ``"empty_response"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from preprocess.extractors.base import PAPER_RHO, ExtractInput, ExtractResult, Span, validate_spans
from preprocess.shards import Domain


@dataclass(kw_only=True)
class ConfidenceConfig:
    """Options, ``get_extractor("confidence", **options)``; strings (``--extractor-option``) are converted."""

    model: str = "tiny"
    """``tiny`` or any checkpoint path / hub id :func:`trainer.modeling.load_model` accepts."""
    tokenizer: str | None = None
    """Tokenizer when the checkpoint has none (default: the model's own)."""
    share_code: float = PAPER_RHO[Domain.CODE]
    share_math: float = PAPER_RHO[Domain.MATH]
    share_other: float = (PAPER_RHO[Domain.CODE] + PAPER_RHO[Domain.MATH]) / 2
    """Share of response tokens to mark, per domain."""
    passes: int = 4
    """Forward passes per response; pairs of complementary maskings, so even numbers cover every token."""
    mask_rate: float = 0.5
    score: str = "loss"
    """``loss`` (cross-entropy of the true token) or ``entropy`` (of the predicted distribution)."""
    prompt: bool = True
    """Condition on the prompt (unmasked) in front of the response."""
    batch_size: int = 16
    """Rows (response x pass) per forward pass."""
    max_length: int = 1024
    """Tokens per row; the prompt is cut from the left first, then the response's tail."""
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, str) or f.type in ("str", "str | None"):
                continue
            conv = {"int": int, "float": float, "bool": _to_bool}[f.type]
            try:
                setattr(self, f.name, conv(v))
            except ValueError:
                raise ValueError(f"confidence extractor option {f.name}={v!r}: expected {f.type}") from None
        if self.score not in ("loss", "entropy"):
            raise ValueError(f"confidence extractor option score={self.score!r}: expected loss or entropy")
        if self.passes < 1 or self.batch_size < 1 or self.max_length < 2 or not 0.0 < self.mask_rate < 1.0:
            raise ValueError("confidence extractor: need passes, batch_size >= 1, max_length >= 2 and "
                             "0 < mask_rate < 1")
        for name in ("share_code", "share_math", "share_other"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"confidence extractor option {name}={getattr(self, name)}: expected 0..1")

    def share(self, domain: Domain) -> float:
        return {Domain.CODE: self.share_code, Domain.MATH: self.share_math}.get(domain, self.share_other)


def _to_bool(v: str) -> bool:
    if v.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(v)
    return v.strip().lower() in ("1", "true", "yes")


@dataclass(slots=True)
class _Row:
    """One forward pass of one response: its ids and which response tokens it masks."""

    item: int
    ids: list[int]
    start: int  # index of the first response token in ids
    masked: Any  # torch.BoolTensor [n_response]


class ConfidenceExtractor:
    """Highest masked-token loss (or entropy) under a diffusion LM, up to a share per domain."""

    name = "confidence"

    def __init__(self, **options: Any) -> None:
        self.config = ConfidenceConfig(**options)
        c = self.config
        # 2: spans carry their loss/entropy as Span.score (the rho budget's priority)
        self.version = (f"2+{c.model}+{c.score}+p{c.passes}r{c.mask_rate:g}+s{c.seed}+"
                        f"share{c.share_code:g},{c.share_math:g},{c.share_other:g}+L{c.max_length}"
                        + ("" if c.prompt else "+noprompt"))
        self._bundle: Any = None

    def __getstate__(self) -> dict[str, Any]:  # pipeline workers pickle the extractor: not the model
        return {"config": asdict(self.config), "version": self.version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config, self.version, self._bundle = ConfidenceConfig(**state["config"]), state["version"], None

    def _load(self) -> Any:
        if self._bundle is None:
            import torch

            from trainer.modeling import load_model  # lazy: preprocess must not import the trainer

            c = self.config
            bundle = load_model(c.model, tokenizer=c.tokenizer, dtype=getattr(torch, c.dtype), seed=c.seed)
            device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
            bundle.model.to(device).eval()
            self._bundle, self._device = bundle, torch.device(device)
        return self._bundle

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        import torch

        bundle = self._load()
        c, tok = self.config, bundle.tokenizer
        results: list[ExtractResult | None] = [None] * len(items)
        rows: list[_Row] = []
        offsets: dict[int, list[tuple[int, int]]] = {}
        truncated: set[int] = set()
        for i, it in enumerate(items):
            if not isinstance(it.response, str):
                raise TypeError(f"sample {it.key!r}: response must be str, got {type(it.response).__name__}")
            if not it.response.strip():
                results[i] = ExtractResult(status="empty_response")
                continue
            enc = tok(it.response, add_special_tokens=False, return_offsets_mapping=True)
            resp, off = enc["input_ids"][: c.max_length - 1], enc["offset_mapping"][: c.max_length - 1]
            if len(resp) < len(enc["input_ids"]):
                truncated.add(i)
            head = tok(it.prompt, add_special_tokens=False)["input_ids"] if c.prompt and it.prompt else []
            head = head[len(head) - (c.max_length - len(resp)):] if head else []
            offsets[i] = off
            for m in _maskings(it.key, len(resp), c):
                rows.append(_Row(i, head + resp, len(head), m))
        scores = {i: torch.zeros(len(off)) for i, off in offsets.items()}
        counts = {i: torch.zeros(len(off)) for i, off in offsets.items()}
        rows.sort(key=lambda r: len(r.ids))  # similar lengths per batch: less padding
        with torch.inference_mode():
            for b in range(0, len(rows), c.batch_size):
                batch = rows[b:b + c.batch_size]
                for r, sc in zip(batch, self._score_rows(batch, bundle)):
                    scores[r.item] += sc
                    counts[r.item] += r.masked.float()
        for i, off in offsets.items():
            results[i] = ExtractResult(spans=_top_spans(scores[i], counts[i], off, c.share(items[i].domain),
                                                        items[i].response),
                                       status="truncated" if i in truncated else "ok")
        return [r if r is not None else ExtractResult() for r in results]

    def _score_rows(self, batch: list[_Row], bundle: Any) -> list[Any]:
        """Per row, the score of every response token where it is masked (0 elsewhere)."""
        import torch

        from trainer.modeling import call_model

        n = max(len(r.ids) for r in batch)
        pad = bundle.tokenizer.pad_token_id
        pad = bundle.eos_token_id if pad is None else pad
        ids = torch.full((len(batch), n), pad, dtype=torch.long)  # [B, L]
        keep = torch.zeros(len(batch), n, dtype=torch.bool)  # [B, L] real tokens
        target = torch.full((len(batch), n), -100, dtype=torch.long)  # [B, L] true id where masked
        for k, r in enumerate(batch):
            row = torch.tensor(r.ids, dtype=torch.long)
            pos = torch.arange(len(r.masked)) + r.start
            target[k, pos[r.masked]] = row[pos[r.masked]]
            row[pos[r.masked]] = bundle.mask_token_id
            ids[k, : len(r.ids)] = row
            keep[k, : len(r.ids)] = True
        dev = self._device
        attn = keep[:, None, None, :].expand(len(batch), 1, n, n).to(dev)  # [B, 1, L, L] bidirectional
        positions = torch.arange(n).expand(len(batch), n).to(dev)  # [B, L]
        logits = call_model(bundle.model, input_ids=ids.to(dev), attention_mask=attn,
                            position_ids=positions).float()  # [B, L, V]
        logp = torch.log_softmax(logits, dim=-1)  # [B, L, V]
        if self.config.score == "loss":
            tok_score = -logp.gather(-1, target.clamp(min=0).to(dev)[..., None])[..., 0]  # [B, L]
        else:
            tok_score = -(logp.exp() * logp).sum(-1)  # [B, L] entropy
        tok_score = tok_score.cpu() * (target >= 0)
        return [tok_score[k, r.start: r.start + len(r.masked)] for k, r in enumerate(batch)]


def _maskings(key: str, n: int, c: ConfidenceConfig) -> list[Any]:
    """``c.passes`` boolean masks over ``n`` response tokens: random ones and their complements."""
    import torch

    out = []
    for p in range(c.passes):
        if p % 2:
            out.append(~out[-1])
            continue
        h = hashlib.blake2b(f"{c.seed}:{key}:{p}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))
        out.append(torch.rand(n, generator=g) < c.mask_rate)
    return out


def _top_spans(score: Any, count: Any, offsets: list[tuple[int, int]], share: float, text: str) -> list[Span]:
    """The ``share`` of tokens with the highest mean score, as merged character spans."""
    import torch

    n = len(offsets)
    k = round(share * n)
    if k == 0 or n == 0:
        return []
    mean = torch.where(count > 0, score / count.clamp(min=1), torch.tensor(float("-inf")))  # [n]
    order = sorted(range(n), key=lambda t: (-float(mean[t]), t))[:k]  # ties: earlier token first
    # score: the token's mean loss/entropy (a merged run keeps its highest): the rho budget's priority
    spans = [Span(offsets[t][0], offsets[t][1], "confidence", float(mean[t])) for t in sorted(order)
             if offsets[t][1] > offsets[t][0]]
    return validate_spans(spans, text)
