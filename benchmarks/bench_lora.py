"""LoRA against full fine-tuning of the same model on the same tokens: trainable-parameter share, peak
memory and tokens/s, printed side by side with their ratios (LoRA / full).

    python benchmarks/bench_lora.py                                  # tiny default, rank 16, 8 steps
    python benchmarks/bench_train_step.py --lora                     # the same
    python benchmarks/bench_lora.py --model.name PATH --lora.rank 8 --steps 10 --data.max_length 128

Any trainer option (``--section.key value``) is accepted and applies to both runs; ``--lora.*`` options
shape the LoRA run only (default rank 16, alpha 32, the family's default targets).  Each variant runs in
its own process (one rank, the DeepSpeed JSON of ``--deepspeed``, ZeRO-3 by default) so that its peak
memory is its own: on a GPU ``torch.cuda.max_memory_allocated``; on CPU the growth of the resident set
from just before the trainer is built to its peak (``ru_maxrss``), i.e. weights, optimizer state,
gradients and activations.  Both runs draw the same batches and masks (same seeds), so tokens/s
compares the same work over the measured steps after ``--warmup`` steps; tokens per CPU-second (the
process's CPU time, all threads) is printed too, as on a shared machine the two runs' wall clocks see
different loads.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(argv: list[str], steps: int, warmup: int, out: Path) -> None:
    """One variant: build the trainer, time ``warmup + steps`` optimizer steps, write the numbers."""
    import torch

    from launch.train import prepare_default_data
    from trainer.components import init_distributed
    from trainer.config_io import load_config
    from trainer.loop import Trainer
    from trainer.lora import parameter_counts

    with tempfile.TemporaryDirectory() as tmp:
        quiet = ["--metrics.progress", "false", "--metrics.tensorboard", "false", "--metrics.jsonl", "false",
                 "--checkpoint.output_dir", tmp, "--checkpoint.resume", "never"]
        cfg = load_config([*quiet, *argv])
        init_distributed()
        import torch.distributed as dist

        prepare_default_data(cfg, dist.get_rank())
        before = rss_bytes()
        trainer = Trainer(cfg)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        try:
            trainer.engine.train()
            times, cpu_s, tokens = [], 0.0, 0
            for i in range(warmup + steps):
                t0, c0 = time.perf_counter(), time.process_time()
                st = trainer.train_step()
                if cuda:
                    torch.cuda.synchronize(trainer.device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                    cpu_s += time.process_time() - c0
                    tokens += st.model_tokens
            trainable, total = parameter_counts(trainer.engine.module)
            peak = (torch.cuda.max_memory_allocated(trainer.device) if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
            out.write_text(json.dumps({
                "trainable": trainable, "total": total, "peak_bytes": peak,
                "step_s": statistics.median(times), "tokens_per_s": tokens / sum(times),
                "tokens_per_cpu_s": tokens / cpu_s,
                "device": str(trainer.device), "memory": "max_memory_allocated" if cuda else "RSS growth"}))
        finally:
            trainer.close()


def step_args(argv: list[str], steps: int, warmup: int) -> tuple[int, int, list[str]]:
    """``--steps N`` and ``--warmup N`` taken out of ``argv`` (defaults as given); the rest are trainer
    options."""
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


def main(argv: list[str]) -> int:
    steps, warmup, rest = step_args(argv, 8, 2)
    rank = [] if any(a.startswith("--lora.rank") for a in rest) else ["--lora.rank", "16"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in (("full", _without_lora(rest)), ("lora", [*rank, *rest])):
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", str(out), "--steps", str(steps),
                   "--warmup", str(warmup), *args]
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{name} run failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}",
                      file=sys.stderr)
                return 1
            results[name] = json.loads(out.read_text())
    f, lo = results["full"], results["lora"]
    print(f"\n{f['device']}, {steps} measured steps after {warmup} warm-up, same batches and masks; "
          f"memory: {f['memory']}\n")
    print(f"{'':<22}{'full':>14}{'LoRA':>14}{'LoRA / full':>14}")
    rows = [("trainable params", f["trainable"], lo["trainable"], "{:,.0f}"),
            ("trainable share %", 100 * f["trainable"] / f["total"], 100 * lo["trainable"] / lo["total"],
             "{:.3f}"),
            ("peak memory MiB", f["peak_bytes"] / 2**20, lo["peak_bytes"] / 2**20, "{:.1f}"),
            ("step s (median)", f["step_s"], lo["step_s"], "{:.3f}"),
            ("tokens/s", f["tokens_per_s"], lo["tokens_per_s"], "{:.0f}"),
            ("tokens/CPU-s", f["tokens_per_cpu_s"], lo["tokens_per_cpu_s"], "{:.0f}")]
    for label, a, b, fmt in rows:
        print(f"{label:<22}{fmt.format(a):>14}{fmt.format(b):>14}{b / a if a else float('nan'):>14.3f}")
    print(json.dumps({"steps": steps, "warmup": warmup, "args": rest, "full": f, "lora": lo}, indent=1))
    return 0


def _without_lora(args: list[str]) -> list[str]:
    """The trainer options minus every ``--lora.*`` one (with its value): the full fine-tuning run."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("--lora."):
            skip = "=" not in a
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        path, argv = Path(sys.argv[2]), sys.argv[3:]
        steps, warmup = int(argv[1]), int(argv[3])  # --steps N --warmup M, as main() passes them
        child(argv[4:], steps, warmup, path)
    else:
        sys.exit(main(sys.argv[1:]))
