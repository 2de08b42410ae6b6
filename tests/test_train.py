"""End-to-end runs of launch/train.py: the real 2-rank ZeRO-3 CPU run through the `deepspeed` launcher
(preprocessing on rank 0 behind a barrier, training, checkpoint, exact 2-rank resume, HF export,
samples), and the LR schedule."""

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

from trainer.components import lr_factor
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 420, cwd: Path = REPO) -> subprocess.CompletedProcess:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


def deepspeed_cmd(*args: str) -> list[str]:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    return [exe, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
            "--deepspeed", "ds_configs/zero3.json", "--preset", "tiny_smoke", *args]


@pytest.mark.slow
def test_two_rank_zero3_run_resume_export(tmp_path):
    # Run from tmp_path: the default data.path (cache/sample-rules, relative) is built there.
    data, out1, out2 = tmp_path / "cache" / "sample-rules", tmp_path / "run1", tmp_path / "run2"
    common = ["--train.max_steps", "4", "--train.save_every", "2",
              "--data.max_length", "128", "--metrics.tensorboard", "false"]
    cmd = deepspeed_cmd(*common, "--checkpoint.output_dir", str(out1), "--train.sample_prompts",
                        '["Write a python function to add two numbers."]',
                        "--train.sample_max_new_tokens", "32")
    p = run(cmd, cwd=tmp_path)
    log = p.stdout + p.stderr
    port = cmd[cmd.index("--master_port") + 1]  # DeepSpeed's CPU all-reduce segments are released
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "preprocessing the bundled sample" in log and (data / "index.json").is_file()
    assert "ZeRO-3 | 2 rank(s) on cpu | fp32" in log and "attention sparse, recompute none" in log
    assert log.count("[train] tiny (") == 1  # rank 0 alone reports
    recs = read_metrics(out1 / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(abs(r["mask_rate"] - 0.5) < 1e-9 for r in recs)  # complementary pairs
    assert all(r["loss_dense"] > 0 and r["loss_other"] > 0 for r in recs)
    ck = out1 / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_4"
    for tag in ("step_2", "step_4"):
        assert {f"trainer_state_rank{r}.pt" for r in (0, 1)} <= {f.name for f in (ck / tag).iterdir()}
        assert len(list((ck / tag).glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-3 partitions
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out1 / "hf", trust_remote_code=True)
    assert model.config.model_type == "tiny_dllm"
    assert json.loads((out1 / "samples.json").read_text())[0]["prompt"].startswith("Write a python")

    # Resume the 2-rank run from its step-2 checkpoint elsewhere with selective recomputation (under
    # ZeRO-3 the recompute gathers the weights again, and trainer.recompute matches only the kept ops,
    # not the gathers): steps 3-4 must repeat exactly.
    p2 = run(deepspeed_cmd(*common, "--checkpoint.output_dir", str(out2), "--checkpoint.resume",
                           str(ck / "step_2"), "--checkpoint.export_hf", "false",
                           "--model.activation_checkpointing", "selective"), cwd=tmp_path)
    assert "at step 2" in p2.stdout
    resumed = {r["step"]: r["loss"] for r in read_metrics(out2 / "metrics.jsonl")}
    assert sorted(resumed) == [3, 4]
    assert [resumed[3], resumed[4]] == [recs[2]["loss"], recs[3]["loss"]]


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lambda s: lr_factor(s, max_steps=100, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    lin = lambda s: lr_factor(s, max_steps=100, warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.0)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5)
    assert lr_factor(70, max_steps=100, warmup_ratio=0.0, schedule="constant", min_lr_ratio=0.0) == 1.0


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from trainer.config import MetricsConfig
    from trainer.metrics import MetricsLogger, matmul_params, peak_flops_per_device
    from trainer.modeling import load_model

    log = MetricsLogger(MetricsConfig(progress=False), tmp_path, rank=0, max_steps=4, start_step=0,
                        run_config={"a": 1})
    log.record(2, {"loss": 3.5, "mfu": float("nan")})
    log.record(4, {"loss": 2.5})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 2, "loss": 3.5, "mfu": None},
                                                         {"step": 4, "loss": 2.5}]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    silent = MetricsLogger(MetricsConfig(), tmp_path / "r1", rank=1, max_steps=4, start_step=0)
    silent.record(1, {"loss": 1.0})
    silent.close()
    assert not (tmp_path / "r1").exists()  # only rank 0 writes
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_metrics(tmp_path / "bad.jsonl")
    model = load_model("tiny").model
    assert matmul_params(model) == sum(p.numel() for p in model.parameters())  # tied head counts once
    assert peak_flops_per_device(MetricsConfig(peak_flops=1e12), torch.device("cpu")) == 1e12
    assert peak_flops_per_device(MetricsConfig(), torch.device("cpu")) > 0


