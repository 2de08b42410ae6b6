"""Faults of a training run and how they are reported: configuration errors exit 2 with one line, a
batch with nothing supervised warns, and only the default data path is built from the sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# Runs launch/train.py's main() once per argv in one interpreter (imports paid once) and prints, per
# case, the exit code and what went to stderr.
CASES_SCRIPT = """
import contextlib, io, json, sys
sys.path.insert(0, {repo!r})
sys.argv = ["train.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("train", {repo!r} + "/launch/train.py")
train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)
out = []
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    out.append([code, err.getvalue()])
print("RESULTS" + json.dumps(out))
"""


def run_cases(cases: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    p = subprocess.run([sys.executable, "-c", CASES_SCRIPT.format(repo=str(REPO))], input=json.dumps(cases),
                       cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**env, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert line is not None, p.stdout[-3000:] + p.stderr[-5000:]
    return [tuple(r) for r in json.loads(line[len("RESULTS"):])]


def make_shards(folder: Path, records: list[dict] | None = None) -> Path:
    from preprocess.assets import SAMPLE_PATH
    from preprocess.pipeline import PreprocessConfig, run_pipeline

    src = folder / "in.jsonl"
    if records is None:
        src.write_text("\n".join(SAMPLE_PATH.read_text().splitlines()[::40]) + "\n")
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_pipeline(PreprocessConfig(inputs=[src], output_dir=folder / "shards", extractor="rules",
                                         num_shards=1, workers=1))


@pytest.mark.slow
def test_configuration_errors_exit_2_with_one_line(tmp_path):
    shards = make_shards(tmp_path)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,\n  "oops"}}')
    (tmp_path / "batch.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 7,
                                                     "zero_optimization": {"stage": 2}}))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from preprocess.assets import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    llama = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2)
    LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    empty_latest = tmp_path / "run" / "checkpoints"
    empty_latest.mkdir(parents=True)
    (empty_latest / "latest").write_text("")
    base = ["--preset", "tiny_smoke", "--data.path", str(shards), "--metrics.tensorboard", "false",
            "--checkpoint.output_dir", str(tmp_path / "run")]
    cases = {
        "bad.json: line 2 column": ["--deepspeed", str(tmp_path / "bad.json")],
        "train_micro_batch_size_per_gpu = 7 contradicts": ["--deepspeed", str(tmp_path / "batch.json")],
        "deepspeed: config file 'nope.json' not found": ["--deepspeed", "nope.json"],
        f"data.path: {tmp_path / 'typo'}/index.json not found": ["--data.path", str(tmp_path / "typo")],
        "model_type 'llama' is not a diffusion-LM family": ["--model.name", str(tmp_path / "llama")],
        f"{empty_latest / 'latest'} is empty": [],
    }
    results = run_cases([base + extra for extra in cases.values()], cwd=tmp_path)
    for (needle, _), (code, err) in zip(cases.items(), results):
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (needle, code, err[-2000:])
        assert "Traceback" not in err
    assert not (tmp_path / "typo").exists()  # a misspelt path is not filled with the bundled sample


@pytest.mark.slow
def test_a_batch_with_nothing_supervised_warns(tmp_path):
    """Every response truncated away (long prompts, max_length 32): the run says so instead of training
    silently at loss 0, and counts such micro-batches."""
    long_prompt = " ".join(["Natalia sold clips to her friends in April and in May."] * 8)
    records = [{"id": f"r{i}", "domain": "math", "prompt": long_prompt + f" Case {i}?",
                "response": "The answer is 72."} for i in range(8)]
    shards = make_shards(tmp_path, records)
    out = tmp_path / "run"
    argv = ["--preset", "tiny_smoke", "--data.path", str(shards), "--data.max_length", "32",
            "--train.max_steps", "2", "--checkpoint.output_dir", str(out), "--checkpoint.export_hf", "false",
            "--metrics.tensorboard", "false"]
    [(code, err)] = run_cases([argv], cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "a micro-batch has no supervised token" in err and err.count("no supervised token") == 1
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["empty_batches"] for r in recs] == [1, 1] and all(r["loss"] == 0 for r in recs)
