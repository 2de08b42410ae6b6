"""End-to-end preprocessing: flags semantics, determinism, resume after kill -9, rejects, fractions.

Over 400 lines: each end-to-end property needs its own run of the real pipeline on real records.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from preprocess.assets import SAMPLE_PATH, TOKENIZER_DIR
from preprocess.extractors.base import ExtractInput, ExtractResult, Span, fraction_selected, parse_fractions
from preprocess.extractors.registry import EXTRACTORS
from preprocess.pipeline.config import PreprocessConfig, RejectError
from preprocess.pipeline.driver import build_slurm_executor, run_pipeline
from preprocess.pipeline.shard import CRASH_ENV, TOKENIZER_THREAD_ENV, tokenizer_threads
from preprocess.records import FieldMap
from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    INDEX_FILE,
    ConfigMismatchError,
    Domain,
    ShardedDataset,
    shard_files,
)
from preprocess.shards_verify import verify

REPO = Path(__file__).resolve().parents[1]


class DigitsExtractor:
    """Marks every run of digits: easy to check against the decoded tokens."""

    name = "test-digits"
    version = "1"

    def __init__(self, **_: object) -> None:
        pass

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        return [ExtractResult(spans=[Span(m.start(), m.end(), "num")
                                     for m in re.finditer(r"\d+", it.response)])
                for it in items]


class BrokenExtractor:
    """Returns a span outside the response for every sample (an extractor bug)."""

    name = "test-broken"
    version = "1"

    def __init__(self, **_: object) -> None:
        pass

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        return [ExtractResult(spans=[Span(0, len(it.response) + 5)], status="partial") for it in items]


class CrashingExtractor:
    """Raises on its second batch (an extractor bug, or a lost connection)."""

    name = "test-crash"
    version = "1"

    def __init__(self, **_: object) -> None:
        self.calls = 0

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        self.calls += 1
        if self.calls == 2:
            raise ConnectionError("extractor backend\nwent away")
        return [ExtractResult() for _ in items]


EXTRACTORS.update({"test-digits": DigitsExtractor, "test-broken": BrokenExtractor,
                   "test-crash": CrashingExtractor})


def _subset(tmp_path: Path, n: int = 90, every: int = 33) -> tuple[Path, dict[str, dict]]:
    """A small mixed math/code input (every ``every``-th sample record)."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = rows[::every][:n]
    p = tmp_path / "subset.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p, {r["id"]: r for r in rows}


def _cfg(inp: Path, out: Path, **kw) -> PreprocessConfig:
    kw.setdefault("extractor", "none")
    kw.setdefault("workers", 1)
    kw.setdefault("num_shards", 3)
    return PreprocessConfig(inputs=[inp], output_dir=out, **kw)


def _data_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_flags_tokens_and_stats(tmp_path: Path, tok):
    inp, rows = _subset(tmp_path)
    out = run_pipeline(_cfg(inp, tmp_path / "out", extractor="test-digits"))
    assert verify(out) == []
    ds = ShardedDataset(out)
    assert len(ds) == len(rows)
    assert ds.index["tokenizer"]["vocab_size"] == ds.vocab_size == 4096
    with_digits = sum(bool(re.search(r"\d", r["response"])) for r in rows.values())
    assert ds.index["alignment"] == {"bytes": with_digits}
    sup = dense = 0
    for s in ds:
        row = rows[s.sample_id]
        assert s.domain == Domain.parse(row["domain"])
        n_prompt = int(np.argmax(s.supervised))
        # Prompt = chat-template user turn (unsupervised); response + EOS supervised.
        assert tok.decode(s.tokens[:n_prompt]) == tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False)
        assert tok.decode(s.tokens[n_prompt:-1]) == row["response"]
        assert s.tokens[-1] == tok.eos_token_id
        assert s.supervised[n_prompt:].all() and not s.supervised[:n_prompt].any()
        assert not s.info_dense[:n_prompt].any() and not s.info_dense[-1]
        assert s.selected and (s.flags & FLAG_SELECTED).all()
        # Every dense token touches a digit; all digits of the response sit in dense tokens.
        dense_text = "".join(tok.decode([t]) for t, d in zip(s.tokens, s.info_dense) if d)
        plain_text = "".join(tok.decode([t]) for t, d in zip(s.tokens[n_prompt:-1], s.info_dense[n_prompt:-1])
                             if not d)
        for t, d in zip(s.tokens, s.info_dense):
            if d:
                assert re.search(r"\d", tok.decode([t])), tok.decode([t])
        assert not re.search(r"\d", plain_text)
        assert sorted(re.sub(r"\D", "", dense_text)) == sorted(re.sub(r"\D", "", row["response"]))
        sup += int(s.supervised.sum())
        dense += int(s.info_dense.sum())
    doms = ds.index["domains"]
    assert sum(d["supervised_tokens"] for d in doms.values()) == sup
    assert sum(d["dense_tokens"] for d in doms.values()) == dense
    assert np.array_equal(ds.lengths, [len(s.tokens) for s in ds])


