"""Token-level agreement of an extractor with reference spans: precision, recall, F1 and rho.

    python benchmarks/extraction_agreement.py                          # rules vs the hand-labelled set
    python benchmarks/extraction_agreement.py --extractor none         # the empty baseline
    python benchmarks/extraction_agreement.py --extractor confidence   # tiny diffusion LM, CPU
    python benchmarks/extraction_agreement.py --extractor confidence --extractor-option model=PATH
    OPENAI_API_KEY=... python benchmarks/extraction_agreement.py --extractor llm --model gpt-4o
    python benchmarks/extraction_agreement.py --extractor llm --base-url http://host:8000/v1 --model NAME
    python benchmarks/extraction_agreement.py --labels spans:extracted.parquet --field response=output
    python benchmarks/extraction_agreement.py --max-rho code=0.25,math=0.31   # rules under a rho budget

Each response is tokenized with the bundled tokenizer (``preprocess.assets``); a token is dense when
its character range overlaps a span (``preprocess.align.align_spans``, the same alignment the
preprocessor uses), once for the reference spans and once for the extractor's.  Precision, recall
and F1 are pooled over all tokens of a group; rho is the paper's figure (§3.2), the mean per
response of dense tokens / supervised tokens (response + EOS), for the extractor (``rho``) and for
the labels (``rho ref``).  Rows: each domain, then each source; F1 is also shown separately on the
calibration two thirds and on the held-out third of the set (the rules were tuned on calibration
only).  ``--max-rho`` applies the preprocessor's rho budget (``preprocess.budget``) to the
extractor's tokens, as ``dm-preprocess run --max-rho`` does.  Markdown on stdout; ``--json`` writes
the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.agreement_labels import AGREEMENT_SET, SPANS_FIELDS, Labelled, read_labels  # noqa: E402
from preprocess.align import align_spans, byte_length_table  # noqa: E402
from preprocess.assets import TOKENIZER_DIR  # noqa: E402
from preprocess.budget import budget_tokens, trim_to_budget  # noqa: E402
from preprocess.extractors.base import (  # noqa: E402
    PAPER_RHO,
    ExtractInput,
    ExtractResult,
    Span,
    fraction_for,
    parse_fractions,
)
from preprocess.extractors.registry import get_extractor  # noqa: E402
from preprocess.shards import Domain  # noqa: E402


@dataclass(frozen=True, slots=True)
class Scored:
    """Token flags of one response: reference and extractor, over the response tokens (no EOS)."""

    rec: Labelled
    ref: np.ndarray
    pred: np.ndarray


@dataclass(frozen=True, slots=True)
class Row:
    group: str
    n: int
    precision: float
    recall: float
    f1: float
    f1_calibration: float | None
    f1_heldout: float | None
    rho: float
    rho_ref: float


class Tokens:
    """The bundled tokenizer and the preprocessor's span -> token alignment."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        self.table = byte_length_table(self.tok.backend_tokenizer)

    def flags(self, texts: Sequence[str], spans: Sequence[Sequence[Span]],
              max_rho: Sequence[float] | None = None) -> list[np.ndarray]:
        """Dense flag per response token; with ``max_rho`` (per text) under that rho budget."""
        enc = self.tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for k, (ids, off, text, sp) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], texts, spans)):
            ids = np.asarray(ids, dtype=np.int64)
            if max_rho is None or max_rho[k] >= 1.0:
                out.append(align_spans(ids, off, text, list(sp), self.table).dense)
            else:  # budget over supervised tokens: the response and its EOS
                out.append(trim_to_budget(ids, off, text, list(sp), self.table,
                                          budget_tokens(max_rho[k], len(ids) + 1)).dense)
        return out


def prf(scored: Sequence[Scored]) -> tuple[float, float, float]:
    """Token precision, recall, F1 pooled over the responses (0 where undefined)."""
    tp = sum(int((s.ref & s.pred).sum()) for s in scored)
    n_pred = sum(int(s.pred.sum()) for s in scored)
    n_ref = sum(int(s.ref.sum()) for s in scored)
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_ref if n_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def mean_rho(flags: Sequence[np.ndarray]) -> float:
    """The paper's rho: mean over responses of dense / supervised tokens (response + EOS)."""
    return statistics.fmean(float(f.sum()) / (len(f) + 1) for f in flags) if flags else 0.0


def row(group: str, scored: Sequence[Scored]) -> Row:
    p, r, f = prf(scored)
    by_split = {sp: [s for s in scored if s.rec.split == sp] for sp in ("calibration", "heldout")}
    return Row(group, len(scored), p, r, f,
               prf(by_split["calibration"])[2] if by_split["calibration"] else None,
               prf(by_split["heldout"])[2] if by_split["heldout"] else None,
               mean_rho([s.pred for s in scored]), mean_rho([s.ref for s in scored]))


