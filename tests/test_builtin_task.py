"""The built-in task: deterministic generation, held-out disjointness, exact spans, data building."""

from __future__ import annotations

import json

import pytest

from preprocess.extractors.registry import get_extractor
from tasks.builtin import EXTRACTORS
from tasks.chain import ChainSpec, Problem, is_heldout, parse_answer, problems, span_agreement, truth_spans


def test_generator_is_deterministic_and_seeded():
    a = list(problems("train", 200, seed=3))
    assert a == list(problems("train", 200, seed=3))
    assert a != list(problems("train", 200, seed=4))
    assert list(problems("heldout", 50)) == list(problems("heldout", 50))


def test_heldout_is_disjoint_from_train_and_distinct():
    train = {p.prompt for p in problems("train", 5000)}
    held = [p.prompt for p in problems("heldout", 200)]
    assert len(set(held)) == 200
    assert not train & set(held)
    assert all(is_heldout(h) for h in held) and not any(is_heldout(t) for t in train)
    # the split is a property of the problem, not of the seed
    assert not {p.prompt for p in problems("train", 2000, seed=9)} & set(held)


def test_problems_stay_in_range_and_chain_is_right():
    spec = ChainSpec()
    for p in problems("train", 500):
        assert spec.min_steps <= len(p.ops) <= spec.max_steps
        assert all(0 <= v <= spec.max_value for v in p.values)
        assert all(1 <= abs(op) <= spec.max_operand for op in p.ops)
        assert parse_answer(p.response) == p.answer == p.start + sum(p.ops)


def test_truth_spans_are_the_computed_values():
    p = Problem(7, (2, -3, 1))
    assert p.prompt == "7 + 2 - 3 + 1 ="
    assert p.response == "7+2=9\n9-3=6\n6+1=7\n#### 7"
    spans = truth_spans(p.response)
    assert [(p.response[s.start:s.end], s.kind) for s in spans] == [
        ("9", "result"), ("6", "result"), ("7", "result"), ("7", "final_answer")]
    assert truth_spans("12+3=15\n#### 15")[-1].kind == "final_answer"


def test_parse_answer():
    assert parse_answer("1+2=3\n#### 3") == 3
    assert parse_answer("#### -4 and #### 5") == -4
    assert parse_answer("1+2=3") is None


def test_truth_extractor_is_registered_and_rules_overmark():
    assert get_extractor(EXTRACTORS["chain-truth"]).name == "chain-truth"
    truth = span_agreement(EXTRACTORS["chain-truth"], 200)
    assert truth["precision"] == truth["recall"] == 1.0
    rules = span_agreement("rules", 200)
    # the rules mark every whole equation: all true characters, plus the copied operands and glue
    assert rules["recall"] == 1.0 and rules["precision"] < 0.5 and rules["share_marked"] > truth["share_true"]


def test_build_data_marks_exactly_the_results(tmp_path):
    from preprocess.shards import ShardedDataset
    from tasks.builtin import build_data, source_path
    from trainer.config import TaskConfig

    task = TaskConfig(train_size=40)
    out = build_data(task, tmp_path / "chain")
    lines = source_path(tmp_path / "chain").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["id"] == "chain-train-0"
    ds = ShardedDataset(out)
    assert len(ds) == 40
    from transformers import AutoTokenizer

    from preprocess.assets import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    # the answer token is " 7" (space included): compare without spaces
    dense_text = sorted(tok.decode(ds[i].tokens[ds[i].flags & 2 > 0]).replace(" ", "")
                        for i in range(len(ds)))
    records = [json.loads(line) for line in lines]
    assert sorted("".join(r["response"][s.start:s.end] for s in truth_spans(r["response"]))
                  for r in records) == dense_text


@pytest.mark.parametrize("bad", [{"name": "x"}, {"fraction": 1.5}, {"eval_size": -1}])
def test_task_config_names_bad_field(bad):
    from trainer.config import TaskConfig

    with pytest.raises(ValueError, match=r"task\.\w+"):
        TaskConfig(**bad)


@pytest.mark.slow
def test_full_layout_trains_exactly_like_the_block_layout_on_one_block_samples(tmp_path):
    """Why tiny_default may train the full layout: on the task's one-block samples the block layout's
    noisy half sees itself only and its clean half feeds no loss, so both give the same losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tasks.builtin import build_data
    from trainer.config import TaskConfig

    repo = Path(__file__).resolve().parents[1]
    data = build_data(TaskConfig(train_size=64), tmp_path / "chain")
    curves = {}
    for layout in ("block", "full"):
        out = tmp_path / layout
        cmd = [sys.executable, str(repo / "launch/train.py"), "--data.path", str(data),
               "--checkpoint.output_dir", str(out), "--objective.layout", layout, "--train.max_steps", "3",
               "--train.micro_batch_size", "4", "--train.log_every", "1", "--train.save_every", "0",
               "--checkpoint.export_hf", "false", "--metrics.tensorboard", "false",
               "--metrics.progress", "false", "--task.eval_size", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[layout] = [r[k] for r in recs if "loss" in r for k in ("loss", "loss_dense", "mask_rate")]
    assert len(curves["full"]) == 3 * 3
    assert curves["full"] == pytest.approx(curves["block"], rel=1e-4)


def test_decoding_sees_a_problem_exactly_as_training_does(tmp_path):
    """The held-out decoding's first model call (all answer slots masked) must be the training forward of
    the same problem with its whole response masked: same ids, positions and visible tokens, hence the
    same logits.  A model that scores no better on its training problems than on held-out ones (command
    1 once did) is first checked here for a training/decoding disagreement."""
    import torch

    from preprocess.shards import ShardedDataset
    from tasks.builtin import GEN_LENGTH, build_data
    from trainer.config import TaskConfig
    from trainer.data import collate
    from trainer.generation import generate, supports_kv_cache
    from trainer.masking import BLOCK_SIZE
    from trainer.modeling import call_model, load_model
    from trainer.objective import build_model_inputs

    ds = ShardedDataset(build_data(TaskConfig(train_size=4), tmp_path / "chain"))
    bundle = load_model("tiny", seed=0)
    model = bundle.model.eval()
    sample = ds[0]
    batch = collate([sample.tokens], [sample.flags], max_length=256, block_size=BLOCK_SIZE,
                    eos_id=bundle.eos_token_id)
    sup = batch["supervised"]
    train_in = build_model_inputs(batch["input_ids"], sup, bundle.mask_token_id, layout="full")
    with torch.no_grad():
        train_logits = call_model(model, **train_in)[sup]  # [n_response, V]

    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out.logits.clone())),
                                with_kwargs=True)
    prompt = bundle.tokenizer.decode(sample.tokens[sup[0, :len(sample.tokens)].logical_not().numpy()])
    generate(model, bundle.tokenizer, [prompt], mask_token_id=bundle.mask_token_id,
             eos_token_id=bundle.eos_token_id, gen_length=GEN_LENGTH, block_size=BLOCK_SIZE,
             steps_per_block=BLOCK_SIZE, use_chat_template=False, kv_cache=supports_kv_cache(model))
    first, logits = calls[0]
    assert first["input_ids"].tolist() == train_in["input_ids"].tolist()
    assert first["position_ids"].tolist() == train_in["position_ids"].tolist()
    assert bool(first["attention_mask"].all())  # one block: every token sees every other, as in training
    assert torch.allclose(logits[0][sup[0]], train_logits, atol=1e-4)
