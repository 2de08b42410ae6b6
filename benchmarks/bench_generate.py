"""Block decoding speed, side by side in one run: KV cache off/on, threshold vs low-confidence.

    python benchmarks/bench_generate.py                       # tiny default, CPU
    python benchmarks/bench_generate.py --model runs/x/hf --gen-length 512 --prompts 8 --device cuda

Prints seconds per sample, model calls per batch and the speed-ups against the first row (the
paper's setting: threshold 0.95, no cache, as LLaDA2's reference), and whether the cached run
produced the same tokens.  A random-init model is rarely confident, so on ``tiny`` the threshold
seldom fires; a trained checkpoint shows its effect on the call count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.assets import SAMPLE_PATH  # noqa: E402
from trainer.generation import generate  # noqa: E402
from trainer.masking import BLOCK_SIZE  # noqa: E402
from trainer.modeling import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--gen-length", type=int, default=96)
    ap.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    ap.add_argument("--steps-per-block", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    bundle = load_model(args.model)
    model = bundle.model.to(args.device)
    with open(SAMPLE_PATH, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for _, line in zip(range(args.prompts), f)]

    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    variants = [("threshold 0.95, no cache (LLaDA2 reference)", dict(remasking="threshold", kv_cache=False)),
                ("threshold 0.95, KV cache", dict(remasking="threshold", kv_cache=True)),
                ("low-confidence, no cache (LLaDA)", dict(remasking="low_confidence", kv_cache=False)),
                ("low-confidence, KV cache", dict(remasking="low_confidence", kv_cache=True))]
    rows, outputs = [], {}
    for label, kw in variants:
        calls = 0
        t = time.perf_counter()
        outputs[label] = generate(model, bundle.tokenizer, prompts, mask_token_id=bundle.mask_token_id,
                                  eos_token_id=bundle.eos_token_id, gen_length=args.gen_length,
                                  block_size=args.block_size, steps_per_block=args.steps_per_block,
                                  batch_size=args.batch_size, on_step=count, **kw)
        batches = -(-len(prompts) // args.batch_size)
        rows.append((label, (time.perf_counter() - t) / len(prompts), calls / batches))
    print(f"model={args.model} prompts={len(prompts)} gen_length={args.gen_length} block={args.block_size} "
          f"steps/block={args.steps_per_block} batch={args.batch_size} device={args.device} "
          f"threads={torch.get_num_threads()}")
    print(f"{'variant':46s} {'s/sample':>9s} {'calls/batch':>13s} {'speed-up':>11s}")
    for label, sec, n in rows:
        print(f"{label:46s} {sec:9.3f} {n:13.1f} {rows[0][1] / sec:10.2f}x")
    print("cache gives same text (threshold):", outputs[variants[0][0]] == outputs[variants[1][0]])
    print("cache gives same text (low-confidence):", outputs[variants[2][0]] == outputs[variants[3][0]])


if __name__ == "__main__":
    main()
