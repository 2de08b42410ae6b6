"""Cost estimate for the LLM extractor before spending anything (``--dry-run``).

Input tokens are counted exactly as the extractor will send them: the same messages
(``preprocess.extractors.llm.prompts.build_messages``) tokenised with the model's ``tiktoken``
encoding, plus the
chat-format framing (3 tokens per message, 3 to prime the reply, as in OpenAI's token-counting
guide) and the JSON schema of the structured output (how the server charges the schema is not
published; counting its JSON text is our stated approximation).  Output tokens cannot be known in
advance: they are modelled from the paper's measured dense fraction (rho_code ~ 0.25,
rho_math ~ 0.31 of the answer) plus the JSON framing per span; override with ``output_ratio``.

tiktoken normally downloads its rank files on first use; here they are loaded from
``preprocess/assets/tiktoken`` (sha256-verified) so the estimate works with no network.

CLI (input read through ``preprocess.records``, like ``dm-preprocess run``)::

    dm-preprocess cost --input data.jsonl --model gpt-4o --fraction code=0.1,math=0.5 --mode both \
        [--prices 2.5,10] [--scale code=436000,math=7473]
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from typing import Any

import tiktoken

from preprocess.assets import ASSETS_DIR
from preprocess.extractors.base import ExtractInput, fraction_for, fraction_selected, parse_fractions
from preprocess.extractors.llm.prompts import PROMPT_VERSION, build_messages, response_format
from preprocess.shards import Domain

TIKTOKEN_DIR = ASSETS_DIR / "tiktoken"

# Values from tiktoken_ext/openai_public.py (tiktoken 0.14); a test checks that an encoding built
# from these equals tiktoken's own, loaded offline through TIKTOKEN_CACHE_DIR.
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
ENCODINGS: dict[str, dict[str, Any]] = {
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": _O200K_PAT,
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    },
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": _CL100K_PAT,
        "special_tokens": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                           "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    },
}

# USD per 1M tokens (input, output), standard online list prices; Batch API = BATCH_DISCOUNT x.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_DISCOUNT = 0.5
# Paper §3: average per-sample dense proportion of the answer.
DENSE_RATIO: dict[Domain, float] = {Domain.CODE: 0.25, Domain.MATH: 0.31, Domain.OTHER: 0.25}
TOKENS_PER_SPAN_TEXT = 8  # typical span length in tokens ("if n % 2 == 0", "3 * 12 = 36")
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3


# ---- encodings -----------------------------------------------------------------------------
@cache
def load_encoding(name: str) -> tiktoken.Encoding:
    """Build a tiktoken encoding from the shipped, hash-checked rank file (never downloads)."""
    if name not in ENCODINGS:
        raise ValueError(f"no offline copy of tiktoken encoding {name!r}; shipped: {sorted(ENCODINGS)}")
    spec = ENCODINGS[name]
    path = TIKTOKEN_DIR / f"{name}.tiktoken.gz"
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} != expected {spec['sha256']} (corrupt or wrong file)")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if not ranks:
        raise ValueError(f"{path}: empty rank file")
    return tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=dict(spec["special_tokens"]))


def encoding_name_for_model(model: str) -> tuple[str, bool]:
    """(encoding, exact?) for a model; unknown models (e.g. local servers) get o200k_base, flagged."""
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base", False
    if name in ENCODINGS:
        return name, True
    return "o200k_base", False


def count_message_tokens(messages: Iterable[Mapping[str, str]], enc: tiktoken.Encoding) -> int:
    """Prompt tokens of a chat request, per OpenAI's guide (3 per message + content + role, +3)."""
    n = TOKENS_REPLY_PRIMING
    for m in messages:
        n += TOKENS_PER_MESSAGE
        for k, v in m.items():
            n += len(enc.encode(v, disallowed_special=()))
            if k == "name":
                n += 1
    return n


def count_request_input_tokens(item: ExtractInput, enc: tiktoken.Encoding) -> int:
    """Input tokens of the extractor's request for one sample: messages + schema JSON."""
    messages = build_messages(item)
    fixed = _fixed_tokens(enc.name, item.domain, messages[0]["content"])  # same for every sample
    return fixed + count_message_tokens(messages[1:], enc) - TOKENS_REPLY_PRIMING


