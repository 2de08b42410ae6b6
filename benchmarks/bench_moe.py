"""LLaDA2 sparse MoE block: our expert loop against the published training loop, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py                # small LLaDA2-like layer, CPU
    python benchmarks/bench_moe.py --tokens 8192 --hidden 2048 --inter 512 --experts 256 --device cuda

Both compute the same routed sum (checked); they differ in how tokens reach the experts:

- ``ours`` (trainer/models/llada2.py): sort the T*k (token, expert) pairs by expert, run each expert
  that received tokens once on exactly its tokens, ``index_add`` the weighted outputs in float32;
- ``published``: the published training path, re-expressed here: copy every token k times, then for
  every expert (also those with no token) select its rows with a boolean mask over all T*k rows,
  write the outputs back by mask, and sum the k weighted rows per token.

Prints forward+backward milliseconds per call and the ratio to ``published``.  On a shared CPU set
OMP_NUM_THREADS=1: oversubscribed BLAS threads made both rows ~20x slower and the ratio meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeSparseMoeBlock  # noqa: E402


def published_style(block: LLaDA2MoeSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, H]: routed experts only, the published training loop's data movement."""
    idx, w = block.gate(x)  # [T, k]
    k = idx.shape[1]
    rows = x.repeat_interleave(k, dim=0)  # [T*k, H]
    flat = idx.reshape(-1)
    y = torch.empty_like(rows)
    for e, expert in enumerate(block.experts):
        sel = flat == e
        y[sel] = expert(rows[sel])
    return (y.view(-1, k, x.shape[1]) * w[..., None]).sum(1).to(x.dtype)


def ours(block: LLaDA2MoeSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    shared = block.shared_experts
    block.shared_experts = None  # compare the routed part only
    try:
        return block(x[None])[0]
    finally:
        block.shared_experts = shared


def bench(fn, block, x, repeat: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(block, x).sum().backward()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(block, x).sum().backward()
    sync()
    return (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    cfg = LLaDA2MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts,
                          num_experts_per_tok=args.top_k, n_group=8, topk_group=4, num_shared_experts=1,
                          intermediate_size=4 * args.hidden)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    block = LLaDA2MoeSparseMoeBlock(cfg).to(args.device, dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        diff = (ours(block, x).float() - published_style(block, x).float()).abs().max().item()
    used = int(block.gate(x)[0].unique().numel())
    print(f"T={args.tokens} H={args.hidden} I={args.inter} E={args.experts} k={args.top_k} {args.dtype} "
          f"{args.device}: {used}/{args.experts} experts used, max |ours - published| = {diff:.2e}")
    base = bench(published_style, block, x, args.repeat)
    mine = bench(ours, block, x, args.repeat)
    print(f"{'published loop':>16}: {base:9.2f} ms fwd+bwd  1.00x")
    print(f"{'ours':>16}: {mine:9.2f} ms fwd+bwd  {base / mine:.2f}x faster")


if __name__ == "__main__":
    main()
