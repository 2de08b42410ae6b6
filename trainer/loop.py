"""The DeepSpeed trainer: build everything from a ``Config``, run steps, checkpoint, export, sample.

One optimizer step (``train_step``) on every rank, for each of ``grad_accum`` micro-batches:

    batch  = next(loader)                                   # [B, L] ids / supervised / dense (CPU)
    tb     = make_training_batch(batch, masking, mask_id,   # masks drawn on the device, in the step:
                                 generator, layout)         #   [2B, 2L] inputs with complementary views
    logits = call_model(engine, **tb.model_inputs,          # [2B, L, V]: the LM head runs on the
                        keep=slice(0, L))                   #   noisy half only (logits_to_keep)
    loss   = tb.loss(logits, weighting)                     # CE on masked tokens of the noisy half
    engine.backward(loss); engine.step()                    # DeepSpeed scales by 1/grad_accum and
                                                            # steps optimizer + LR at the boundary

ZeRO stage, offload and precision come from the DeepSpeed JSON (``--deepspeed``), whose "auto"
values are filled from the config (``trainer.config_io.resolve_deepspeed_config``).  The device is
``deepspeed.get_accelerator()``'s: the same command runs on CPU (gloo, fp32) and on GPUs (nccl,
bf16).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.config import Config
from trainer.config_io import find_deepspeed_config, resolve_deepspeed_config, to_dict
from trainer.data import BatchLoader, batch_rho
from trainer.metrics import MetricsLogger, matmul_params, peak_flops_per_device
from trainer.modeling import ModelBundle, call_model, load_model
from trainer.objective import make_training_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a one-rank group for `python train.py`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain python / in-process tests: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)


def lr_factor(step: int, *, max_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of optim.lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def resolve_attn_backend(choice: str, device: torch.device) -> str:
    """objective.attn_backend -> 'sdpa' or 'flex'.

    'auto' picks flex on CUDA when torch ships ``flex_attention``: its BlockMask skips the masked-out
    tiles of the [2L, 2L] block-diffusion scores (about half of them for long sequences), compiled
    once per shape.  Elsewhere 'auto' is sdpa: flex has no backward on CPU (torch 2.13 raises
    "FlexAttention does not support backward on CPU"), so training cannot use it there.  An explicit
    'flex' where it cannot train is an error naming the key, not a silent fallback.
    """
    if choice not in ("auto", "sdpa", "flex"):
        raise ValueError(f"objective.attn_backend: must be auto, sdpa or flex, got {choice!r}")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401

        has_flex = True
    except ImportError:
        has_flex = False
    if choice == "flex" and not has_flex:
        raise ValueError(f"objective.attn_backend: flex requested but torch {torch.__version__} has no "
                         f"torch.nn.attention.flex_attention; use sdpa")
    if choice == "flex" and device.type == "cpu":
        raise ValueError("objective.attn_backend: flex cannot train on CPU (flex attention has no CPU "
                         "backward); use sdpa or auto")
    if choice == "auto":
        return "flex" if device.type == "cuda" and has_flex else "sdpa"
    return choice


def attn_implementation_for(backend: str, requested: str | None) -> str | None:
    """The attn_implementation to load the model with for ``backend`` (None: the model's own).

    A flex BlockMask is only understood by transformers' flex_attention path, so flex forces it; an
    explicit model.attn_implementation that contradicts the backend is an error naming both keys.
    """
    if backend == "flex":
        if requested not in (None, "flex_attention"):
            raise ValueError(f"model.attn_implementation: {requested!r} contradicts objective.attn_backend "
                             f"= flex (which needs 'flex_attention'); drop one of them")
        return "flex_attention"
    if requested == "flex_attention":
        raise ValueError("model.attn_implementation: 'flex_attention' needs objective.attn_backend = flex "
                         "(the sdpa backend passes a dense bool mask)")
    return requested


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; biases, norms and embeddings get none.

    Why: decaying norm gains pulls them towards 0 (not their neutral 1), and decaying embedding rows
    shrinks rare tokens that receive few gradients (the standard GPT/Llama recipe excludes both).
    With tied embeddings the LM head is the embedding matrix and is excluded with it.  Parameters are
    listed once (tied weights are one Parameter).
    """
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeds else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepare_data(cfg: Config, rank: int) -> Path:
    """The shard folder; build task.name's data into it first if missing (rank 0, others wait)."""
    path = Path(cfg.data.path)
    if not (path / "index.json").is_file():
        if not cfg.data.preprocess_if_missing:
            raise FileNotFoundError(f"data.path: {path}/index.json not found and "
                                    f"data.preprocess_if_missing is false; run `dm-preprocess` first")
        if rank == 0:
            from tasks.builtin import build_data

            build_data(cfg.task, path)
    if dist.is_initialized():
        dist.barrier()
    if not (path / "index.json").is_file():
        raise FileNotFoundError(f"data.path: {path}/index.json still missing after preprocessing")
    return path


@dataclass(slots=True)
class StepStats:
    """Sums over the micro-batches of one step on this rank (tensors on the device, no sync)."""

    loss: float = 0.0
    ce_dense: Any = 0.0
    ce_other: Any = 0.0
    n_dense: Any = 0
    n_other: Any = 0
    n_masked: Any = 0
    n_supervised: Any = 0
    rho: float = 0.0
    model_tokens: int = 0
    sample_tokens: int = 0
    data_s: float = 0.0
    mask_s: float = 0.0
    step_s: float = 0.0
    extra: dict = field(default_factory=dict)


class Trainer:
    """Everything of one run; ``train()`` returns the process exit code (0, or 75 after pre-emption)."""

    def __init__(self, cfg: Config) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        # DeepSpeed calls the c10d *_tensor collectives that torch 2.13 deprecates: one warning per step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        acc = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
        if self.device.type != "cpu":
            acc.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one CPU share its cores; oversubscription would slow every rank down.
            # LOCAL_WORLD_SIZE: torchrun / slurm_env.py; LOCAL_SIZE: the deepspeed launcher.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
                              or self.world)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.out_dir = Path(cfg.checkpoint.output_dir)
        self._seed_everything(cfg.train.seed)

        data_path = prepare_data(cfg, self.rank)
        from preprocess.shards import ShardedDataset

        self.dataset = ShardedDataset(data_path)

        self.bf16 = (cfg.model.dtype == "bfloat16" or
                     (cfg.model.dtype == "auto" and self.device.type != "cpu" and acc.is_bf16_supported()))
        ds_path = find_deepspeed_config(cfg.deepspeed)
        with open(ds_path, encoding="utf-8") as f:
            raw = json.load(f)
        self.ds_config = resolve_deepspeed_config(cfg, raw, world_size=self.world, bf16=self.bf16,
                                                  source=str(ds_path))
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self._hf_ds = None
        if self.zero_stage == 3 and cfg.model.name != "tiny":
            # Keeps from_pretrained partitioning weights while loading (zero.Init), so a model larger
            # than one device loads at all; must stay alive until deepspeed.initialize.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        self.attn_backend = resolve_attn_backend(cfg.objective.attn_backend, self.device)
        self.bundle: ModelBundle = load_model(
            cfg.model.name, tokenizer=cfg.model.tokenizer,
            dtype=torch.bfloat16 if self.bf16 else torch.float32,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=attn_implementation_for(self.attn_backend, cfg.model.attn_implementation),
            seed=cfg.train.seed)
        if self.dataset.vocab_size > self.bundle.model.config.vocab_size:
            raise ValueError(f"data.path: shards use a vocabulary of {self.dataset.vocab_size} tokens but "
                             f"model {cfg.model.name} has {self.bundle.model.config.vocab_size}: the data "
                             f"was tokenized with another tokenizer ({self.dataset.index.get('tokenizer')})")
        self.n_flop_params = matmul_params(self.bundle.model)

        model = self.bundle.model
        groups = param_groups(model, cfg.optim.weight_decay)
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                          weight_decay=cfg.optim.weight_decay)
        o = cfg.optim
        lam = lambda s: lr_factor(s, max_steps=cfg.train.max_steps, warmup_ratio=o.warmup_ratio,
                                  schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=sched,
            config=self.ds_config)
        # Released now: while alive, every later from_pretrained (the exported model reloaded for the
        # samples) would be partitioned by zero.Init too.
        self._hf_ds = None

        self.loader = BatchLoader(self.dataset, cfg.data, block_size=cfg.masking.block_size,
                                  eos_id=self.bundle.eos_token_id, rank=self.rank, world_size=self.world,
                                  micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
        # One mask stream per rank, on the device where the masks are drawn.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1_000_003 + 7919 * (self.rank + 1))
        self.step = 0
        self.tokens_seen = 0
        self._resume_note = ""
        found = ckpt.find_resume(cfg.checkpoint)
        if found is not None:
            state = ckpt.load_checkpoint(self.engine, *found, generator=self.generator)
            self.step = int(state["step"])
            self.tokens_seen = int(state.get("tokens_seen", 0))
            self.loader.load_state_dict(state["loader"])
            self._resume_note = f"resumed from {found[0] / found[1]} at step {self.step}" + (
                f" (inexact: {state['inexact']})" if "inexact" in state else "")
        self.preempt = ckpt.PreemptionFlag().install()
        self.peak = peak_flops_per_device(cfg.metrics, self.device)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics = MetricsLogger(cfg.metrics, self.out_dir, rank=self.rank, max_steps=cfg.train.max_steps,
                                     start_step=self.step, run_config=to_dict(cfg))
        self.metrics.print(
            f"[train] {cfg.model.name} ({self.n_flop_params / 1e6:.1f}M matmul params, "
            f"{self.bundle.family}) | "
            f"ZeRO-{self.zero_stage} | {self.world} rank(s) on {self.device.type} | "
            f"{'bf16' if self.bf16 else 'fp32'} | masking {cfg.masking.mode} w={cfg.masking.weight} "
            f"block {cfg.masking.block_size} sigma U[{cfg.masking.sigma_min}, {cfg.masking.sigma_max}] "
            f"complementary={cfg.masking.complementary} | layout {cfg.objective.layout}, "
            f"attention {self.attn_backend}")
        rho = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in self.dataset.rho.items())
        self.metrics.print(f"[train] data {data_path}: {self.loader.summary()}; info-dense share rho: {rho}")
        if self._resume_note:
            self.metrics.print(f"[train] {self._resume_note}")

    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------------------------------- step

    def train_step(self) -> StepStats:
        """One optimizer step: grad_accum micro-batches through forward/backward, then engine.step()."""
        cfg = self.cfg
        st = StepStats()
        t_step = time.perf_counter()
        losses = []
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.loader)
            st.data_s += time.perf_counter() - t0
            st.rho += batch_rho(batch) / cfg.train.grad_accum
            st.sample_tokens += int(batch["lengths"].sum())
            dev = {k: batch[k].to(self.device, non_blocking=True)
                   for k in ("input_ids", "supervised", "dense")}
            t1 = time.perf_counter()
            tb = make_training_batch(dev, cfg.masking, self.bundle.mask_token_id, self.generator,
                                     layout=cfg.objective.layout, attn_backend=self.attn_backend)
            st.mask_s += time.perf_counter() - t1
            # The loss reads the noisy half only: skip the LM head on the clean half (block layout).
            keep = slice(0, dev["input_ids"].shape[1]) if cfg.objective.layout == "block" else None
            logits = call_model(self.engine, **tb.model_inputs, keep=keep)
            out = tb.loss(logits, cfg.objective.weighting)
            self.engine.backward(out.loss)
            self.engine.step()
            losses.append(out.loss.detach())
            st.ce_dense = st.ce_dense + out.ce_dense_sum
            st.ce_other = st.ce_other + out.ce_other_sum
            st.n_dense = st.n_dense + out.n_dense
            st.n_other = st.n_other + out.n_other
            st.n_masked = st.n_masked + out.n_masked
            st.n_supervised = st.n_supervised + out.n_supervised
            st.model_tokens += int(tb.model_inputs["input_ids"].numel())
        st.loss = torch.stack(losses).float().mean()
        st.step_s = time.perf_counter() - t_step
        return st

    def _reduce(self, acc: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Sum a dict of scalars over ranks with one all-reduce."""
        keys = sorted(acc)
        vec = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(vec)
        return dict(zip(keys, vec.tolist()))

    # ------------------------------------------------------------------------------------------ train

    def train(self) -> int:
        """Run to train.max_steps (or a pre-emption signal); returns the exit code for the launcher."""
        cfg = self.cfg
        acc: dict[str, Any] = {}
        window_steps, window_t = 0, time.perf_counter()
        exit_code = 0
        self.engine.train()
        while self.step < cfg.train.max_steps:
            st = self.train_step()
            self.step += 1
            loss_local = float(st.loss)
            self.tokens_seen += st.sample_tokens
            for k, v in (("loss", st.loss), ("ce_dense", st.ce_dense), ("ce_other", st.ce_other),
                         ("n_dense", st.n_dense), ("n_other", st.n_other), ("n_masked", st.n_masked),
                         ("n_supervised", st.n_supervised), ("rho", st.rho),
                         ("model_tokens", st.model_tokens), ("sample_tokens", st.sample_tokens),
                         ("data_s", st.data_s), ("mask_s", st.mask_s), ("step_s", st.step_s)):
                acc[k] = acc.get(k, 0.0) + float(v)
            window_steps += 1
            elapsed = time.perf_counter() - window_t
            self.metrics.step(self.step, loss=loss_local,
                              tokens_per_s=acc["model_tokens"] * self.world / elapsed)
            last = self.step == cfg.train.max_steps
            if cfg.train.log_every and (self.step % cfg.train.log_every == 0 or last):
                self._log(acc, window_steps, time.perf_counter() - window_t)
                acc, window_steps, window_t = {}, 0, time.perf_counter()
            preempted = self.preempt.agreed(self.device)
            stop = 0 < cfg.train.stop_at_step <= self.step < cfg.train.max_steps
            if preempted or stop or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
            if preempted:
                self.metrics.print(f"[train] signal {self.preempt.signum} received: checkpoint saved at "
                                   f"step {self.step}; exiting with code {self.preempt.exit_code} (resume "
                                   f"with the same command)")
                exit_code = self.preempt.exit_code
                break
            if stop:
                self.metrics.stop_progress()
                self.metrics.print(f"[train] train.stop_at_step={cfg.train.stop_at_step}: checkpoint saved "
                                   f"at step {self.step}, stopping before "
                                   f"max_steps={cfg.train.max_steps}")
                return 0
        self.metrics.stop_progress()
        if exit_code == 0:
            self.finish()
        return exit_code

    def _log(self, acc: dict[str, float], steps: int, seconds: float) -> None:
        tot = self._reduce({**acc, "seconds": seconds})
        w = self.world
        grad_norm = self.engine.get_global_grad_norm()
        tps = tot["model_tokens"] / max(tot["seconds"] / w, 1e-9)
        rec = {
            "loss": tot["loss"] / (steps * w),
            "loss_dense": tot["ce_dense"] / max(tot["n_dense"], 1),
            "loss_other": tot["ce_other"] / max(tot["n_other"], 1),
            "mask_rate": tot["n_masked"] / max(tot["n_supervised"], 1),
            "rho": tot["rho"] / (steps * w),
            "tokens_per_s": tps,
            "sample_tokens_per_s": tot["sample_tokens"] / max(tot["seconds"] / w, 1e-9),
            "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optim.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "data_s": tot["data_s"] / (steps * w),
            "mask_s": tot["mask_s"] / (steps * w),
            "step_s": tot["step_s"] / (steps * w),
            "tokens_seen": self.tokens_seen * w,
        }
        if self.peak:
            rec["mfu"] = 6 * self.n_flop_params * tps / (self.peak * w)
        self.metrics.record(self.step, rec)

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.cfg.checkpoint, step=self.step,
                                    loader_state=self.loader.state_dict(), generator=self.generator,
                                    extra={"tokens_seen": self.tokens_seen})

    def finish(self) -> None:
        """Final checkpoint, HF export and a few generated samples."""
        cfg = self.cfg
        latest = ckpt.checkpoints_dir(cfg.checkpoint) / ckpt.LATEST
        if not (latest.is_file() and latest.read_text().strip() == ckpt.tag_for(self.step)):
            self.save()
        if not cfg.checkpoint.export_hf:
            return
        hf_dir = self.out_dir / "hf"
        dtype = torch.bfloat16 if self.bf16 else torch.float32  # the module's own precision
        ckpt.export_hf(self.engine.module, self.bundle.tokenizer, hf_dir, dtype=dtype)
        self.metrics.print(f"[train] exported HF folder {hf_dir} (AutoModelForCausalLM.from_pretrained)")
        if self.rank == 0 and cfg.train.sample_prompts:
            self.print_samples(hf_dir)
        if self.rank == 0 and cfg.task.name == "chain" and cfg.task.eval_size:
            self.evaluate_task(hf_dir)
        if dist.is_initialized():
            dist.barrier()

    def print_samples(self, hf_dir: Path) -> list[str]:
        """Decode the sample prompts with the exported model (rank 0, this process's device)."""
        from evaluation.generate import generate, supports_kv_cache

        bundle = load_model(hf_dir, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        model = bundle.model.to(self.device)
        templated = bool(self.dataset.index["tokenizer"].get("chat_template_used", True))
        texts = generate(model, bundle.tokenizer, list(self.cfg.train.sample_prompts),
                         mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
                         gen_length=self.cfg.train.sample_max_new_tokens,
                         block_length=self.cfg.masking.block_size,
                         steps_per_block=self.cfg.masking.block_size,
                         # prompt the way the training data was built (chat template or raw + BOS)
                         use_chat_template=templated,
                         kv_cache=supports_kv_cache(model), seed=self.cfg.train.seed)
        samples = [{"prompt": p, "completion": t} for p, t in zip(self.cfg.train.sample_prompts, texts)]
        (self.out_dir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
        for s in samples:
            self.metrics.print(f"[sample] {s['prompt']}\n{s['completion']}\n")
        return texts

    def evaluate_task(self, hf_dir: Path) -> dict:
        """Held-out exact match of the built-in task, the untrained model (same seed) vs the export."""
        from tasks.builtin import evaluate, report

        dtype = torch.bfloat16 if self.bf16 else torch.float32
        templated = bool(self.dataset.index["tokenizer"].get("chat_template_used", True))
        scores = []
        sources = (self.cfg.model.name, hf_dir) if self.cfg.task.eval_before else (hf_dir,)
        for source in sources:
            bundle = load_model(source, dtype=dtype, seed=self.cfg.train.seed)
            scores.append(evaluate(bundle.model.to(self.device), bundle.tokenizer,
                                   mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
                                   task=self.cfg.task, block_size=self.cfg.masking.block_size,
                                   use_chat_template=templated, seed=self.cfg.train.seed))
        before = scores[0] if self.cfg.task.eval_before else None
        return report(before, scores[-1], self.cfg.task, self.out_dir, echo=self.metrics.print)

    def close(self) -> None:
        self.metrics.close()
        self.preempt.uninstall()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