def test_attn_backend_selection():
    from trainer.components import attn_implementation_for, resolve_attn_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_attn_backend("auto", cpu) == "sparse"
    assert resolve_attn_backend("auto", cpu, "eager") == "sdpa"  # an explicit kernel is kept
    assert resolve_attn_backend("auto", cuda) == "flex"  # torch 2.13 ships flex_attention
    assert resolve_attn_backend("auto", cuda, "sdpa") == "sdpa"
    assert resolve_attn_backend("sdpa", cuda) == "sdpa"
    assert resolve_attn_backend("flex", cuda) == "flex"
    with pytest.raises(ValueError, match="objective.attn_backend: flex cannot train on CPU"):
        resolve_attn_backend("flex", cpu)
    with pytest.raises(ValueError, match="objective.attn_backend"):
        resolve_attn_backend("eager", cpu)
    assert attn_implementation_for("flex", None) == "flex_attention"
    assert resolve_attn_backend("sparse", cpu) == "sparse"
    with pytest.raises(ValueError, match="sparse is the CPU block-sparse SDPA"):
        resolve_attn_backend("sparse", cuda)
    assert attn_implementation_for("sparse", None) == "sdpa_block_sparse"
    with pytest.raises(ValueError, match="contradicts objective.attn_backend = sparse"):
        attn_implementation_for("sparse", "eager")
    assert attn_implementation_for("sdpa", None) is None
    assert attn_implementation_for("sdpa", "eager") == "eager"
    with pytest.raises(ValueError, match="model.attn_implementation: 'sdpa' contradicts"):
        attn_implementation_for("flex", "sdpa")
    with pytest.raises(ValueError, match="needs objective.attn_backend = flex"):
        attn_implementation_for("sdpa", "flex_attention")
    from trainer.config_io import load_config

    assert load_config([]).objective.attn_backend == "auto"
    with pytest.raises(ValueError, match="objective.attn_backend"):
        load_config(["--objective.attn_backend", "xformers"])
    with pytest.raises(ValueError, match="objective.packing"):
        load_config(["--objective.packing", "triple"])
    cfg = load_config(["--objective.packing", "rows", "--objective.masked_head", "false"])
    assert (cfg.objective.packing, cfg.objective.skip_prompt_blocks, cfg.objective.masked_head) == (
        "rows", True, False)


def test_flex_backend_gives_the_sdpa_loss():
    """The trainer's flex path (model loaded with flex_attention, the rows packed into one row with a
    BlockMask, masked-only LM head) gives the sdpa loss on the same masked batches.  Forward only: flex
    has no CPU backward; flex compiles through inductor on CPU (~5-15 s).  Compiled state is reset first:
    after other tests compiled flex at other shapes, dynamo recompiles with dynamic shapes, and torch
    2.13's CPU flex template then emits C++ that does not compile (``cur_kvSplitSize8`` undeclared)."""
    from trainer.components import attn_implementation_for
    from trainer.masking import MaskingConfig
    from trainer.modeling import call_model, load_model
    from trainer.objective import make_training_batch

    torch._dynamo.reset()
    losses = {}
    for backend in ("sdpa", "flex"):
        model = load_model("tiny", seed=0, attn_implementation=attn_implementation_for(backend, None)).model
        assert model.config._attn_implementation == ("flex_attention" if backend == "flex" else "sdpa")
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(2):
            ids = torch.randint(2, 4000, (2, 64), generator=g)
            sup = torch.ones(2, 64, dtype=torch.bool)
            sup[:, :8] = False
            sup[1, :40] = False  # row 1 keeps blocks 2-3 only: flex packs the rows into one, [1, T]
            dense = torch.rand(2, 64, generator=g) < 0.3
            tb = make_training_batch({"input_ids": ids, "supervised": sup, "dense": dense},
                                     MaskingConfig(block_size=16), 1, g, attn_backend=backend)
            with torch.no_grad():
                logits = call_model(model.eval(), **tb.model_inputs, keep=tb.keep)
            out.append(tb.loss(logits).loss)
        losses[backend] = torch.stack(out)
    torch.testing.assert_close(losses["flex"], losses["sdpa"], rtol=1e-4, atol=1e-5)


def test_weight_decay_skips_biases_norms_and_embeddings():
    from trainer.components import param_groups
    from trainer.modeling import load_model

    model = load_model("tiny", seed=0).model
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb  # tied: one parameter, excluded once
    assert id(emb) in ids(no_decay["params"]) and id(emb) not in ids(decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"] if p is not emb)
    assert all(p.dim() == 2 and "proj" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
