"""The published families through the project's one convention (trainer.families, trainer.modeling):
reference logits through ``call_model`` (Dream's shift applied there), the refusals, and a ZeRO-3 run
per family from the fixtures in ../shared/reference_models: train from preprocessed shards, resume
exactly, export in the published layout, reload with equal logits, decode tokens.

Every family runs on 2 ranks through the ``deepspeed`` launcher (70-90 s each on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preprocess.assets import TOKENIZER_DIR
from trainer.families import FAMILIES
from trainer.metrics import read_metrics
from trainer.modeling import call_model, family_in, load_model

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "reference_models"
FOLDER = {"llada": "llada", "Dream": "dream", "llada2_moe": "llada2"}
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/reference_models not present")


def fixture(model_type: str) -> Path:
    return FIXTURES / FOLDER[model_type]


@pytest.mark.parametrize("model_type", list(FOLDER))
def test_call_model_aligns_reference_logits(model_type):
    """logit i predicts token i through call_model for every family: Dream's raw logits shifted right by
    one (token 0 keeps its own), the others unchanged; a kept slice gives the same values."""
    bundle = load_model(fixture(model_type), tokenizer=TOKENIZER_DIR)
    assert bundle.family is FAMILIES[model_type] and bundle.mask_token_id == 1 and bundle.eos_token_id == 0
    ref = load_file(fixture(model_type) / "reference.safetensors")
    ids, raw = ref["input_ids"], ref["logits_full"]  # [2, 48], [2, 48, V]
    want = torch.cat([raw[:, :1], raw[:, :-1]], 1) if bundle.family.logit_shift else raw
    n = ids.shape[1]
    pos = torch.arange(n)[None].expand(2, n)
    full = torch.ones(1, 1, n, n, dtype=torch.bool)
    model = bundle.model.eval()
    with torch.no_grad():
        got = call_model(model, input_ids=ids, attention_mask=full, position_ids=pos)
        part = call_model(model, input_ids=ids, attention_mask=full, position_ids=pos, keep=slice(9, 30))
        head = call_model(model, input_ids=ids, attention_mask=full, position_ids=pos, keep=slice(0, 7))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(part, want[:, 9:30], atol=1e-5, rtol=0)
    torch.testing.assert_close(head, want[:, :7], atol=1e-5, rtol=0)


def test_dream_is_refused_where_its_shift_breaks_the_context():
    from trainer.components import load_for_training
    from trainer.config import ConfigError
    from trainer.config_io import load_config
    from trainer.generation import DecodeConfig, generate_ids

    cfg = load_config(["--model.name", str(fixture("Dream")), "--objective.layout", "block"])
    with pytest.raises(ConfigError, match="objective.layout: layout 'block' is not supported for Dream"):
        load_for_training(cfg, bf16=False, attn_backend="sdpa", recompute="none", ds_config={},
                          vocab_size=4096)
    model = load_model(fixture("Dream"), tokenizer=TOKENIZER_DIR).model.eval()
    for bad in (DecodeConfig(gen_length=8, block_size=8, layout="block"),
                DecodeConfig(gen_length=8, block_size=8, kv_cache=True)):
        needle = "decoding: layout 'block'"
        with pytest.raises(ValueError, match=needle):
            generate_ids(model, [[5, 6, 7]], bad, mask_token_id=1, stop_token_ids=[0], pad_token_id=0)
    out = generate_ids(model, [[5, 6, 7]], DecodeConfig(gen_length=8, block_size=8, steps_per_block=2,
                                                         layout="full"),
                       mask_token_id=1, stop_token_ids=[], pad_token_id=0)
    assert len(out[0]) == 8


def test_zero3_leaf_modules_match_the_model():
    """The family table names the same MoE class the model declares, and it exists in the model."""
    fam = family_in(fixture("llada2_moe"))
    model = load_model(fixture("llada2_moe"), tokenizer=TOKENIZER_DIR).model
    assert tuple(type(model)._z3_leaf_modules) == fam.z3_leaf_modules
    assert [c.__name__ for c in fam.leaf_classes(model)] == list(fam.z3_leaf_modules)


# ------------------------------------------------------------------------------------- ZeRO-3 runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from preprocess.assets import SAMPLE_PATH
    from preprocess.pipeline import PreprocessConfig, run_pipeline

    tmp = tmp_path_factory.mktemp("fam-data")
    sub = tmp / "sub.jsonl"
    sub.write_text("\n".join(SAMPLE_PATH.read_text().splitlines()[::20]) + "\n")
    return run_pipeline(PreprocessConfig(inputs=[sub], output_dir=tmp / "shards", extractor="rules",
                                         num_shards=1, workers=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(ranks: int, *args: str) -> str:
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "launch/train.py")]
    else:
        exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [exe, "--num_gpus", str(ranks), "--master_port", str(_free_port()),
               str(REPO / "launch/train.py")]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    p = subprocess.run([*cmd, "--deepspeed", "ds_configs/zero3.json", "--preset", "tiny_smoke", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "ranks"), [("llada2_moe", 2), ("llada", 2), ("Dream", 2)])
def test_zero3_train_resume_export_reload_decode(model_type, ranks, shards, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from trainer.generation import DecodeConfig, generate_ids

    src = fixture(model_type)
    layout = FAMILIES[model_type].layouts[0]
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    common = ["--model.name", str(src), "--model.tokenizer", str(TOKENIZER_DIR), "--data.path", str(shards),
              "--data.max_length", "64", "--masking.block_size", "8", "--objective.layout", layout,
              "--train.max_steps", "4", "--train.save_every", "2", "--metrics.tensorboard", "false",
              "--metrics.progress", "false"]
    log = _train(ranks, *common, "--checkpoint.output_dir", str(out1), "--train.sample_prompts",
                 '["What is 2 + 3?"]', "--train.sample_max_new_tokens", "16")
    assert f", {model_type}) | ZeRO-3 | {ranks} rank(s)" in log
    recs = read_metrics(out1 / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in recs)

    # exact resume from step 2
    _train(ranks, *common, "--checkpoint.output_dir", str(out2), "--checkpoint.resume",
           str(out1 / "checkpoints" / "step_2"), "--checkpoint.export_hf", "false")
    resumed = {r["step"]: r["loss"] for r in read_metrics(out2 / "metrics.jsonl")}
    assert [resumed[3], resumed[4]] == [recs[2]["loss"], recs[3]["loss"]]

    # the export is in the published layout and holds the trained weights
    hf = out1 / "hf"
    meta = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}
    published = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if k not in meta}
    exported = {k: v for k, v in json.loads((hf / "config.json").read_text()).items() if k not in meta}
    assert exported == published
    assert set(load_file(hf / "model.safetensors")) == set(load_file(src / "model.safetensors"))
    reloaded = load_model(hf).model.eval()
    trained = AutoModelForCausalLM.from_pretrained(src).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(out1 / "checkpoints"))
    trained.load_state_dict(state, strict=True)
    fresh = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = load_file(src / "reference.safetensors")["input_ids"]
    n = ids.shape[1]
    kw = {"input_ids": ids, "attention_mask": torch.ones(1, 1, n, n, dtype=torch.bool),
          "position_ids": torch.arange(n)[None].expand(2, n)}
    with torch.no_grad():
        a, b, c = (call_model(m, **kw) for m in (reloaded, trained, fresh))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c, atol=1e-4)  # it is the trained model

    # block decoding produces tokens (and the end-of-run samples were written)
    assert json.loads((out1 / "samples.json").read_text())[0]["prompt"] == "What is 2 + 3?"
    cfg = DecodeConfig(gen_length=16, block_size=8, steps_per_block=4, layout=layout,
                       kv_cache=FAMILIES[model_type].kv_cache and layout == "block")
    out = generate_ids(reloaded, [[5, 6, 7, 8, 9]], cfg, mask_token_id=1, stop_token_ids=[], pad_token_id=0)
    assert len(out[0]) == 16 and 1 not in out[0]
