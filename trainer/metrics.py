"""What rank 0 shows and records: a rich progress bar, JSONL and TensorBoard scalars, an MFU estimate.

Every logged record (``<output_dir>/metrics.jsonl``, one JSON object per line, and the same scalars
under ``<output_dir>/tb``) holds, averaged over the steps since the previous record and over ranks:

- ``loss``: the objective that was backpropagated; ``loss_dense`` / ``loss_other``: mean CE on masked
  info-dense / other tokens (the split the paper's masking shifts);
- ``mask_rate``: masked / supervised tokens realised (the two complementary views add up to ~1, so
  this is ~0.5 with complementary masking); ``rho``: info-dense share of the batch's real
  supervised tokens;
- ``tokens_per_s``: model-input tokens per second over all ranks (rows x sequence length, i.e.
  complementary copies and the clean half of the block layout included: what the device computes);
  ``sample_tokens_per_s``: real tokens of the data samples per second;
- ``lr``, ``grad_norm`` (before clipping), ``data_s`` / ``step_s`` (loader and whole-step seconds),
  ``mfu``: 6 N tokens_per_s / (peak FLOP/s x world size), N = parameters doing matmuls (input
  embeddings excluded unless tied to the output head).  Attention FLOPs are ignored, so MFU is a
  slight underestimate at long sequence lengths.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import MetricsConfig

# Dense bf16 peak FLOP/s per device by name fragment (vendor datasheets, no sparsity).
PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12, "l4": 121e12,
              "v100": 125e12, "mi300": 1307e12, "mi250": 383e12}
CPU_FLOPS_PER_CYCLE_PER_THREAD = 32  # fp32 AVX2 FMA: 2 units x 8 lanes x 2 FLOP
CPU_HZ = 2.5e9


def peak_flops_per_device(cfg: MetricsConfig, device: torch.device) -> float | None:
    """cfg.peak_flops if set, else a table lookup by device name; None if unknown (MFU not logged)."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.type == "cpu":
        return CPU_FLOPS_PER_CYCLE_PER_THREAD * CPU_HZ * torch.get_num_threads()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token (ZeRO-3 aware: ``ds_numel`` is the full size)."""
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))
    total = sum(numel(p) for p in module.parameters())
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
    if emb is not None and not tied:
        total -= numel(emb.weight)
    return total


class MetricsLogger:
    """Rank-0 sink for step records; on other ranks every method is a no-op."""

    def __init__(self, cfg: MetricsConfig, output_dir: Path, *, rank: int, max_steps: int, start_step: int,
                 run_config: dict[str, Any] | None = None) -> None:
        self.cfg, self.enabled = cfg, rank == 0
        self.max_steps, self.start_step = max_steps, start_step
        self._jsonl = self._tb = self._progress = None
        self._console = None
        if not self.enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tb"),
                                     purge_step=start_step + 1 if start_step else None)
            if run_config is not None:
                self._tb.add_text("config", "```\n" + json.dumps(run_config, indent=1) + "\n```", start_step)
        from rich.console import Console

        self._console = Console(stderr=False)
        if cfg.progress and self._console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), console=self._console,
                                      transient=False)
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step, info="")
            self._progress.start()
        self._t0 = time.perf_counter()

    def print(self, msg: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if self.enabled:
            console = self._progress.console if self._progress else self._console
            console.print(msg, highlight=False, markup=False, soft_wrap=True)

    def step(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        """Every step: advance the bar (rank 0's local loss; the JSONL has the all-rank mean)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step,
                                  info=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")

    def record(self, step: int, values: dict[str, float]) -> None:
        """A logged step: JSONL line, TensorBoard scalars, and a plain line when there is no bar."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in values.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        # A line per record also under the bar: the bar shows only the latest step.
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        nan = float("nan")
        line = (f"step {step}/{self.max_steps}  loss {values.get('loss', nan):.4f}  "
                f"dense {values.get('loss_dense', nan):.3f}  other {values.get('loss_other', nan):.3f}  "
                f"{values.get('tokens_per_s', 0):,.0f} tok/s  lr {values.get('lr', 0):.2e}  ETA {eta:,.0f}s")
        if self._progress is not None:
            self.print(line)
        else:
            print(line, file=sys.stdout, flush=True)

    def stop_progress(self) -> None:
        """Remove the live bar (before export and sampling, which print their own output)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.stop_progress()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, the last record per step winning (a resumed run re-logs steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]
