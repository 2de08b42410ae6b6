"""Where the time of a training step goes, for the tiny default under DeepSpeed (one rank).

    python benchmarks/bench_train_step.py                       # tiny default, 20 measured steps
    python benchmarks/bench_train_step.py --steps 50 --train.micro_batch_size 4 --data.max_length 256
    deepspeed benchmarks/bench_train_step.py --deepspeed ds_configs/zero2.json
    python benchmarks/bench_train_step.py --lora                # LoRA vs full fine-tuning (bench_lora.py)

Any trainer option (``--section.key value``) is accepted.  Each micro-batch is timed in four parts,
with a device synchronisation between them so asynchronous GPU work is charged to the right part:
loader (memmap read + padding, CPU), host-to-device copy, mask sampling + input building
(``make_training_batch``), forward + backward + optimizer (``engine``).  Printed side by side:
the share of each part in the step, the loader's rate against the step's rate (how far data loading
is from stalling the step), and model-input tokens/s; then the same for the uniform-masking
baseline (w = 1), the full layout, and the block layout with the LM head on all 2L positions
(without ``logits_to_keep``), measured in the same process on the batches that follow (medians over
many micro-batches, so batch lengths average out).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.config_io import load_config  # noqa: E402
from trainer.modeling import call_model  # noqa: E402
from trainer.objective import make_training_batch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, masking, layout: str, steps: int, warmup: int,
            keep_noisy: bool = True) -> dict[str, float]:
    """Median milliseconds per micro-batch of each part, plus tokens/s over the measured steps.

    ``keep_noisy``: the trainer's LM head on the noisy half only (block layout); False = all 2L logits.
    """
    parts: dict[str, list[float]] = {"loader": [], "to_device": [], "mask": [], "fwd_bwd_step": []}
    tokens = 0
    total = 0.0
    dev = trainer.device
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(trainer.loader)
        t1 = time.perf_counter()
        d = {k: batch[k].to(dev, non_blocking=True) for k in ("input_ids", "supervised", "dense")}
        sync(dev)
        t2 = time.perf_counter()
        tb = make_training_batch(d, masking, trainer.bundle.mask_token_id, trainer.generator, layout=layout,
                                 attn_backend=trainer.attn_backend)
        keep = slice(0, d["input_ids"].shape[1]) if keep_noisy and layout == "block" else None
        sync(dev)
        t3 = time.perf_counter()
        logits = call_model(trainer.engine, **tb.model_inputs, keep=keep)
        loss = tb.loss(logits, trainer.cfg.objective.weighting).loss
        trainer.engine.backward(loss)
        trainer.engine.step()
        sync(dev)
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k].append(v * 1e3)
            tokens += tb.model_inputs["input_ids"].numel()
            total += t4 - t0
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["step"] = sum(out[k] for k in parts)
    out["tokens_per_s"] = tokens / total
    return out


def step_args(argv: list[str], steps: int, warmup: int) -> tuple[int, int, list[str]]:
    """``--steps N`` and ``--warmup N`` taken out of ``argv`` (defaults as given); the rest are trainer
    options.  Shared with ``bench_lora.py``."""
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--steps":
            steps = int(next(it))
        elif a == "--warmup":
            warmup = int(next(it))
        else:
            rest.append(a)
    return steps, warmup, rest


def main(argv: list[str]) -> None:
    if "--lora" in argv:  # LoRA against full fine-tuning: its own script, same options
        import bench_lora

        sys.exit(bench_lora.main([a for a in argv if a != "--lora"]))
    steps, warmup, rest = step_args(argv, 20, 3)
    with tempfile.TemporaryDirectory() as tmp:
        quiet = ["--metrics.progress", "false", "--metrics.tensorboard", "false", "--metrics.jsonl", "false"]
        cfg = load_config(["--checkpoint.output_dir", tmp, "--checkpoint.resume", "never", *quiet, *rest])
        import torch.distributed as dist

        from launch.train import prepare_default_data
        from trainer.components import init_distributed
        from trainer.loop import Trainer

        init_distributed()
        prepare_default_data(cfg, dist.get_rank())
        trainer = Trainer(cfg)
        try:
            trainer.engine.train()
            variants = {
                f"{cfg.masking.mode} w={cfg.masking.weight}, {cfg.objective.layout}": (cfg.masking,
                                                                                      cfg.objective.layout),
                f"uniform (w=1), {cfg.objective.layout}": (dataclasses.replace(cfg.masking, mode="uniform"),
                                                           cfg.objective.layout),
                f"{cfg.masking.mode} w={cfg.masking.weight}, full": (cfg.masking, "full"),
            }
            results = {name: measure(trainer, m, layout, steps, warmup)
                       for name, (m, layout) in variants.items()}
            if cfg.objective.layout == "block":  # the LM head on all 2L positions (before logits_to_keep)
                results["same, LM head on all 2L"] = measure(trainer, cfg.masking, "block", steps, warmup,
                                                             keep_noisy=False)
        finally:
            trainer.close()
    if trainer.rank != 0:
        return
    print(f"\ndevice {trainer.device}, {torch.get_num_threads()} threads, ZeRO-{trainer.zero_stage}, "
          f"micro-batch {cfg.train.micro_batch_size}, max_length {cfg.data.max_length}, "
          f"median of {steps} micro-batches\n")
    head = (f"{'variant':<28}{'loader ms':>10}{'h2d ms':>8}{'mask ms':>9}{'fwd/bwd/opt ms':>16}"
            f"{'mask %':>8}{'loader %':>10}{'loader/step rate':>18}{'tokens/s':>10}")
    print(head)
    for name, r in results.items():
        print(f"{name:<28}{r['loader']:>10.2f}{r['to_device']:>8.2f}{r['mask']:>9.2f}{r['fwd_bwd_step']:>16.1f}"
              f"{100 * r['mask'] / r['step']:>8.2f}{100 * r['loader'] / r['step']:>10.2f}"
              f"{r['step'] / max(r['loader'], 1e-9):>17.0f}x{r['tokens_per_s']:>10.0f}")
    print("\nloader/step rate: how many micro-batches the loader can build in the time of one step.")
    setup = {"micro_batch_size": cfg.train.micro_batch_size, "max_length": cfg.data.max_length,
             "device": str(trainer.device), "threads": torch.get_num_threads()}
    print(json.dumps({"config": setup, "results": results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
