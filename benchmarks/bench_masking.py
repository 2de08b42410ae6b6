"""How much of a training step does mask sampling cost?  Side by side, in one run.

Run from the repo root:

    python benchmarks/bench_masking.py                      # B=4, L=2048, block 32 (defaults)
    python benchmarks/bench_masking.py --big-batch 4        # bigger model on the full batch (slow on CPU)

Measures, on the same batch: (1) sampling masks for every mode (soft / hard / odds / uniform);
(2) ``make_training_batch`` = sampling + complement + [x_t ; x_0] inputs (the attention mask is cached
after the first call, as in training); (3) forward + backward of the tiny model and of a bigger
config (hidden 1024, 8 layers) on the resulting 2B x 2L batch.  Prints the masking share of the step
(target < 1 %) and the cost of soft relative to uniform sampling.  Timings are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from trainer.masking import MaskingConfig, sample_masks
from trainer.objective import make_training_batch
from trainer.tiny_model import TinyDLLMForMaskedDiffusion, tiny_config

VOCAB, MASK_ID, EOS_ID = 4096, 1, 0


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(batch: int, seq_len: int, seed: int = 0) -> dict:
    """A realistic layout: a prompt of 10-40 % of the sequence, 30 % info-dense response tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq_len), generator=g)
    prompt = (torch.rand(batch, 1, generator=g) * 0.3 + 0.1) * seq_len
    supervised = torch.arange(seq_len)[None] >= prompt
    dense = (torch.rand(batch, seq_len, generator=g) < 0.3) & supervised
    return {"input_ids": ids, "supervised": supervised, "dense": dense}


def step_time(hidden: int, layers: int, heads: int, data: dict, cfg: MaskingConfig, repeats: int) -> float:
    """Median forward + backward time of a model of this size on the masked batch."""
    torch.manual_seed(0)
    model = TinyDLLMForMaskedDiffusion(tiny_config(VOCAB, MASK_ID, EOS_ID, hidden_size=hidden,
                                                   num_layers=layers, num_heads=heads))
    tb = make_training_batch(data, cfg, MASK_ID, torch.Generator().manual_seed(0))

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        tb.loss(model(**tb.model_inputs).logits).loss.backward()

    return median_time(fwd_bwd, repeats, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20, help="repeats of the masking timings")
    ap.add_argument("--model-repeats", type=int, default=2)
    ap.add_argument("--big-hidden", type=int, default=1024)
    ap.add_argument("--big-layers", type=int, default=8)
    ap.add_argument("--big-batch", type=int, default=1,
                    help="samples for the bigger model (CPU: one fwd+bwd of 4 x 2048 takes minutes)")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, L={args.seq_len}, "
          f"block={args.block}")
    data = make_batch(args.batch, args.seq_len)
    sample_cost = {}
    sup, dense = data["supervised"], data["dense"]
    for mode in ("uniform", "soft", "odds", "hard"):
        cfg = MaskingConfig(mode=mode, block_size=args.block)
        g = torch.Generator().manual_seed(0)
        sample_cost[mode] = median_time(lambda c=cfg, g=g: sample_masks(sup, dense, c, g), args.repeats)
        print(f"sample_masks   {mode:8s} {sample_cost[mode] * 1e3:8.3f} ms")
    for mode in ("soft", "odds", "hard"):
        print(f"{mode} / uniform sampling cost: {sample_cost[mode] / sample_cost['uniform']:.2f}x")

    cfg = MaskingConfig(block_size=args.block)
    g = torch.Generator().manual_seed(0)
    build = median_time(lambda: make_training_batch(data, cfg, MASK_ID, g), args.repeats)
    print(f"make_training_batch (soft, complementary, block layout): {build * 1e3:.3f} ms")

    tiny = step_time(256, 4, 4, data, cfg, args.model_repeats)
    print(f"tiny model (hidden 256, 4 layers) fwd+bwd on {2 * args.batch} x {2 * args.seq_len}: {tiny:.2f} s"
          f"  -> masking share {build / (build + tiny):.3%}")

    big_data = {k: v[:args.big_batch] for k, v in data.items()}
    big_build = median_time(lambda: make_training_batch(big_data, cfg, MASK_ID, g), args.repeats)
    big = step_time(args.big_hidden, args.big_layers, 16, big_data, cfg, 1)
    print(f"bigger model (hidden {args.big_hidden}, {args.big_layers} layers) fwd+bwd on "
          f"{2 * args.big_batch} x {2 * args.seq_len}: {big:.2f} s; masking {big_build * 1e3:.3f} ms"
          f"  -> masking share {big_build / (big_build + big):.4%}")


if __name__ == "__main__":
    main()
