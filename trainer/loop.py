"""The DeepSpeed trainer: assemble a run from a ``Config``, run steps, checkpoint, export.

One optimizer step (``train_step``) on every rank, for each of ``grad_accum`` micro-batches:

    batch  = next(loader)                                   # [B, L] ids / supervised / dense (CPU)
    tb     = make_training_batch(batch, masking, mask_id,   # masks drawn on the device, in the step:
                                 generator, layout, ...)    #   [B, <= 3L] rows [x_t(M); x_t(S-M); x_0]
    logits = call_model(engine, **tb.model_inputs,          # [N, V]: the LM head runs on the N
                        keep=tb.keep)                       #   masked tokens only (logits_to_keep)
    loss   = tb.loss(logits, weighting)                     # CE on those masked tokens
    engine.backward(loss); engine.step()                    # DeepSpeed scales by 1/grad_accum and
                                                            # steps optimizer + LR at the boundary

ZeRO stage, offload and precision come from the DeepSpeed JSON (``--deepspeed``), whose "auto"
values are filled from the config (``trainer.config_io.resolve_deepspeed_config``).  The device is
``deepspeed.get_accelerator()``'s: the same command runs on CPU (gloo, fp32) and on GPUs (nccl,
bf16).  The shards must exist (``launch/train.py`` builds the default sample first); the end-of-run
samples are ``launch/train.py``'s too, so the trainer depends on no evaluation code.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer import components as parts
from trainer.config import Config
from trainer.config_io import to_dict
from trainer.data import BatchLoader, batch_rho
from trainer.metrics import MetricsLogger, matmul_params, peak_flops_per_device
from trainer.modeling import call_model
from trainer.objective import make_training_batch

# Device-side sums of one step (0-d tensors, summed without a sync) and their names in the log window.
DEVICE_SUMS = ("loss", "ce_dense", "ce_other", "n_dense", "n_other", "n_masked", "n_supervised",
               "masked_dense", "dense", "masked_other", "other")
HOST_SUMS = ("rho", "model_tokens", "sample_tokens", "data_s", "mask_s", "step_s", "empty_batches")


@dataclass(slots=True)
class StepStats:
    """Sums over the micro-batches of one optimizer step on this rank.

    ``device`` holds 0-d tensors on the training device (no host sync until logging): the mean loss,
    CE sums and token counts from ``LossOutput`` and the priority view's counts.  The rest are host
    numbers.  ``lr`` is the learning rate this step was taken with.
    """

    device: dict[str, torch.Tensor] = field(default_factory=dict)
    rho: float = 0.0
    model_tokens: int = 0
    sample_tokens: int = 0
    empty_batches: int = 0
    """Micro-batches with no supervised token (their loss is an exact 0: nothing is learnt)."""
    data_s: float = 0.0
    mask_s: float = 0.0
    step_s: float = 0.0
    lr: float = 0.0

    def add(self, **sums: torch.Tensor) -> None:
        for k, v in sums.items():
            self.device[k] = self.device[k] + v if k in self.device else v

    def totals(self) -> dict[str, float]:
        """Every sum as a float (syncs the device once per tensor)."""
        return {**{k: float(v) for k, v in self.device.items()},
                **{k: float(getattr(self, k)) for k in HOST_SUMS}}


class Trainer:
    """Everything of one run; ``train()`` returns the process exit code (0, or 75 after pre-emption)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # DeepSpeed calls the c10d *_tensor collectives that torch 2.13 deprecates: one warning per step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
        parts.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = parts.select_device(self.world)
        self.out_dir = Path(cfg.checkpoint.output_dir)
        parts.seed_everything(cfg.train.seed)
        self.bf16 = parts.use_bf16(cfg, self.device)
        self.ds_config = parts.deepspeed_config(cfg, world=self.world, bf16=self.bf16)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.dataset = parts.open_dataset(cfg)
        self.attn_backend = parts.resolve_attn_backend(cfg.objective.attn_backend, self.device,
                                                       cfg.model.attn_implementation)
        self.recompute = parts.resolve_activation_checkpointing(cfg.model.activation_checkpointing,
                                                                self.attn_backend,
                                                                builtin=cfg.model.name == parts.DEFAULT_MODEL)
        self.bundle = parts.load_for_training(cfg, bf16=self.bf16, attn_backend=self.attn_backend,
                                              recompute=self.recompute, ds_config=self.ds_config,
                                              vocab_size=self.dataset.vocab_size)
        self.n_flop_params = matmul_params(self.bundle.model)
        built = parts.build_engine(cfg, self.bundle.model, self.ds_config)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.loader = BatchLoader(self.dataset, cfg.data, block_size=cfg.masking.block_size,
                                  eos_id=self.bundle.eos_token_id, rank=self.rank, world_size=self.world,
                                  micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
        self.generator = parts.mask_generator(cfg.train.seed, self.rank, self.device)
        self.step, self.tokens_seen, self._empty_warned = 0, 0, False
        resumed = self._resume()
        self.metrics = self._open_metrics()
        if resumed:
            self.metrics.print(f"[train] {resumed}")
        self.preempt = ckpt.PreemptionFlag().install()
        self.peak = peak_flops_per_device(cfg.metrics, self.device)
        self._print_header()

    # ------------------------------------------------------------------------------------ components

    def _open_metrics(self) -> MetricsLogger:
        if self.rank == 0:
            import yaml

            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        return MetricsLogger(self.cfg.metrics, self.out_dir, rank=self.rank,
                             max_steps=self.cfg.train.max_steps, start_step=self.step,
                             run_config=to_dict(self.cfg))

    def _resume(self) -> str:
        """Restore the newest usable checkpoint, if any; returns the line saying so ('' when fresh)."""
        found = ckpt.find_resume(self.cfg.checkpoint)
        if found is None:
            return ""
        root, tags = found

        def log(msg: str) -> None:
            if self.rank == 0:
                print(msg, flush=True)

        tag, state = ckpt.resume(self.engine, root, tags, generator=self.generator, log=log,
                                 device=self.device, trainable_only=self.cfg.lora.enabled)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.loader.load_state_dict(state["loader"])
        return f"resumed from {root / tag} at step {self.step}" + (
            f" (inexact: {state['inexact']})" if "inexact" in state else "")

    def _print_header(self) -> None:
        cfg, m = self.cfg, self.cfg.masking
        self.metrics.print(
            f"[train] {cfg.model.name} ({self.n_flop_params / 1e6:.1f}M matmul params, "
            f"{self.bundle.family.model_type}) | ZeRO-{self.zero_stage} | {self.world} rank(s) on "
            f"{self.device.type} | {'bf16' if self.bf16 else 'fp32'} | masking {m.mode} w={m.weight} "
            f"block {m.block_size} sigma U[{m.sigma_min}, {m.sigma_max}] complementary={m.complementary} | "
            f"layout {cfg.objective.layout}, attention {self.attn_backend}, recompute {self.recompute}")
        if cfg.lora.enabled:
            from trainer.lora import adapted_modules, parameter_counts

            trainable, total = parameter_counts(self.engine.module)
            n_modules = len(adapted_modules(self.engine.module))
            self.metrics.print(f"[train] LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha} on {n_modules} "
                               f"modules: {trainable:,} of {total:,} parameters train "
                               f"({100 * trainable / total:.2f} %)")
        rho = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in self.dataset.rho.items())
        self.metrics.print(f"[train] data {cfg.data.path}: {self.loader.summary()}; "
                           f"info-dense share rho: {rho}")

    # ------------------------------------------------------------------------------------------- step

    def train_step(self) -> StepStats:
        """One optimizer step: grad_accum micro-batches through forward/backward, then engine.step()."""
        cfg = self.cfg
        st = StepStats(lr=float(self.scheduler.get_last_lr()[0]))  # the lr this step is taken with
        t_step = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.loader)
            st.data_s += time.perf_counter() - t0
            st.rho += batch_rho(batch) / cfg.train.grad_accum
            st.sample_tokens += int(batch["lengths"].sum())
            if not batch["supervised"].any():  # a CPU tensor: no device sync
                self._warn_empty(st)
            dev = {k: batch[k].to(self.device, non_blocking=True)
                   for k in ("input_ids", "supervised", "dense")}
            t1 = time.perf_counter()
            o = cfg.objective
            tb = make_training_batch(dev, cfg.masking, self.bundle.mask_token_id, self.generator,
                                     layout=o.layout, attn_backend=self.attn_backend, packing=o.packing,
                                     skip_blocks=o.skip_prompt_blocks, masked_head=o.masked_head)
            st.mask_s += time.perf_counter() - t1
            # The LM head runs on the positions the loss reads only (tb.keep: masked or noisy).
            logits = call_model(self.engine, **tb.model_inputs, keep=tb.keep)
            out = tb.loss(logits, cfg.objective.weighting)
            self.engine.backward(out.loss)
            self.engine.step()
            st.add(loss=out.loss.detach() / cfg.train.grad_accum, ce_dense=out.ce_dense_sum,
                   ce_other=out.ce_other_sum, n_dense=out.n_dense, n_other=out.n_other, n_masked=out.n_masked,
                   n_supervised=out.n_supervised, **tb.priority_view_counts())
            st.model_tokens += int(tb.model_inputs["input_ids"].numel())
        st.step_s = time.perf_counter() - t_step
        return st

    def _warn_empty(self, st: StepStats) -> None:
        """Count a micro-batch with nothing to learn; say so on this rank the first time (the metrics
        record ``empty_batches`` counts every one)."""
        st.empty_batches += 1
        if not self._empty_warned:
            self._empty_warned = True
            print(f"[train] WARNING rank {self.rank} step {self.step + 1}: a micro-batch has no supervised "
                  f"token (responses truncated away by data.max_length={self.cfg.data.max_length}?); it "
                  f"trains nothing (loss 0); metrics 'empty_batches' counts them",
                  file=sys.stderr, flush=True)

    def _reduce(self, acc: dict[str, float]) -> dict[str, float]:
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
        acc: dict[str, float] = {}
        window_steps, window_t = 0, time.perf_counter()
        self.engine.train()
        while self.step < cfg.train.max_steps:
            st = self.train_step()
            self.step += 1
            self.tokens_seen += st.sample_tokens
            totals = st.totals()
            for k, v in totals.items():
                acc[k] = acc.get(k, 0.0) + v
            window_steps += 1
            elapsed = time.perf_counter() - window_t
            self.metrics.step(self.step, loss=totals["loss"],
                              tokens_per_s=acc["model_tokens"] * self.world / elapsed)
            last = self.step == cfg.train.max_steps
            if cfg.train.log_every and (self.step % cfg.train.log_every == 0 or last):
                self._log(acc, window_steps, time.perf_counter() - window_t, lr=st.lr)
                acc, window_steps, window_t = {}, 0, time.perf_counter()
            preempted = self.preempt.agreed(self.device)
            stop = 0 < cfg.train.stop_at_step <= self.step < cfg.train.max_steps
            if preempted or stop or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
            if preempted:
                self.metrics.print(f"[train] signal {self.preempt.signum} received: checkpoint saved at "
                                   f"step {self.step}; exiting with code {self.preempt.exit_code} (resume "
                                   f"with the same command)")
                self.metrics.stop_progress()
                return self.preempt.exit_code
            if stop:
                self.metrics.stop_progress()
                self.metrics.print(f"[train] train.stop_at_step={cfg.train.stop_at_step}: checkpoint saved "
                                   f"at step {self.step}, stopping before max_steps={cfg.train.max_steps}")
                return 0
        self.metrics.stop_progress()
        self.finish()
        return 0

    def _log(self, acc: dict[str, float], steps: int, seconds: float, *, lr: float) -> None:
        tot = self._reduce({**acc, "seconds": seconds})
        w = self.world
        grad_norm = self.engine.get_global_grad_norm()
        tps = tot["model_tokens"] / max(tot["seconds"] / w, 1e-9)
        rec = {
            "loss": tot["loss"] / (steps * w),
            "loss_dense": tot["ce_dense"] / max(tot["n_dense"], 1),
            "loss_other": tot["ce_other"] / max(tot["n_other"], 1),
            "mask_rate": tot["n_masked"] / max(tot["n_supervised"], 1),
            "mask_rate_dense": tot["masked_dense"] / max(tot["dense"], 1),
            "mask_rate_other": tot["masked_other"] / max(tot["other"], 1),
            "rho": tot["rho"] / (steps * w),
            "tokens_per_s": tps,
            "sample_tokens_per_s": tot["sample_tokens"] / max(tot["seconds"] / w, 1e-9),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "data_s": tot["data_s"] / (steps * w),
            "mask_s": tot["mask_s"] / (steps * w),
            "step_s": tot["step_s"] / (steps * w),
            "tokens_seen": self.tokens_seen * w,
            "empty_batches": tot["empty_batches"],
        }
        if self.peak:
            rec["mfu"] = 6 * self.n_flop_params * tps / (self.peak * w)
        self.metrics.record(self.step, rec)

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.cfg.checkpoint, step=self.step,
                                    loader_state=self.loader.state_dict(), generator=self.generator,
                                    extra={"tokens_seen": self.tokens_seen},
                                    trainable_only=self.cfg.lora.enabled)

    @property
    def export_dir(self) -> Path:
        """The full model (LoRA: merged, with ``lora.export_merged``)."""
        return self.out_dir / "hf"

    @property
    def adapter_dir(self) -> Path:
        """The PEFT adapter folder of a LoRA run."""
        return self.out_dir / "adapter"

    def finish(self) -> None:
        """Final checkpoint and the HF export (collective)."""
        cfg = self.cfg
        latest = ckpt.checkpoints_dir(cfg.checkpoint) / ckpt.LATEST
        if not (latest.is_file() and latest.read_text().strip() == ckpt.tag_for(self.step)):
            self.save()
        if not cfg.checkpoint.export_hf:
            return
        dtype = torch.bfloat16 if self.bf16 else torch.float32  # the module's own precision
        if cfg.lora.enabled:
            from trainer.lora import export_adapter, export_merged

            export_adapter(self.engine.module, self.bundle.tokenizer, self.adapter_dir)
            self.metrics.print(f"[train] exported LoRA adapter {self.adapter_dir} "
                               f"(dm-evaluate run --model {cfg.model.name} --adapter {self.adapter_dir})")
            if not cfg.lora.export_merged:
                return
            export_merged(self.engine.module, self.bundle.tokenizer, self.export_dir, dtype=dtype)
        else:
            ckpt.export_hf(self.engine.module, self.bundle.tokenizer, self.export_dir, dtype=dtype)
        self.metrics.print(f"[train] exported HF folder {self.export_dir} "
                           f"(AutoModelForCausalLM.from_pretrained)")

    def close(self, barrier: bool = True) -> None:
        """Flush the metrics and leave the process group (after a barrier unless this rank failed)."""
        self.metrics.close()
        self.preempt.uninstall()
        if dist.is_initialized():
            if barrier:
                with contextlib.suppress(Exception):
                    dist.barrier()
            parts.release_shm_buffer()
            dist.destroy_process_group()
        sys.stdout.flush()
