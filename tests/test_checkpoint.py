"""Checkpoints: RNG capture, tag pruning, resume selection, and (one-rank ZeRO-3 subprocess runs) exact
resume after a SIGUSR1 pre-emption plus an HF export that reloads with the same logits."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import PreemptionFlag, capture_rng, find_resume, prune_checkpoints, restore_rng
from trainer.config import PREEMPT_EXIT_CODE, CheckpointConfig, ConfigError
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Every 10th record of the bundled sample through the real preprocessing pipeline."""
    from preprocess.assets import SAMPLE_PATH
    from preprocess.pipeline import PreprocessConfig, run_pipeline

    tmp = tmp_path_factory.mktemp("data")
    sub = tmp / "sub.jsonl"
    sub.write_text("\n".join(SAMPLE_PATH.read_text().splitlines()[::10]) + "\n")
    return run_pipeline(PreprocessConfig(inputs=[sub], output_dir=tmp / "shards", extractor="rules",
                                         num_shards=2, workers=1))


def train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch/train.py"), "--preset", "tiny_smoke",
            "--data.path", str(shards), "--checkpoint.output_dir", str(out), "--train.max_steps", str(STEPS),
            "--data.max_length", "192",
            "--train.save_every", "0", "--metrics.tensorboard", "false", *extra]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("RANK", None)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode in (0, PREEMPT_EXIT_CODE), \
        f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run(train_cmd(shards, out, "--train.sample_prompts", '["What is 2 + 3?"]',
                  "--train.sample_max_new_tokens", "32"))
    return out


def test_rng_roundtrip():
    gen = torch.Generator().manual_seed(5)
    state = capture_rng(gen)
    a = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what load_checkpoint does
    restore_rng(state, gen)
    b = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_prune_keeps_newest_and_latest(tmp_path):
    for s in (1, 2, 10, 20):
        (tmp_path / f"step_{s}").mkdir()
    (tmp_path / "latest").write_text("step_2")
    removed = {p.name for p in prune_checkpoints(tmp_path, keep_last=2)}
    assert removed == {"step_1"}  # step_2 survives because `latest` names it
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10", "step_2", "step_20"]


def test_find_resume_modes(tmp_path):
    cfg = CheckpointConfig(output_dir=str(tmp_path), resume="auto")
    assert find_resume(cfg) is None
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        (root / f"step_{s}").mkdir(parents=True)
    (root / "latest").write_text("step_4\n")
    # the tag `latest` names first, then the older kept ones (never a newer one)
    assert find_resume(cfg) == (root, ["step_4", "step_2"])
    with pytest.raises(ConfigError, match="resume=never"):
        find_resume(CheckpointConfig(output_dir=str(tmp_path), resume="never"))
    explicit = CheckpointConfig(output_dir="elsewhere", resume=str(root / "step_4"))
    assert find_resume(explicit) == (root, ["step_4"])
    (root / "latest").write_text("step_9")  # missing: tried first (and reported), then the others
    assert find_resume(cfg) == (root, ["step_9", "step_6", "step_4", "step_2"])
    (root / "latest").write_text("")
    with pytest.raises(ConfigError, match="latest is empty"):
        find_resume(cfg)


def test_preemption_flag_catches_sigusr1_and_sigterm():
    flag = PreemptionFlag().install()
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agreed() and flag.signum == signal.SIGUSR1
        flag.signum = None
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.agreed() and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert PreemptionFlag.exit_code == 75


@pytest.mark.slow
def test_sigusr1_checkpoint_then_exact_resume(shards, straight, tmp_path):
    """N steps straight == pre-empted by SIGUSR1 after k steps + resumed with the same command."""
    ref = losses(straight)
    assert sorted(ref) == list(range(1, STEPS + 1))
    out = tmp_path / "preempted"
    cmd = train_cmd(shards, out, "--train.sample_prompts", "[]")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("RANK", None)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPT_EXIT_CODE, log[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    k = int(tag.split("_")[1])
    assert 2 <= k < STEPS, tag
    assert "signal 10 received" in log
    assert not (out / "hf").exists()  # pre-emption skips the export
    p = run(cmd)
    assert f"resumed from {out / 'checkpoints' / tag} at step {k}" in p.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]  # bit-exact on CPU