def table(scored: Sequence[Scored]) -> list[Row]:
    rows = []
    for d in sorted({s.rec.domain for s in scored}):
        rows.append(row(f"**{d.name.lower()}**", [s for s in scored if s.rec.domain == d]))
        for src in sorted({s.rec.source for s in scored if s.rec.domain == d}):
            rows.append(row(f"{d.name.lower()}: {src}",
                            [s for s in scored if s.rec.domain == d and s.rec.source == src]))
    return rows


def markdown(rows: Sequence[Row], title: str) -> str:
    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    lines = [f"### {title}", "",
             "| group | n | P | R | F1 | F1 calib. | F1 held-out | rho | rho ref |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.group} | {r.n} | {f(r.precision)} | {f(r.recall)} | {f(r.f1)} | {f(r.f1_calibration)} | "
              f"{f(r.f1_heldout)} | {f(r.rho)} | {f(r.rho_ref)} |" for r in rows]
    return "\n".join(lines)


def score(records: Sequence[Labelled], results: Sequence[ExtractResult], tokens: Tokens,
          max_rho: dict[str, float] | None = None) -> list[Scored]:
    """Reference and extractor flags per record; the extractor's under the ``max_rho`` budget if given."""
    texts = [r.response for r in records]
    ref = tokens.flags(texts, [r.spans for r in records])
    budget = [fraction_for(max_rho, r.domain) for r in records] if max_rho else None
    pred = tokens.flags(texts, [res.spans for res in results], budget)
    return [Scored(rec, a, b) for rec, a, b in zip(records, ref, pred)]


def build_extractor(args: argparse.Namespace):
    options: dict[str, str] = {}
    for kv in args.extractor_option:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--extractor-option {kv!r}: expected NAME=VALUE")
        options[k] = v
    if args.extractor == "llm":
        options.setdefault("model", args.model)
        options.setdefault("api_key_env", args.api_key_env)
        options.setdefault("cache_dir", args.cache_dir)
        if args.base_url:
            options.setdefault("base_url", args.base_url)
    return get_extractor(args.extractor, **options)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(AGREEMENT_SET),
                    help="FORMAT:PATH with FORMAT agreement (default) or spans; a bare PATH is agreement")
    ap.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                    help=f"column names of the spans format (defaults {SPANS_FIELDS})")
    ap.add_argument("--extractor", default="rules", help="rules | none | llm | confidence | any registered")
    ap.add_argument("--extractor-option", action="append", default=[], metavar="NAME=VALUE",
                    help="passed to the extractor (rules: loops=0; confidence: model=PATH, passes=4)")
    ap.add_argument("--max-rho", default="", metavar="DOMAIN=RHO,...",
                    help="rho budget of the extractor's marks, e.g. code=0.25,math=0.31 (as dm-preprocess)")
    ap.add_argument("--split", choices=("all", "calibration", "heldout"), default="all")
    ap.add_argument("--base-url", help="llm: OpenAI-compatible endpoint (default api.openai.com)")
    ap.add_argument("--model", default="gpt-4o", help="llm: chat model name")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm: environment variable with the key")
    ap.add_argument("--cache-dir", default="cache/llm", help="llm: answer cache (reruns cost nothing)")
    ap.add_argument("--json", type=Path, help="also write the rows and settings here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    fields = dict(kv.split("=", 1) for kv in args.field)
    records = read_labels(args.labels, fields)
    if args.split != "all":
        records = [r for r in records if r.split == args.split]
    ex = build_extractor(args)
    t0 = time.perf_counter()
    results = ex.extract_batch([ExtractInput(r.key, r.prompt, r.response, r.domain) for r in records])
    secs = time.perf_counter() - t0
    statuses = sorted({res.status for res in results})
    max_rho = parse_fractions(args.max_rho, "--max-rho")
    rows = table(score(records, results, Tokens(), max_rho))
    title = f"{ex.name} {ex.version} vs {Path(args.labels.partition(':')[2] or args.labels).name}"
    if max_rho:
        title += " with --max-rho " + ",".join(f"{k}={v:g}" for k, v in max_rho.items())
    print(markdown(rows, title))
    print(f"\n{len(records)} responses, extraction {secs:.1f} s, statuses {statuses}; "
          f"paper rho: code {PAPER_RHO[Domain.CODE]}, math {PAPER_RHO[Domain.MATH]}")
    if args.json:
        args.json.write_text(json.dumps({"extractor": ex.name, "version": ex.version, "labels": args.labels,
                                         "split": args.split, "max_rho": max_rho,
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