def count_body_input_tokens(body: Mapping[str, Any], enc: tiktoken.Encoding) -> int:
    """Input tokens of a request body as it is sent: messages + the JSON schema of its answer."""
    schema = json.dumps(body["response_format"]["json_schema"], separators=(",", ":"))
    return count_message_tokens(body["messages"], enc) + len(enc.encode(schema))


@lru_cache(maxsize=64)
def _fixed_tokens(enc_name: str, domain: Domain, system: str) -> int:
    """System message + reply priming + schema: identical for all samples of a domain, counted once."""
    enc = load_encoding(enc_name)
    schema = json.dumps(response_format(domain)["json_schema"], separators=(",", ":"))
    return count_message_tokens([{"role": "system", "content": system}], enc) + len(enc.encode(schema))


def estimate_output_tokens(item: ExtractInput, enc: tiktoken.Encoding, *, output_ratio: float | None = None,
                           max_output_tokens: int | None = None) -> int:
    """Modelled answer length: dense share of the response plus per-span JSON framing."""
    ratio = DENSE_RATIO[item.domain] if output_ratio is None else output_ratio
    dense = ratio * len(enc.encode(item.response, disallowed_special=()))
    n_spans = math.ceil(dense / TOKENS_PER_SPAN_TEXT)
    per_span = _span_overhead_tokens(enc.name, item.domain)
    n = math.ceil(dense) + n_spans * per_span + 6  # '{"spans":[' ... ']}'
    return min(n, max_output_tokens) if max_output_tokens else n


@cache
def _span_overhead_tokens(enc_name: str, domain: Domain) -> int:
    from preprocess.extractors.llm.prompts import KINDS

    enc = load_encoding(enc_name)
    return len(enc.encode(json.dumps({"text": "", "kind": KINDS[domain][0], "occurrence": 1}) + ","))