@pytest.mark.slow
def test_hf_export_reloads_with_the_same_logits(straight):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.modeling import build_tiny_model

    hf = straight / "hf"
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.mask_token_id == 1 and tok.eos_token_id == 0
    exported = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    ref = build_tiny_model(tok)
    state = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    ref.tie_weights()
    ref.eval()
    ids = tok("Natalia sold 48 clips.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = exported(input_ids=ids).logits
        b = ref(input_ids=ids).logits
        fresh = build_tiny_model(tok)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, fresh, atol=1e-3)  # it is the trained model, not a re-initialised one
    samples = json.loads((straight / "samples.json").read_text())
    assert samples[0]["prompt"] == "What is 2 + 3?" and isinstance(samples[0]["completion"], str)


def test_metrics_record_every_field(straight):
    recs = read_metrics(straight / "metrics.jsonl")
    for key in ("loss", "loss_dense", "loss_other", "mask_rate", "mask_rate_dense", "mask_rate_other", "rho",
                "tokens_per_s", "lr", "grad_norm", "data_s", "mask_s", "step_s", "mfu", "empty_batches"):
        assert key in recs[-1] and recs[-1][key] is not None, key
    # complementary views: each supervised token is masked in exactly one of the two rows
    assert all(abs(r["mask_rate"] - 0.5) < 1e-9 for r in recs)
    assert 0.05 < recs[-1]["rho"] < 0.9
    assert recs[0]["lr"] > recs[-1]["lr"]  # cosine decay
    # the lr logged at step s is the one step s was taken with (schedule index s - 1), not the next one
    from trainer.components import lr_factor

    for r in recs:
        want = 1e-3 * lr_factor(r["step"] - 1, max_steps=STEPS, warmup_ratio=0.03, schedule="cosine",
                                min_lr_ratio=0.1)
        assert r["lr"] == pytest.approx(want, rel=1e-9), r
    # complementary: the overall rate is 0.5, the priority shows in the per-kind rates (soft, w = 2)
    dense = sum(r["mask_rate_dense"] for r in recs) / len(recs)
    other = sum(r["mask_rate_other"] for r in recs) / len(recs)
    assert dense > other > 0
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_loss_matches_stored_baseline(straight):
    """The smoke curve stored in tests/baseline_loss.json (regenerate it when the objective changes)."""
    base = json.loads((REPO / "tests" / "baseline_loss.json").read_text())["tiny_smoke_1rank"]
    got = losses(straight)
    assert len(base["loss"]) == STEPS
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], base["loss"], rtol=0.02)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(shards, tmp_path):
    """A truncated file in the newest tag: the run names it, resumes from the previous kept tag and
    repeats the lost steps exactly; with every tag corrupt it exits 2 listing them."""
    out = tmp_path / "run"
    cmd = train_cmd(shards, out, "--train.max_steps", "4", "--train.save_every", "2",
                    "--checkpoint.export_hf", "false", "--train.sample_prompts", "[]")
    run(cmd)
    ref = losses(out)
    ck = out / "checkpoints"
    bad = sorted((ck / "step_4").glob("*model_states.pt"))[0]
    bad.write_bytes(bad.read_bytes()[:100])
    (out / "metrics.jsonl").unlink()
    p = run(cmd)
    assert f"checkpoint {ck / 'step_4'} unusable: {bad} is unreadable" in p.stdout
    assert f"falling back to {ck / 'step_2'}" in p.stdout and "at step 2" in p.stdout
    got = losses(out)
    assert sorted(got) == [3, 4] and [got[3], got[4]] == [ref[3], ref[4]]
    for tag in ("step_2", "step_4"):
        for f in (ck / tag).glob("*model_states.pt"):
            f.write_bytes(f.read_bytes()[:100])
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("RANK", None)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert f"no usable checkpoint in {ck}" in errors[0] and "step_2:" in errors[0] and "step_4:" in errors[0]

