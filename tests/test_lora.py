"""LoRA (trainer.lora): per-family default targets, the refusals, the merged export against base +
adapter in one process, and (slow) a ZeRO-3 run per family from the fixtures in
../shared/reference_models: adapters train, the checkpoint holds only what trains, resume is exact, the
adapter and the merged model are exported and the merged logits equal base + adapter.

CI cost: as in tests/test_families.py, LLaDA2 (MoE, the paper's model) runs on 2 ranks through the
``deepspeed`` launcher, LLaDA and Dream on 1 rank (ZeRO-3 all the same); ZeRO-2 and ZeRO-3 with CPU
offload run the same LoRA flow on LLaDA, 1 rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import FIXTURES, _train, fixture
from transformers import AutoModelForCausalLM

from preprocess.assets import TOKENIZER_DIR
from trainer.config import ConfigError, LoraConfig
from trainer.families import FAMILIES
from trainer.metrics import read_metrics
from trainer.modeling import call_model, family_in, load_model

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/reference_models not present")
FAMILY_TYPES = ["llada", "Dream", "llada2_moe"]
META = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    with torch.no_grad():
        full = torch.ones(1, 1, n, n, dtype=torch.bool)
        return call_model(model.eval(), input_ids=ids, attention_mask=full,
                          position_ids=torch.arange(n)[None].expand(2, n))


def published_config(folder) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in META}


# ----------------------------------------------------------------------------------------- targets


def test_default_targets_are_attention_and_dense_mlp():
    from trainer.lora import target_modules

    expected = {
        "llada": {f"model.transformer.blocks.{i}.{n}" for i in range(2)
                  for n in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")},
        "Dream": {f"model.layers.{i}.{n}" for i in range(2)
                  for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
        # layer 0 is dense (first_k_dense_replace 1); layer 1 is MoE: its shared experts, not its routed ones
        "llada2_moe": {f"model.layers.{i}.attention.{n}" for i in range(2)
                       for n in ("query_key_value", "dense")}
        | {f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")}
        | {f"model.layers.1.mlp.shared_experts.{n}_proj" for n in ("gate", "up", "down")},
    }
    for model_type, want in expected.items():
        bundle = load_model(fixture(model_type), tokenizer=TOKENIZER_DIR)
        assert set(target_modules(bundle.model, bundle.family, LoraConfig(rank=4))) == want, model_type
    experts = set(target_modules(bundle.model, bundle.family, LoraConfig(rank=4, experts=True))) - want
    assert experts == {f"model.layers.1.mlp.experts.{e}.{n}_proj" for e in range(4)
                       for n in ("gate", "up", "down")}


def test_bad_targets_are_refused_naming_the_pattern():
    from trainer.lora import target_modules

    bundle = load_model(fixture("llada2_moe"), tokenizer=TOKENIZER_DIR)
    model, fam = bundle.model, bundle.family
    cases = [(r"model\.layers\.\d+\.nope", "matches no module"),
             (r"model\.layers\.\d+\.input_layernorm", "not a linear layer"),
             (r".*_proj", "the routed expert model.layers.1.mlp.experts.0.gate_proj; set lora.experts"),
             (r"model\.layers\.(", "is not a regular expression")]
    for pattern, needle in cases:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            target_modules(model, fam, LoraConfig(rank=4, target_modules=[pattern]))
    dream = load_model(fixture("Dream"), tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConfigError, match="lora.experts: Dream has no routed MoE experts"):
        target_modules(dream.model, dream.family, LoraConfig(rank=4, experts=True))
    with pytest.raises(ValueError, match="lora.rank: must be an int >= 0"):
        LoraConfig(rank=-1)


# ------------------------------------------------------------------------------------ merged export


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_merged_export_equals_base_plus_adapter(model_type, tmp_path):
    """Adapters with random (non-zero) B on every default target, experts too where there are some: the
    merged folder loads without peft, in the published layout, with the logits of base + adapter."""
    from peft import PeftModel

    from trainer.lora import apply_lora, export_adapter, export_merged

    src = fixture(model_type)
    bundle = load_model(src, tokenizer=TOKENIZER_DIR)
    lcfg = LoraConfig(rank=4, alpha=8, experts=bool(bundle.family.lora_expert_targets))
    model = apply_lora(bundle.model, bundle.family, lcfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = load_file(src / "reference.safetensors")["input_ids"]
    want = logits_of(model, ids)
    base = logits_of(AutoModelForCausalLM.from_pretrained(src), ids)
    assert (want - base).abs().max() > 1e-3  # the adapters change the model

    export_adapter(model, bundle.tokenizer, tmp_path / "adapter")
    export_merged(model, bundle.tokenizer, tmp_path / "hf")
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert set(load_file(tmp_path / "hf" / "model.safetensors")) == set(load_file(src / "model.safetensors"))
    assert published_config(tmp_path / "hf") == published_config(src)
    torch.testing.assert_close(logits_of(merged, ids), want, atol=1e-5, rtol=0)
    # the adapter folder, read back by peft (unmerged) and by load_model (merged on load)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(unmerged, ids), want, atol=1e-5, rtol=0)
    again = load_model(src, adapter=tmp_path / "adapter").model
    torch.testing.assert_close(logits_of(again, ids), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ ZeRO runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from preprocess.assets import SAMPLE_PATH
    from preprocess.pipeline import PreprocessConfig, run_pipeline

    tmp = tmp_path_factory.mktemp("lora-data")
    sub = tmp / "sub.jsonl"
    sub.write_text("\n".join(SAMPLE_PATH.read_text().splitlines()[::20]) + "\n")
    return run_pipeline(PreprocessConfig(inputs=[sub], output_dir=tmp / "shards", extractor="rules",
                                         num_shards=1, workers=1))


def _lora_run(ranks: int, model_type: str, shards, tmp_path, deepspeed: str = "ds_configs/zero3.json",
              resume_args: tuple[str, ...] = ()):
    """Train 4 steps (checkpoints at 2 and 4), then resume from step 2 into another folder (with
    ``resume_args`` added)."""
    src = fixture(model_type)
    family_in(src)  # registers the family's classes for the checks made in this process
    layout = FAMILIES[model_type].layouts[0]
    common = ["--deepspeed", deepspeed, "--model.name", str(src), "--model.tokenizer", str(TOKENIZER_DIR),
              "--data.path", str(shards), "--data.max_length", "64", "--masking.block_size", "8",
              "--objective.layout", layout, "--train.max_steps", "4", "--train.save_every", "2",
              "--metrics.tensorboard", "false", "--metrics.progress", "false", "--lora.rank", "8",
              "--lora.alpha", "16", "--lora.dropout", "0.1", "--optim.lr", "1e-2"]
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    log = _train(ranks, *common, "--checkpoint.output_dir", str(out1), "--lora.export_merged", "true",
                 "--train.sample_prompts", '["What is 2 + 3?"]', "--train.sample_max_new_tokens", "16")
    _train(ranks, *common, "--checkpoint.output_dir", str(out2), "--checkpoint.resume",
           str(out1 / "checkpoints" / "step_2"), "--checkpoint.export_hf", "false", *resume_args)
    return src, out1, out2, log


def _check_resume_and_checkpoint(out1, out2, ranks: int) -> None:
    recs = read_metrics(out1 / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in recs)
    resumed = {r["step"]: r["loss"] for r in read_metrics(out2 / "metrics.jsonl")}
    assert [resumed[3], resumed[4]] == [recs[2]["loss"], recs[3]["loss"]]
    # the checkpoint holds what trains: adapters (module states and their optimizer partitions) only
    tag = out1 / "checkpoints" / "step_4"
    for f in tag.glob("*model_states.pt"):
        state = torch.load(f, weights_only=True)
        params = [k for k in state["module"] if k.endswith(".weight") and "lora_" not in k]
        assert params == [], params[:3]
        assert not state.get("frozen_param_fragments")
    assert len(list(tag.glob(f"{'*'}optim_states.pt"))) == ranks


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "ranks"), [("llada2_moe", 2), ("llada", 1), ("Dream", 1)])
def test_zero3_lora_train_resume_export_merge(model_type, ranks, shards, tmp_path):
    from peft import PeftModel

    src, out1, out2, log = _lora_run(ranks, model_type, shards, tmp_path)
    assert f"{model_type}) | ZeRO-3 | {ranks} rank(s)" in log and "[train] LoRA r=8 alpha=16.0" in log
    assert "recompute selective" in log  # the CPU default, under ZeRO-3 (MoE leaves included)
    _check_resume_and_checkpoint(out1, out2, ranks)

    # the adapter trained, and the merged export equals base + adapter
    adapter = load_file(out1 / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    ids = load_file(src / "reference.safetensors")["input_ids"]
    plus = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), out1 / "adapter")
    merged, info = AutoModelForCausalLM.from_pretrained(out1 / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert published_config(out1 / "hf") == published_config(src)
    want = logits_of(plus, ids)
    torch.testing.assert_close(logits_of(merged, ids), want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, logits_of(AutoModelForCausalLM.from_pretrained(src), ids), atol=1e-4)
    assert json.loads((out1 / "samples.json").read_text())[0]["prompt"] == "What is 2 + 3?"


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["ds_configs/zero2.json", "ds_configs/zero3_offload.json"])
def test_lora_under_zero2_and_zero3_offload(deepspeed, shards, tmp_path):
    # ZeRO-2: the resumed steps run with selective activation recomputation and must repeat exactly
    recompute = ("--model.activation_checkpointing", "selective") if "zero2" in deepspeed else ()
    _, out1, out2, log = _lora_run(1, "llada", shards, tmp_path, deepspeed=deepspeed, resume_args=recompute)
    assert "[train] LoRA r=8" in log
    _check_resume_and_checkpoint(out1, out2, 1)
    assert (out1 / "adapter" / "adapter_model.safetensors").is_file()


def test_evaluate_base_plus_adapter(tmp_path):
    """``dm-evaluate run --model BASE --adapter DIR`` decodes what the merged export decodes."""
    from evaluation.cli import main
    from trainer.lora import apply_lora, export_adapter, export_merged

    bundle = load_model("tiny", seed=0)  # dm-evaluate's --seed 0 builds the same base
    model = apply_lora(bundle.model, bundle.family, LoraConfig(rank=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    export_adapter(model, bundle.tokenizer, tmp_path / "run" / "adapter")
    export_merged(model, bundle.tokenizer, tmp_path / "run" / "hf")
    gsm8k = Path(__file__).resolve().parent / "data" / "eval" / "gsm8k_mini.jsonl"
    args = ["--benchmarks", "gsm8k", "--gsm8k", str(gsm8k), "--limit", "2", "--gen-length", "16",
            "--block-size", "16", "--steps-per-block", "4", "--out", str(tmp_path / "eval")]
    assert main(["run", "--model", "tiny", "--adapter", str(tmp_path / "run" / "adapter"), *args]) == 0
    assert main(["run", "--model", str(tmp_path / "run" / "hf"), "--name", "merged", *args]) == 0
    plus = json.loads((tmp_path / "eval" / "tiny_run.json").read_text())
    merged = json.loads((tmp_path / "eval" / "merged.json").read_text())
    assert plus["name"] == "tiny + run" and plus["adapter"] == str(tmp_path / "run" / "adapter")
    gen = [[r["generation"] for r in res["benchmarks"]["gsm8k"]["records"]] for res in (plus, merged)]
    assert gen[0] == gen[1]