# ---- prices and options ----------------------------------------------------------------------
def price_for(model: str, prices: Any = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens: user override, else the table by longest model prefix."""
    if prices is not None and prices != "":
        return parse_prices(prices)
    best = max((k for k in PRICES if model == k or model.startswith(k + "-")), key=len, default=None)
    return PRICES[best] if best else None


def parse_prices(value: Any) -> tuple[float, float]:
    """Accept (in, out), {"input": .., "output": ..}, "2.5,10" or "input=2.5,output=10"."""
    try:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if all("=" in p for p in parts):
                value = {k.strip(): v for k, v in (p.split("=", 1) for p in parts)}
            else:
                value = parts
        if isinstance(value, Mapping):
            pin, pout = float(value["input"]), float(value["output"])
        else:
            pin, pout = (float(x) for x in value)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"prices={value!r}: expected 'IN,OUT' or 'input=IN,output=OUT' "
                         "(USD per 1M tokens)") from e
    if pin < 0 or pout < 0:
        raise ValueError(f"prices={value!r}: negative price")
    return pin, pout


# ---- the estimate ----------------------------------------------------------------------------
@dataclass(slots=True)
class DomainTally:
    items: int = 0
    selected: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class CostEstimate:
    """Token counts and dollars for the selected samples; ``notes`` states every approximation."""

    model: str
    encoding: str
    mode: str
    prompt_version: str
    input_price: float | None
    output_price: float | None
    per_domain: dict[str, DomainTally] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fractions: dict[str, float] | None = None
    """Per-domain selection fractions applied (None when the caller pre-selected)."""

    @property
    def selected(self) -> int:
        return sum(t.selected for t in self.per_domain.values())

    @property
    def input_tokens(self) -> int:
        return sum(t.input_tokens for t in self.per_domain.values())

    @property
    def output_tokens(self) -> int:
        return sum(t.output_tokens for t in self.per_domain.values())

    def cost_usd(self, mode: str | None = None) -> float | None:
        """Dollars for ``mode`` ('online' or 'batch'; default: the estimate's own mode)."""
        if self.input_price is None or self.output_price is None:
            return None
        factor = BATCH_DISCOUNT if (mode or self.mode) == "batch" else 1.0
        return factor * (self.input_tokens * self.input_price + self.output_tokens * self.output_price) / 1e6

    def scaled(self, counts: Mapping[str | Domain, int]) -> CostEstimate:
        """Project to a corpus with ``counts`` samples per domain, using this estimate's averages
        per *selected* sample; selected = count x fraction (the measured selected/items share when
        the fractions are unknown), so hash-selection noise of a small sample is not scaled up."""
        out = CostEstimate(self.model, self.encoding, self.mode, self.prompt_version, self.input_price,
                           self.output_price, notes=list(self.notes), fractions=self.fractions)
        for key, n in counts.items():
            name = Domain.parse(key).name.lower()
            t = self.per_domain.get(name)
            if t is None or t.items == 0 or t.selected == 0:
                raise ValueError(f"cannot scale domain {name!r}: no selected samples of it were measured")
            share = self.fractions[name] if self.fractions else t.selected / t.items
            sel = round(n * share)
            out.per_domain[name] = DomainTally(
                items=int(n), selected=sel, input_tokens=round(sel * t.input_tokens / t.selected),
                output_tokens=round(sel * t.output_tokens / t.selected))
        out.notes.append("scaled from measured per-sample averages: " + ", ".join(
            f"{k}={v}" for k, v in counts.items()))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(selected=self.selected, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                 cost_usd_online=self.cost_usd("online"), cost_usd_batch=self.cost_usd("batch"))
        return d

    def format(self) -> str:
        """Human-readable table, printed by the CLI and logged by the extractor's dry run."""
        lines = [f"LLM extraction cost estimate: model={self.model} encoding={self.encoding} "
                 f"prompt={self.prompt_version}"]
        lines.append(f"{'domain':<8}{'items':>10}{'selected':>10}{'in/sample':>11}{'out/sample':>11}"
                     f"{'input tok':>14}{'output tok':>14}")
        for name, t in sorted(self.per_domain.items()):
            ai = t.input_tokens / t.selected if t.selected else 0.0
            ao = t.output_tokens / t.selected if t.selected else 0.0
            lines.append(f"{name:<8}{t.items:>10}{t.selected:>10}{ai:>11.0f}{ao:>11.0f}"
                         f"{t.input_tokens:>14,}{t.output_tokens:>14,}")
        if self.input_price is None:
            lines.append(f"no price known for model {self.model!r}: pass prices=IN,OUT (USD per 1M tokens)")
        else:
            lines.append(f"prices (USD/1M, online): input {self.input_price} output {self.output_price}; "
                         f"batch = {BATCH_DISCOUNT:.0%} of that")
            online, batch = self.cost_usd("online"), self.cost_usd("batch")
            lines.append(f"cost online: ${online:,.2f}   batch: ${batch:,.2f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_cost(items: Iterable[ExtractInput], model: str = "gpt-4o",
                  fractions: str | Mapping[str, float] | None = None, prices: Any = None,
                  mode: str = "online", *, seed: int = 0,
                  output_ratio: float | None = None, max_output_tokens: int | None = 4096,
                  preselected: bool = False) -> CostEstimate:
    """Count the tokens the extractor would send for ``items`` and price them.

    ``fractions`` are the pipeline's per-domain extraction fractions, applied with the same
    ``fraction_selected(key, fraction, seed)``; pass ``preselected=True`` when the caller has
    already applied them (the extractor's own dry run).
    """
    if mode not in ("online", "batch"):
        raise ValueError(f"mode={mode!r}: expected 'online' or 'batch'")
    enc_name, exact = encoding_name_for_model(model)
    enc = load_encoding(enc_name)
    price = price_for(model, prices)
    fr = parse_fractions(fractions)
    est = CostEstimate(model, enc_name, mode, PROMPT_VERSION, price[0] if price else None,
                       price[1] if price else None,
                       fractions=None if preselected else
                       {d.name.lower(): fraction_for(fr, d) for d in Domain})
    if not exact:
        est.notes.append(f"model {model!r} has no known tiktoken encoding: counted with {enc_name} "
                         "(approximation)")
    est.notes.append("input = messages + chat framing + JSON-schema text (schema charge approximated)")
    est.notes.append("output modelled: dense ratio " + (
        f"{output_ratio}" if output_ratio is not None else
        ", ".join(f"{d.name.lower()}={r}" for d, r in DENSE_RATIO.items() if d != Domain.OTHER))
        + f" of response tokens + JSON framing per span of ~{TOKENS_PER_SPAN_TEXT} tokens")
    for it in items:
        name = it.domain.name.lower()
        t = est.per_domain.setdefault(name, DomainTally())
        t.items += 1
        if not preselected and not fraction_selected(it.key, fraction_for(fr, it.domain), seed):
            continue
        t.selected += 1
        t.input_tokens += count_request_input_tokens(it, enc)
        t.output_tokens += estimate_output_tokens(it, enc, output_ratio=output_ratio,
                                                  max_output_tokens=max_output_tokens)
    return est
