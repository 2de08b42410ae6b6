"""The dm-preprocess command line: run, verify, inspect, stats (called in-process through main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preprocess.assets import SAMPLE_PATH
from preprocess.cli import _kv, build_parser, config_from_args, main
from preprocess.shards import shard_files


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = rows[::100] + ["{broken"]
    p = tmp_path_factory.mktemp("in") / "small.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def built(small_input: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "pp"
    assert main(["run", "--input", str(small_input), "--output", str(out), "--workers", "1",
                 "--num-shards", "2", "--extractor", "rules", "--fraction", "code=0.5,math=1"]) == 0
    return out


def test_run_prints_summary(small_input: Path, tmp_path: Path, capsys):
    out = tmp_path / "pp"
    assert main(["run", "--input", str(small_input), "--output", str(out), "--workers", "1",
                 "--num-shards", "2", "--extractor", "none"]) == 0
    text = capsys.readouterr().out
    assert "samples" in text and "rho" in text and "malformed_json: 1" in text and "tokens/s" in text
    assert "2 shard task(s) built now" in text and "max worker peak RSS" in text


def test_verify_ok_then_corrupted(built: Path, tmp_path: Path, capsys):
    assert main(["verify", str(built)]) == 0
    assert "OK" in capsys.readouterr().out
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in built.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    flags = copy / shard_files("shard_00001")["flags"]
    data = bytearray(flags.read_bytes())
    data[-1] ^= 0x01
    flags.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "shard_00001.flags.bin sha256 mismatch" in out and "1 problem(s)" in out


def test_inspect_by_index_and_key(built: Path, capsys):
    assert main(["inspect", str(built), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "sample 0" in out and "<|im_start|>assistant" in out and "legend" in out
    assert main(["inspect", str(built), "--key", "gsm8k-train-100"]) == 0
    out = capsys.readouterr().out
    assert "id=gsm8k-train-100" in out
    assert "####" in out  # the GSM8K answer line of that sample's response
    assert main(["inspect", str(built), "--key", "nope"]) == 1


def test_stats_lists_rejects(built: Path, capsys):
    assert main(["stats", str(built), "--rejects", "5"]) == 0
    out = capsys.readouterr().out
    assert "small.jsonl:" in out and "malformed_json" in out


def test_strict_exit_code(small_input: Path, tmp_path: Path, capsys):
    rc = main(["run", "--input", str(small_input), "--output", str(tmp_path / "s"), "--workers", "1",
               "--num-shards", "1", "--extractor", "none", "--strict"])
    assert rc == 2
    assert "small.jsonl:" in capsys.readouterr().err


def test_flags_map_onto_config():
    a = build_parser().parse_args([
        "run", "--input", "a.jsonl", "--input", "b.parquet", "--output", "o", "--extractor", "llm",
        "--extractor-option", "model=gpt-4o", "--extractor-option", "concurrency=8", "--fraction", "code=0.1",
        "--max-length", "1024", "--num-shards", "64", "--workers", "4", "--executor", "slurm",
        "--slurm-partition", "cpu", "--slurm-time", "02:00:00", "--slurm-cpus-per-task", "4",
        "--slurm-sbatch-arg", "account=proj", "--prompt-field", "question", "--response-field", "answer",
        "--domain", "math", "--id-field", "", "--no-chat-template"])
    cfg = config_from_args(a)
    assert cfg.inputs == ["a.jsonl", "b.parquet"] and cfg.extractor == "llm"
    assert cfg.extractor_options == {"model": "gpt-4o", "concurrency": 8}
    assert cfg.fractions == {"code": 0.1} and cfg.max_length == 1024 and cfg.num_shards == 64
    assert cfg.slurm.partition == "cpu" and cfg.slurm.cpus_per_task == 4
    assert cfg.slurm.sbatch_args == {"account": "proj"}
    assert cfg.fields.prompt == "question" and cfg.fields.domain == "math" and cfg.fields.id_field is None
    assert not cfg.use_chat_template
    with pytest.raises(Exception, match="key=value"):
        _kv("novalue")