def test_output_is_independent_of_worker_count(tmp_path: Path):
    inp, _ = _subset(tmp_path, n=60)
    a = run_pipeline(_cfg(inp, tmp_path / "w1", workers=1, fractions={"math": 0.5}))
    b = run_pipeline(_cfg(inp, tmp_path / "w2", workers=2, fractions={"math": 0.5}))
    fa, fb = _data_files(a), _data_files(b)
    assert fa.keys() == fb.keys() and len(fa) == 3 * 6 + 2  # 6 files per shard, index.json, lock file
    assert fa == fb


def _concatenated(folder: Path) -> dict[str, bytes]:
    """Each data file kind of all shards laid end to end (the .idx without its per-shard header)."""
    index = json.loads((folder / INDEX_FILE).read_text())
    out: dict[str, bytes] = {}
    for role in ("tokens", "flags", "keys", "rejects"):
        out[role] = b"".join((folder / shard_files(s["name"])[role]).read_bytes() for s in index["shards"])
    out["domains"] = b"".join(np.asarray(ShardedDataset(folder).shard(k).domains).tobytes()
                              for k in range(index["num_shards"]))
    return out


def test_output_is_independent_of_task_count_and_shards_are_balanced(tmp_path: Path):
    """Byte-range splitting: shards are consecutive stretches of the input, so the shards laid end
    to end are the same bytes for any number of tasks; and they hold equal shares of the tokens."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    folder = tmp_path / "in"
    folder.mkdir()
    bad = ["{bad", json.dumps({"id": "x", "domain": "art", "prompt": "q", "response": "a"})]
    parts = (("a.jsonl", rows[:200:3]), ("b.jsonl", rows[200:1400:3]), ("c.jsonl", rows[1400:1700:3]))
    for name, part in parts:
        lines = [json.dumps(r, ensure_ascii=False) for r in part]
        lines[5:5] = bad
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = _concatenated(run_pipeline(_cfg(folder, tmp_path / "t1", num_shards=1, extractor="test-digits")))
    for n in (4, 7):
        out = run_pipeline(_cfg(folder, tmp_path / f"t{n}", num_shards=n, extractor="test-digits"))
        assert _concatenated(out) == ref, n
        tokens = [s["num_tokens"] for s in json.loads((out / INDEX_FILE).read_text())["shards"]]
        assert max(tokens) / np.mean(tokens) < 1.10 and min(tokens) / np.mean(tokens) > 0.90, tokens
        index = ShardedDataset(out).index
        assert index["records_read"] == len(ShardedDataset(out)) + index["num_rejects"]
        assert index["bytes_read"] >= sum(p.stat().st_size for p in folder.iterdir())


def _cli(args: list[str], log: Path, env_extra: dict[str, str] | None = None) -> int:
    """Run the CLI in its own process group; afterwards kill whatever of that group is left.

    A process that dies by kill -9 leaves its helpers (datatrove's multiprocess Manager) orphaned,
    just as a real crash would; killing the group afterwards is what SLURM or Ctrl-C would do.
    """
    env = {**os.environ, **(env_extra or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "preprocess.py"), *args], cwd=REPO,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path: Path):
    inp, _ = _subset(tmp_path, n=90)
    args = ["run", "--input", str(inp), "--num-shards", "3", "--workers", "1", "--extractor", "rules",
            "--fraction", "code=0.5"]
    crashed = tmp_path / "crashed"
    log = tmp_path / "log.txt"
    rc = _cli([*args, "--output", str(crashed)], log, {CRASH_ENV: "1:10"})
    assert rc == 137, log.read_text()[-2000:]
    assert not (crashed / INDEX_FILE).exists()
    assert list(crashed.glob("shard_00001.*.tmp"))  # the killed shard left partial files
    assert not (crashed / "shard_00001.json").exists() and (crashed / "shard_00000.json").exists()
    problems = verify(crashed)
    assert any("leftover temporary file" in p for p in problems)
    assert any("index.json missing" in p for p in problems)
    done_mtime = (crashed / shard_files("shard_00000")["tokens"]).stat().st_mtime_ns
    rc = _cli([*args, "--output", str(crashed)], log)
    assert rc == 0, log.read_text()[-2000:]
    assert (crashed / shard_files("shard_00000")["tokens"]).stat().st_mtime_ns == done_mtime  # not redone
    clean = tmp_path / "clean"
    assert _cli([*args, "--output", str(clean)], log) == 0
    assert verify(crashed) == []
    assert _data_files(crashed) == _data_files(clean)


def test_rejects_listed_with_location_and_strict_mode(tmp_path: Path):
    rows = [{"id": "ok1", "domain": "math", "prompt": "1+1?", "response": "2"},
            "{not json",
            {"id": "nores", "domain": "math", "prompt": "x"},
            {"id": "empty", "domain": "code", "prompt": "x", "response": " "},
            {"id": "long", "domain": "math", "prompt": "x", "response": "word " * 200},
            {"id": "dom", "domain": "art", "prompt": "x", "response": "y"},
            {"id": "ok2", "domain": "code", "prompt": "f?", "response": "def f(): pass"}]
    inp = tmp_path / "bad.jsonl"
    inp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = run_pipeline(_cfg(inp, tmp_path / "out", num_shards=2, max_length=64))
    ds = ShardedDataset(out)
    assert sorted(s.sample_id for s in ds) == ["ok1", "ok2"]
    assert ds.index["rejects"] == {"empty_response": 1, "malformed_json": 1, "missing_field": 1,
                                   "too_long": 1, "unknown_domain": 1}
    listed = [json.loads(line) for name in ("shard_00000", "shard_00001")
              for line in (out / shard_files(name)["rejects"]).read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in listed) == [
        (2, "malformed_json"), (3, "missing_field"), (4, "empty_response"), (5, "too_long"),
        (6, "unknown_domain")]
    assert all(r["file"] == "bad.jsonl" for r in listed)
    assert len(ds) + ds.index["num_rejects"] == len(rows)  # nothing silently dropped
    with pytest.raises(RejectError, match=r"bad.jsonl:\d+: \w+"):
        run_pipeline(_cfg(inp, tmp_path / "strict", num_shards=2, max_length=64, strict=True))


def test_output_is_independent_of_batch_size(tmp_path: Path):
    """Rejects of both kinds interleaved with good records: batch boundaries must not show."""
    inp, _ = _subset(tmp_path, n=30)
    lines = inp.read_text(encoding="utf-8").splitlines()
    long_row = json.dumps({"id": "long", "domain": "math", "prompt": "x", "response": "word " * 600})
    mixed = [x for i, line in enumerate(lines) for x in (line, "{bad" if i % 4 == 0 else long_row)]
    inp.write_text("\n".join(mixed) + "\n", encoding="utf-8")
    a = run_pipeline(_cfg(inp, tmp_path / "b512", extractor="test-digits", max_length=512))
    b = run_pipeline(_cfg(inp, tmp_path / "b3", extractor="test-digits", max_length=512, batch_size=3))
    assert ShardedDataset(a).index["rejects"] == {"malformed_json": 8, "too_long": 22}
    assert _data_files(a) == _data_files(b)


def test_fraction_selection_and_rho(tmp_path: Path):
    inp, rows = _subset(tmp_path)
    cfg = _cfg(inp, tmp_path / "out", extractor="test-digits", fractions=parse_fractions("code=0,math=0.5"),
               seed=7)
    ds = ShardedDataset(run_pipeline(cfg))
    ratios: dict[int, list[float]] = {}
    for s in ds:
        frac = {Domain.CODE: 0.0, Domain.MATH: 0.5}[Domain(s.domain)]
        assert s.selected == fraction_selected(s.sample_id, frac, 7)
        if not s.selected:
            assert not s.info_dense.any() and not (s.flags & FLAG_SELECTED).any()
        else:
            ratios.setdefault(s.domain, []).append(s.info_dense.sum() / s.supervised.sum())
    assert "code" not in ds.index["rho"] or ds.index["rho"]["code"] == 0.0
    assert ds.index["domains"]["math"]["selected_samples"] == len(ratios[Domain.MATH]) > 0
    assert ds.index["rho"]["math"] == pytest.approx(np.mean(ratios[Domain.MATH]))


def test_idempotent_and_config_change_refused(tmp_path: Path):
    inp, _ = _subset(tmp_path, n=30)
    out = run_pipeline(_cfg(inp, tmp_path / "out"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    run_pipeline(_cfg(inp, tmp_path / "out", workers=2))  # execution settings do not matter
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(ConfigMismatchError, match=r"setting max_length changed \(2048 -> 512\) since shard"):
        run_pipeline(_cfg(inp, tmp_path / "out", max_length=512))
    run_pipeline(_cfg(inp, tmp_path / "out", max_length=512, overwrite=True))
    assert ShardedDataset(out).index["config"]["max_length"] == 512 and verify(out) == []


def test_missing_shard_is_rebuilt(tmp_path: Path):
    inp, _ = _subset(tmp_path, n=30)
    out = run_pipeline(_cfg(inp, tmp_path / "out"))
    ref = _data_files(out)
    (out / "shard_00002.json").unlink()
    (out / shard_files("shard_00002")["flags"]).write_bytes(b"garbage")
    run_pipeline(_cfg(inp, tmp_path / "out"))
    assert _data_files(out) == ref


def test_messages_input_uses_chat_template(tmp_path: Path, tok):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5"}]
    inp = tmp_path / "chat.jsonl"
    inp.write_text(json.dumps({"id": "c1", "conv": msgs}) + "\n")
    fields = FieldMap(messages="conv", domain="math")
    out = run_pipeline(_cfg(inp, tmp_path / "out", num_shards=1, fields=fields))
    s = ShardedDataset(out)[0]
    n_prompt = int(np.argmax(s.supervised))
    assert tok.decode(s.tokens[:n_prompt]) == tok.apply_chat_template(msgs[:2], add_generation_prompt=True,
                                                                      tokenize=False)
    assert tok.decode(s.tokens[n_prompt:]) == "5" + tok.eos_token


def test_no_chat_template_uses_raw_prompt(tmp_path: Path, tok):
    inp, rows = _subset(tmp_path, n=5)
    ds = ShardedDataset(run_pipeline(_cfg(inp, tmp_path / "out", num_shards=1, use_chat_template=False)))
    s = ds[0]
    n_prompt = int(np.argmax(s.supervised))
    assert tok.decode(s.tokens[:n_prompt]) == rows[s.sample_id]["prompt"]


def test_invalid_spans_are_counted_not_fatal(tmp_path: Path):
    inp, rows = _subset(tmp_path, n=12)
    ds = ShardedDataset(run_pipeline(_cfg(inp, tmp_path / "out", extractor="test-broken")))
    assert ds.index["extract_status"] == {"invalid_spans": 12, "partial": 12}
    assert all(not s.info_dense.any() and s.flags[-1] & FLAG_SUPERVISED for s in ds)
    assert not any((s.flags & FLAG_INFO_DENSE).any() for s in ds)
    with pytest.raises(RejectError, match="invalid_spans"):
        run_pipeline(_cfg(inp, tmp_path / "strict", extractor="test-broken", strict=True))


def test_credentials_in_extractor_options_are_not_recorded():
    opts = {"api_key": "sk-123", "model": "m"}
    cfg = PreprocessConfig(inputs=["x"], output_dir="o", extractor_options=opts)
    assert cfg.output_settings()["extractor_options"] == {"api_key": "<redacted>", "model": "m"}


def test_checked_spans_matches_validate_spans():
    from preprocess.extractors.base import SpanError, validate_spans
    from preprocess.pipeline.shard import _checked_spans

    text = "0123456789abcdef"
    cases = [[], [Span(0, 2), Span(3, 5)], [Span(3, 5), Span(0, 2)], [Span(0, 3), Span(3, 5)],
             [Span(0, 4), Span(2, 6), Span(10, 16)], [Span(0, 16)]]
    for spans in cases:
        assert _checked_spans(spans, text) == validate_spans(spans, text), spans
    for bad in ([Span(0, 17)], [Span(4, 4)], [Span(-1, 2)], [Span(2, 5), Span(9, 30)]):
        with pytest.raises(SpanError):
            _checked_spans(bad, text)


def test_config_validation():
    with pytest.raises(ValueError, match="fractions"):
        PreprocessConfig(inputs=["x"], output_dir="o", fractions={"math": 1.5})
    with pytest.raises(ValueError, match="unknown domain"):
        parse_fractions("poetry=0.1")
    with pytest.raises(ValueError, match="partition"):
        PreprocessConfig(inputs=["x"], output_dir="o", executor="slurm")
    with pytest.raises(ValueError, match="num_shards"):
        PreprocessConfig(inputs=["x"], output_dir="o", num_shards=0)


def test_slurm_executors_are_configured_without_submitting(tmp_path: Path):
    inp, _ = _subset(tmp_path, n=5)
    cfg = _cfg(inp, tmp_path / "out", executor="slurm", num_shards=16,
               slurm={"partition": "cpu", "time": "01:00:00", "cpus_per_task": 2, "mem_per_cpu_gb": 3,
                      "job_name": "pp", "sbatch_args": {"account": "proj"}, "max_concurrent": 4})
    merge = build_slurm_executor(cfg)
    shards = merge.depends
    assert merge.world_size == 1 and shards.world_size == 16
    args = shards.get_sbatch_args(16)
    assert args["partition"] == "cpu" and args["time"] == "01:00:00" and args["cpus-per-task"] == 2
    assert args["mem-per-cpu"] == "3G" and args["account"] == "proj" and args["array"] == "0-15%4"
    assert "qos" not in args  # datatrove's 'normal' QoS is not assumed
    assert str(tmp_path / "out" / "logs" / "shards") in str(shards.logging_dir.path)


def _wordpiece_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"])
    t.train_from_iterator(NON_ASCII * 20, trainer)
    d = tmp_path / "wp"
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[SEP]").save_pretrained(d)
    return d


def _prefix_space_bpe_dir(tmp_path: Path) -> Path:
    """Byte-level BPE with ``add_prefix_space``: byte lengths never add up to the text (the added
    space), so every sample is aligned by offsets although the tokenizer has a byte table."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(NON_ASCII * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / "bpe-prefix-space"
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(d)
    return d


NON_ASCII = ["Zürich → 東京 costs 12 €, so 3 ≥ 2 and naïve 45.", "Straße 7 😀 9 déjà 10 vu",
             "plain ascii 123 here", "x=4 → y=16 (東京 2024)"]


@pytest.mark.parametrize("family", ["bundled-byte-bpe", "wordpiece-offsets", "byte-bpe-prefix-space"])
def test_batched_alignment_matches_per_sample_reference(tmp_path: Path, family):
    """The batch-vectorised alignment in the pipeline equals align_spans sample by sample.

    byte-bpe-prefix-space: the first batch is encoded without offsets (byte table) and its samples
    are encoded again for their offsets; the later batches are encoded with offsets."""
    from preprocess.align import TokenizerBundle, align_spans

    tok_dir = {"bundled-byte-bpe": lambda _: TOKENIZER_DIR, "wordpiece-offsets": _wordpiece_dir,
               "byte-bpe-prefix-space": _prefix_space_bpe_dir}[family](tmp_path)
    inp = tmp_path / "na.jsonl"
    inp.write_text("".join(json.dumps({"id": f"n{i}", "domain": "math", "prompt": "Q", "response": r},
                                      ensure_ascii=False) + "\n" for i, r in enumerate(NON_ASCII * 3)),
                   encoding="utf-8")
    ds = ShardedDataset(run_pipeline(_cfg(inp, tmp_path / "out", num_shards=1, extractor="test-digits",
                                          tokenizer=str(tok_dir), batch_size=5)))
    n = len(NON_ASCII) * 3
    assert ds.index["alignment"] == {"bundled-byte-bpe": {"bytes": n}, "wordpiece-offsets": {"offsets": n},
                                     "byte-bpe-prefix-space": {"bytes": 0, "offsets": n}}[family]
    bundle = TokenizerBundle(tok_dir)
    for s in ds:
        resp = NON_ASCII[int(s.sample_id[1:]) % len(NON_ASCII)]
        enc = bundle.backend.encode(resp, add_special_tokens=False)
        spans = [Span(m.start(), m.end()) for m in re.finditer(r"\d+", resp)]
        ref = align_spans(np.array(enc.ids), enc.offsets, resp, spans, bundle.byte_table)
        n_prompt = int(np.argmax(s.supervised))
        assert s.tokens[n_prompt:-1].tolist() == enc.ids
        assert s.info_dense[n_prompt:-1].tolist() == ref.dense.tolist()
        assert ref.dense.any()


@pytest.mark.slow
def test_trainer_default_call_on_bundled_sample(tmp_path: Path):
    """What the trainer runs when its cache is missing: defaults only, rules extractor, all cores."""
    t0 = time.perf_counter()
    out = run_pipeline(PreprocessConfig(inputs=[SAMPLE_PATH], output_dir=tmp_path / "pp", extractor="rules"))
    assert time.perf_counter() - t0 < 60
    assert verify(out) == []
    ds = ShardedDataset(out)
    assert len(ds) == 2974 and ds.index["num_rejects"] == 0
    assert set(ds.index["rho"]) == {"code", "math"} and all(0.05 < r < 0.9 for r in ds.index["rho"].values())
    assert ds.index["extract_status"].get("ok", 0) > 0.9 * 2974


@pytest.mark.slow
def test_concurrent_drivers_share_one_output(tmp_path: Path):
    """Two processes asking for the same folder at once (e.g. two training ranks): one builds, one waits."""
    inp, _ = _subset(tmp_path, n=40)
    script = ("import sys\nfrom preprocess.pipeline import PreprocessConfig, run_pipeline\n"
              "if __name__ == '__main__':\n"
              "    run_pipeline(PreprocessConfig(inputs=[sys.argv[1]], output_dir=sys.argv[2],"
              " extractor='none', workers=1, num_shards=3))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(inp), str(tmp_path / "shared")], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    ref = run_pipeline(_cfg(inp, tmp_path / "ref"))
    assert verify(tmp_path / "shared") == []
    assert _data_files(tmp_path / "shared") == _data_files(ref)


def test_a_failing_task_is_one_line_with_its_log(tmp_path: Path, capsys):
    from preprocess.cli.main import main

    inp, _ = _subset(tmp_path, n=40)
    args = ["run", "--input", str(inp), "--output", str(tmp_path / "o"), "--workers", "1",
            "--num-shards", "2", "--extractor", "test-crash", "--batch-size", "4"]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in captured.err + captured.out, captured.err
    log = tmp_path / "o" / "logs" / "shards" / "logs" / "task_00000.log"
    assert err == f"error: shard_00000: ConnectionError: extractor backend went away (traceback in {log})"
    assert "Traceback" in log.read_text() and not (tmp_path / "o" / "shard_00000.json").exists()


def test_tokenizer_threads_share_the_cores(tmp_path: Path, monkeypatch):
    """cores // workers tokenizer threads per local task (serial at 1), restored afterwards; a user's
    own setting and SLURM tasks are left alone."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for k in TOKENIZER_THREAD_ENV:
        monkeypatch.delenv(k, raising=False)

    def inside(**kw) -> dict[str, str]:
        cfg = PreprocessConfig(inputs=[SAMPLE_PATH], output_dir=tmp_path, **kw)
        with tokenizer_threads(cfg):
            seen = {k: os.environ[k] for k in TOKENIZER_THREAD_ENV if k in os.environ}
        assert not any(k in os.environ for k in TOKENIZER_THREAD_ENV)
        return seen

    assert inside(workers=4, num_shards=8) == {"TOKENIZERS_PARALLELISM": "false"}
    assert inside(workers=-1, num_shards=8) == {"TOKENIZERS_PARALLELISM": "false"}  # one worker per core
    assert inside(workers=2, num_shards=8) == {"RAYON_NUM_THREADS": "2"}
    assert inside(workers=4, num_shards=2) == {"RAYON_NUM_THREADS": "2"}  # 2 shards: 2 tasks at once
    assert inside(workers=1, num_shards=8) == {}
    assert inside(workers=4, num_shards=8, executor="slurm", slurm={"partition": "p"}) == {}
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    cfg = PreprocessConfig(inputs=[SAMPLE_PATH], output_dir=tmp_path, workers=4, num_shards=8)
    with tokenizer_threads(cfg):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and "RAYON_NUM_THREADS" not in os.environ
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
