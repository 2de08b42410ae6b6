"""End to end through ``dm-evaluate``: run on the tiny default, results JSON, table, chart, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.cli import main
from evaluation.report import load_results, markdown_table

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "eval"
DATA_ARGS = ["--gsm8k", str(FIXTURES / "gsm8k_mini.jsonl"), "--mbpp", str(FIXTURES / "mbpp_mini.jsonl"),
             "--humaneval", str(FIXTURES / "humaneval_mini.jsonl"),
             "--math500", str(FIXTURES / "math500_mini.jsonl")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    rc = main(["run", "--model", "tiny", "--name", "Tiny default", "--benchmarks", "all", *DATA_ARGS,
               "--limit", "2", "--gen-length", "16", "--block-size", "16", "--steps-per-block", "4",
               "--batch-size", "2", "--timeout", "5", "--out", str(out)])
    assert rc == 0
    return out


def test_run_writes_results_table_and_chart(run_dir, capsys):
    res = json.loads((run_dir / "Tiny_default.json").read_text())
    assert res["format"] == "dm-eval-results/1" and res["name"] == "Tiny default"
    assert res["decode"]["gen_length"] == 16 and res["decode"]["kv_cache"] is True  # auto: tiny supports it
    assert res["sandbox"]["audit_hook"] is True and res["sandbox"]["limits"]["timeout_s"] == 5
    assert set(res["benchmarks"]) == {"humaneval", "mbpp", "gsm8k", "math500"}
    for b in res["benchmarks"].values():
        assert b["n"] == 2 and len(b["records"]) == 2 and 0 <= b["score"] <= 100
        for r in b["records"]:
            assert {"task_id", "source", "prompt", "generation", "extracted", "passed", "status",
                    "generation_s", "scoring_s"} <= set(r)
            assert ".jsonl:" in r["source"] and isinstance(r["generation"], str)
    assert res["benchmarks"]["mbpp"]["records"][0]["task_id"] == "11"  # task 10 is not in the test split
    table = (run_dir / "Tiny_default.md").read_text()
    assert table.startswith("| Checkpoint | HumanEval | MBPP | GSM8K | MATH500 | AVG |")
    assert "| Tiny default |" in table and "†" not in table
    png = (run_dir / "Tiny_default.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_merges_runs(run_dir, tmp_path):
    base = load_results(run_dir / "Tiny_default.json")
    other = dict(base, name="Partial")
    other["benchmarks"] = {"gsm8k": dict(base["benchmarks"]["gsm8k"], score=50.0)}
    (tmp_path / "partial.json").write_text(json.dumps(other))
    stem = tmp_path / "table1"
    assert main(["report", str(run_dir / "Tiny_default.json"), str(tmp_path / "partial.json"),
                 "--out", str(stem)]) == 0
    md = stem.with_suffix(".md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "Checkpoint" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["Tiny default", "Partial"]
    assert rows[1].endswith("| – | – | 50.00 | – | 50.00† |")
    assert stem.with_suffix(".png").stat().st_size > 5000
    assert ("Problems evaluated: Tiny default: HumanEval 2, MBPP 2, GSM8K 2, MATH500 2; "
            "Partial: GSM8K 2.") in md
    assert markdown_table([base]).splitlines()[2] == rows[0]
    assert "Warning" not in md
    other["decode"] = dict(base["decode"], gen_length=512)
    warning = "Warning: decoding settings differ from the first row's for: Partial."
    assert warning in markdown_table([base, other])
    # A row evaluated without the chat template saw other prompts: flagged too.
    assert warning in markdown_table([base, dict(other, decode=base["decode"], chat_template=False)])
    # A row scored on a subset (--limit) is not comparable: flagged per benchmark.
    subset = dict(other, decode=base["decode"])
    subset["benchmarks"] = {"gsm8k": dict(base["benchmarks"]["gsm8k"], n=1)}
    md = markdown_table([base, subset])
    assert "Warning: rows were scored on different numbers of problems for: GSM8K." in md
    assert "different numbers" not in markdown_table([base, dict(base, name="Again")])


def test_report_rejects_foreign_json(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text('{"hello": 1}')
    assert main(["report", str(p), "--out", str(tmp_path / "t")]) == 2
    assert "not a dm-eval-results/1 results file" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = main(["run", "--model", "tiny", "--benchmarks", "gsm8k", "--data-dir", str(tmp_path / "none"),
               "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "GSM8K data not found" in err and "gsm8k/test.jsonl" in err


def test_bad_record_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    assert main(["selfcheck", "--benchmarks", "gsm8k", "--gsm8k", str(bad)]) == 2
    assert f"{bad}:2: answer: missing" in capsys.readouterr().err


def test_unknown_benchmark_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--benchmarks", "gsm8k,arc"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_selfcheck_on_fixtures(tmp_path, capsys):
    assert main(["selfcheck", "--benchmarks", "all", *DATA_ARGS, "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "HumanEval: 100.00 % (3/3)" in out and "MBPP: 100.00 % (3/3)" in out
    assert json.loads((tmp_path / "s.json").read_text())["math500"]["score"] == 100.0


def test_sandbox_info(capsys):
    assert main(["sandbox-info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["audit_hook"] is True and info["limits"]["memory_mb"] == 1024


def test_training_settings_of_a_trainer_run_are_checked(tmp_path):
    """A trainer export (<run>/hf beside <run>/config.yaml) is checked against the decode settings:
    block size and chat template must match how it was trained, or the run says so."""
    from evaluation.runner import setting_mismatches, training_settings

    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    data = tmp_path / "shards"
    data.mkdir()
    (data / "index.json").write_text(json.dumps({"tokenizer": {"chat_template_used": False}}))
    (run / "config.yaml").write_text(f"data:\n  path: {data}\nmasking:\n  block_size: 8\n")
    trained = training_settings(run / "hf")
    assert trained["block_size"] == 8 and trained["chat_template"] is False
    problems = setting_mismatches(trained, 32, True)
    assert len(problems) == 2
    assert "--block-size 8" in problems[0] and "--no-chat-template" in problems[1]
    assert setting_mismatches(trained, 8, False) == []
    # Not a trainer run (hub id, bare folder, unreadable config): nothing known, nothing flagged.
    assert training_settings("tiny") == {} and training_settings(data) == {}
    (run / "config.yaml").write_text(":\n  - [unclosed")
    assert training_settings(run / "hf") == {}


def test_score_completions_made_elsewhere(tmp_path, capsys):
    """`score` grades a JSONL made by another system, in the run's report format; bad lines are named
    by file:line and counted, problems without a completion score 0."""
    comp = tmp_path / "vllm_humaneval.jsonl"
    comp.write_text("\n".join([
        json.dumps({"task_id": "HumanEvalMini/1", "completion": "    return x + y\n"}),
        json.dumps({"task_id": "HumanEvalMini/2", "completion": "```python\ndef fib(n):\n    return 0\n```"}),
        "{broken",
        json.dumps({"task_id": "HumanEvalMini/9", "completion": "x"}),
        json.dumps({"task_id": "HumanEvalMini/1", "completion": "again"}),
    ]) + "\n")
    rc = main(["score", "--completions", str(comp), "--benchmark", "humaneval", *DATA_ARGS, "--timeout", "5",
               "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 1   # bad lines make the exit status non-zero
    for line, what in [(3, "invalid JSON"), (4, "is not a problem being scored"), (5, "appears twice")]:
        assert f"{comp}:{line}: " in captured.err and what in captured.err
    assert "1 problem(s) without a completion (scored 0), 3 bad line(s) skipped" in captured.out
    res = load_results(tmp_path / "out" / "vllm_humaneval.json")
    b = res["benchmarks"]["humaneval"]
    assert (b["n"], b["correct"], b["missing"], b["bad_lines"]) == (3, 1, 1, 3) and b["score"] == 33.33
    assert [r["status"] for r in b["records"]] == ["missing", "passed", "failed"]
    assert "| vllm_humaneval | 33.33 |" in (tmp_path / "out" / "vllm_humaneval.md").read_text()

    gsm = tmp_path / "answers.jsonl"
    gsm.write_text("".join(json.dumps({"task_id": f"gsm8k/{i}", "completion": f"#### {a}"}) + "\n"
                           for i, a in [(1, 18), (2, 3), (3, 1)]))
    assert main(["score", "--completions", str(gsm), "--benchmark", "gsm8k", *DATA_ARGS, "--name", "ext",
                 "--out", str(tmp_path / "out")]) == 0
    g = load_results(tmp_path / "out" / "ext.json")["benchmarks"]["gsm8k"]
    assert (g["n"], g["missing"], g["bad_lines"]) == (3, 0, 0) and g["correct"] == 2


def test_unsafe_switch_is_reported(capsys):
    assert main(["sandbox-info", "--unsafe-no-isolation"]) == 0
    assert json.loads(capsys.readouterr().out)["isolation"].startswith("none")
