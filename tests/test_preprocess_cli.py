"""The dm-preprocess command line: run, verify, inspect, stats (called in-process through main)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preprocess.assets import SAMPLE_PATH
from preprocess.cli.args import parse_kv
from preprocess.cli.main import build_parser, main
from preprocess.cli.run import config_from_args
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
    text = " ".join(capsys.readouterr().out.split())
    assert "samples" in text and "rho" in text and "malformed_json: 1" in text and "tokens/s" in text
    assert "this run: 2 shard(s) built" in text and "max worker peak RSS" in text
    assert "records, 0 blank lines" in text and "Total Runtime" not in text
    # A rerun has nothing to do and must not claim a throughput.
    assert main(["run", "--input", str(small_input), "--output", str(out), "--workers", "1",
                 "--num-shards", "2", "--extractor", "none"]) == 0
    captured = capsys.readouterr()
    text = " ".join(captured.out.split())
    assert "this run: nothing to do, all 2 shards were complete" in text and "samples/s" not in text
    assert "Total Runtime" not in captured.err


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


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_stops_at_the_first_bad_record_in_input_order(tmp_path: Path, capsys, workers: int):
    good = {"domain": "math", "prompt": "q", "response": "a"}
    lines = [json.dumps({**good, "id": f"g{i}"}) for i in range(40)]
    lines[9], lines[25], lines[33] = "{broken", json.dumps({"id": "x", "domain": "art", "prompt": "q",
                                                           "response": "a"}), "[1]"
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n")
    rc = main(["run", "--input", str(p), "--output", str(tmp_path / "s"), "--workers", str(workers),
               "--num-shards", "4", "--extractor", "none", "--strict"])
    assert rc == 2
    assert _one_error_line(capsys).startswith("error: (--strict) in.jsonl:10: malformed_json")


def test_errors_are_one_line(small_input: Path, tmp_path: Path, capsys):
    run = ["run", "--output", str(tmp_path / "o"), "--workers", "1", "--num-shards", "2",
           "--extractor", "none"]
    assert main([*run, "--input", str(tmp_path / "nothing" / "*.jsonl")]) == 2
    assert "nothing/*.jsonl: the pattern matches no" in _one_error_line(capsys)
    assert main([*run, "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in _one_error_line(capsys)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(small_input.read_bytes())
    assert main([*run, "--input", str(inp)]) == 0
    capsys.readouterr()
    assert main([*run, "--input", str(inp), "--max-length", "99"]) == 2
    err = _one_error_line(capsys)
    assert "setting max_length changed (2048 -> 99) since shard_00000 was made" in err
    assert "--overwrite" in err
    # An edit that keeps the size, with the old mtime put back: the edge hash still sees it.
    st = inp.stat()
    data = inp.read_bytes()
    inp.write_bytes(data.replace(b'"math"', b'"MATH"', 1))
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert inp.stat().st_size == st.st_size
    assert main([*run, "--input", str(inp)]) == 2
    assert f"input {inp.resolve()} changed (edges)" in _one_error_line(capsys)
    inp.write_bytes(data)  # same bytes, new mtime: still a change (the file was touched)
    assert main([*run, "--input", str(inp)]) == 2
    assert "changed (mtime_ns)" in _one_error_line(capsys)
    with pytest.raises(FileNotFoundError):
        main(["--debug", *run, "--input", str(tmp_path / "missing.jsonl")])


def test_truncated_shard_is_named_when_the_folder_is_opened(built: Path, tmp_path: Path, capsys):
    from preprocess.shards import ShardedDataset

    copy = tmp_path / "copy"
    copy.mkdir()
    for p in built.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    tokens = copy / shard_files("shard_00001")["tokens"]
    tokens.write_bytes(tokens.read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"shard_00001.tokens.bin: \d+ bytes, its manifest shard_00001.json"):
        ShardedDataset(copy)
    assert main(["inspect", str(copy), "--index", "0"]) == 2
    assert "shard_00001.tokens.bin" in _one_error_line(capsys)


def test_split_input_command(tmp_path: Path, capsys):
    import gzip

    rows = [json.dumps({"id": f"r{i}", "domain": "math", "prompt": "q", "response": "a" * (i % 50)})
            for i in range(2000)]
    big = tmp_path / "big.jsonl.gz"
    with gzip.open(big, "wt") as f:
        f.write("\n".join(rows) + "\n")
    assert main(["split-input", str(big), "--parts", "3", "--output", str(tmp_path / "parts")]) == 0
    assert "wrote 3 files" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == [f"big.{i:05d}-of-00003.jsonl.gz" for i in range(3)]
    back = [line for n in names for line in gzip.open(tmp_path / "parts" / n, "rt").read().splitlines()]
    assert back == rows


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
        parse_kv("novalue")


def test_progress_reports_and_table(built: Path, small_input: Path):
    from rich.console import Console

    from preprocess.pipeline.progress import progress_table, read_progress

    states = read_progress(built / "logs", since=0.0)
    assert [s["shard"] for s in states] == [0, 1] and all(s["done"] for s in states)
    assert sum(s["records"] for s in states) == len(small_input.read_text().splitlines())
    assert sum(s["bytes"] for s in states) >= small_input.stat().st_size
    assert read_progress(built / "logs", since=max(s["start"] for s in states) + 1) == []  # older runs
    running = [dict(states[0], done=False, bytes=states[0]["bytes_total"] // 2, now=states[0]["start"] + 2.0)]
    console = Console(width=100, record=True)
    console.print(progress_table(running, running[0]["start"] + 2.0, 2, running[0]["start"],
                                 planned_bytes=4 * states[0]["bytes_total"]))
    text = console.export_text()
    assert "records/s" in text and "tokens/s" in text and "MB/s" in text and "ETA" in text
    assert "shard 0" in text and "50 %" in text and "12 %" in text  # 1/2 of the task, 1/8 overall
    assert "2 s" in text  # this task's ETA: as long again as it has run
