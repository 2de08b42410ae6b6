"""What a diffusion training step costs against plain autoregressive SFT of the same model on the same batch.

    python benchmarks/bench_train_step.py                                   # tiny + 27 M Llama body, L = 512
    python benchmarks/bench_train_step.py --configs llama27m --reps 7
    python benchmarks/bench_train_step.py --configs llada100m,dream100m,llada2_100m --batch 1 --length 256

For each model configuration (random weights; ``tiny`` = the trainer's default, ``llama27m`` = the same
Llama body at hidden 512 x 8 layers, ``*100m`` = the family fixture configs under
``../shared/reference_models`` scaled up to ~100 M parameters) one synthetic batch is built: B rows of
L tokens, prompts of different lengths so that ``--response`` of the tokens are response (supervised),
30 % of them info-dense.  Then, interleaved (variant after variant, ``--reps`` rounds, medians), one
optimizer step (forward, backward, AdamW) each of:

* ``default``: the trainer's step with its default settings (block layout, complementary soft
  masking, both views sharing one x_0, prompt-only noisy blocks left out, LM head on the masked tokens
  only; attention as ``objective.attn_backend=auto`` picks it: block-sparse SDPA on CPU, flex on a
  GPU; recomputation as ``model.activation_checkpointing=auto`` picks it: selective with the CPU
  attention, none with flex);
* the default with each cut off in turn (the sparse attention too: dense SDPA instead), with its
  recomputation switched (selective off where the default has it, on where it does not: the
  built-in tiny model), and the reference with all cuts off;
* AR SFT with selective recomputation, for a like-for-like memory figure;
* ``AR SFT``: plain autoregressive SFT: a causal mask, logits at every position, next-token
  cross-entropy on the response tokens (prompt labels ignored), as ``model(..., labels=)`` does.

Printed: s/step, CPU s/step (the process's CPU time: with ``--threads 1`` the work done, much less
sensitive than wall time to other jobs on a shared machine), response tokens/s, peak memory of
forward + backward above what the model and optimizer hold before it (the optimizer step's own peak,
the same for every variant, is left out; CPU: the process's peak RSS, reset before each step through
/proc/self/clear_refs, with glibc told to return large blocks to the OS; GPU:
torch.cuda.max_memory_allocated), each as a ratio to AR SFT;
and the FLOP floor of the method for that batch (every noisy token of a block some row can mask,
each view once, the clean half up to the last such block, the LM head on the masked tokens,
attention scores only where the layout allows) against the AR floor.  The machine may be shared:
the interleaving spreads its load evenly over the variants; on a loaded CPU ``--threads 1`` avoids
two threads waiting for each other at every op.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO.parent / "shared" / "reference_models"

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # large blocks straight from/to the OS: RSS = use
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.attention import BLOCK_SPARSE_SDPA  # noqa: E402
from trainer.components import resolve_activation_checkpointing  # noqa: E402
from trainer.masking import MaskingConfig  # noqa: E402
from trainer.modeling import call_model, family_of  # noqa: E402
from trainer.objective import make_training_batch  # noqa: E402
from trainer.recompute import enable_activation_checkpointing  # noqa: E402

SCALE_100M = {  # the fixture configs scaled up to ~100 M parameters (their 4k vocabulary kept)
    "llada": {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "mlp_hidden_size": 2048},
    "dream": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 6, "intermediate_size": 2048, "max_window_layers": 12},
    "llada2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_key_value_heads": 6, "head_dim": 64, "rotary_dim": 32, "intermediate_size": 2048,
               "moe_intermediate_size": 256, "num_experts": 8, "max_window_layers": 12},
}
CUTS = {"packing": ("rows", "shared x_0 off (one row per view)"),
        "skip_blocks": (False, "prompt-block skip off"),
        "masked_head": (False, "masked-only head off")}


@dataclass
class Model:
    name: str
    model: torch.nn.Module
    mask_token_id: int
    layout: str


def build(name: str, device: torch.device, fixtures: Path) -> Model:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if name in ("tiny", "llama27m"):
        from transformers import AutoTokenizer

        from preprocess.assets import TOKENIZER_DIR
        from trainer.modeling import build_tiny_model

        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        size = {} if name == "tiny" else {"hidden_size": 512, "num_layers": 8, "num_heads": 8}
        return Model(name, build_tiny_model(tok, **size).to(device), int(tok.mask_token_id), "block")
    family = name.removesuffix("100m").removesuffix("_")
    from trainer.modeling import family_in

    fam = family_in(fixtures / family)  # imports (registers) our implementation
    cfg = AutoConfig.from_pretrained(fixtures / family)
    for key, value in SCALE_100M[family].items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    mask_id = getattr(cfg, "mask_token_id", None)
    return Model(name, model, int(mask_id if mask_id is not None else cfg.vocab_size - 1), fam.layouts[0])


def make_batch(b: int, length: int, response: float, vocab: int, device: torch.device) -> dict:
    """B rows whose prompts span 0.6x..1.4x the mean prompt length, ``response`` of tokens supervised."""
    g = torch.Generator().manual_seed(0)
    mean_prompt = (1 - response) * length
    spread = torch.linspace(0.6, 1.4, b) if b > 1 else torch.ones(1)
    starts = (spread * mean_prompt).round().long().clamp(1, length - 1)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    sup = torch.arange(length)[None] >= starts[:, None]
    dense = sup & (torch.rand(b, length, generator=g) < 0.3)
    return {k: v.to(device) for k, v in {"input_ids": ids, "supervised": sup, "dense": dense}.items()}


def set_attention(model: torch.nn.Module, impl: str) -> None:
    model.config._attn_implementation = impl
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl


def diffusion_step(m: Model, batch: dict, opts: dict, seed: int) -> torch.Tensor:
    backend = opts["attn_backend"]
    set_attention(m.model, {"sparse": BLOCK_SPARSE_SDPA, "flex": "flex_attention"}.get(backend, "sdpa"))
    g = torch.Generator(batch["input_ids"].device).manual_seed(seed)
    tb = make_training_batch(batch, MaskingConfig(), m.mask_token_id, g, layout=m.layout,
                             attn_backend=backend, packing=opts["packing"], skip_blocks=opts["skip_blocks"],
                             masked_head=opts["masked_head"])
    logits = call_model(m.model, **tb.model_inputs, keep=tb.keep)
    loss = tb.loss(logits).loss
    loss.backward()
    return loss


CAUSAL_SDPA = "sdpa_causal"
"""The AR baseline's attention: SDPA with ``is_causal=True`` and no mask tensor, as a causal LM runs it
(the fused kernels skip the upper triangle), whatever mask the diffusion model's forward builds."""


def _causal_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def _register_causal_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAUSAL_SDPA, sdpa_mask)


_register_causal_sdpa()  # once, at import: not inside the timed AR step


def ar_step(m: Model, batch: dict) -> torch.Tensor:
    set_attention(m.model, CAUSAL_SDPA)
    ids, sup = batch["input_ids"], batch["supervised"]
    b, length = ids.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None, None]
    labels = torch.where(sup, ids, -100)[:, 1:]  # logit i predicts token i + 1; prompt ignored
    pos = torch.arange(length, device=ids.device)[None].expand(b, length)
    # The causal mask is passed too (the families' own mask code reads it) but the kernel runs is_causal.
    logits = m.model(input_ids=ids, attention_mask=causal, position_ids=pos).logits  # [B, L, V]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss


class PeakMemory:
    """Peak bytes above the start of the block: CUDA allocator stats, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._status("VmHWM") - self.base


def active_linear_params(model: torch.nn.Module) -> int:
    """Weights a token multiplies through in the body (MoE: experts scaled by top-k / number of experts)."""
    head = model.get_output_embeddings()
    cfg = model.config
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            n = mod.weight.numel()
            if ".experts." in name:
                n = n * cfg.num_experts_per_tok / cfg.num_experts
            total += n
    return int(total)


def flop_floor(m: Model, batch: dict, block: int) -> tuple[float, float]:
    """(method, AR) FLOPs of forward + backward (3x forward) for the batch at their floors."""
    cfg = m.model.config
    p_lin = active_linear_params(m.model)
    hidden = m.model.get_input_embeddings().weight.shape[1]
    vocab = m.model.get_input_embeddings().weight.shape[0]
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layers
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    d_attn = heads * head_dim

    def cost(tokens: float, head_tokens: float, pairs: float) -> float:
        return 3 * (2 * p_lin * tokens + 2 * hidden * vocab * head_tokens + 4 * d_attn * layers * pairs)

    sup = batch["supervised"].cpu()
    b, length = sup.shape
    nb = -(-length // block)
    method = ar = 0.0
    for r in range(b):
        live = [k for k in range(nb) if sup[r, k * block:(k + 1) * block].any()]
        n_sup = int(sup[r].sum())
        if m.layout == "block":
            last = max(live) if live else 0
            tokens = 2 * block * len(live) + block * last  # both views' live blocks, clean blocks < last
            pairs = 2 * sum(block * (block * k + block) for k in live) + sum(block * block * (j + 1)
                                                                           for j in range(last))
        else:  # 'full': both views, all-to-all
            tokens, pairs = 2 * length, 2 * length * length
        method += cost(tokens, n_sup, pairs)
        ar += cost(length, n_sup, length * (length + 1) / 2)
    return method, ar


def variants(name: str, layout: str, device: torch.device) -> dict[str, dict | None]:
    """The default step as the trainer runs it on ``device`` (attention 'auto': block-sparse SDPA on CPU,
    flex on CUDA; recomputation 'auto'), each cut off in turn (sparse attention off = dense SDPA), and
    AR SFT without and with selective recomputation."""
    attn = "flex" if device.type == "cuda" else "sparse"
    default = {"packing": "shared", "skip_blocks": True, "masked_head": True, "attn_backend": attn,
               "recompute": resolve_activation_checkpointing("auto", attn, builtin=name == "tiny")}
    out: dict[str, dict | None] = {"default": default}
    for key, (off, label) in CUTS.items():
        if layout == "full" and key in ("packing", "skip_blocks"):
            continue  # no clean half: nothing to share, every token is attended
        out[label] = {**default, key: off}
    out[f"{'flex' if attn == 'flex' else 'block-sparse SDPA'} off (dense SDPA)"] = {**default,
                                                                                     "attn_backend": "sdpa"}
    out["reference (all cuts off)"] = {**default, **{k: off for k, (off, _) in CUTS.items()},
                                       "attn_backend": "sdpa", "recompute": "none"}
    if default["recompute"] == "none":
        out["default + selective recompute"] = {**default, "recompute": "selective"}
    else:
        out[f"{default['recompute']} recompute off"] = {**default, "recompute": "none"}
    out["AR SFT"] = None
    out["AR SFT + selective recompute"] = {"ar": True, "recompute": "selective"}
    return out


def set_recompute(model: torch.nn.Module, mode: str) -> None:
    """``model.activation_checkpointing`` as the trainer applies it ('none' turns it off again)."""
    model.gradient_checkpointing_disable()
    enable_activation_checkpointing(model, mode)


def measure(m: Model, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    opt = torch.optim.AdamW(m.model.parameters(), lr=1e-5)
    for p in m.model.parameters():  # allocate the optimizer state now, not inside the first measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    runs = variants(m.name, m.layout, device)
    if not args.reference:
        runs.pop("reference (all cuts off)")
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}  # process CPU time: less sensitive to other load
    peaks: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, float] = {}
    failed: dict[str, str] = {}
    for rep in range(args.warmup + args.reps):
        for name, opts in runs.items():
            if name in failed:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                set_recompute(m.model, (opts or {}).get("recompute", "none"))
                with PeakMemory(device) as mem:  # forward + backward (the optimizer's is the same for all)
                    loss = (ar_step(m, batch) if opts is None or opts.get("ar")
                            else diffusion_step(m, batch, opts, rep))
            except Exception as e:  # noqa: BLE001 - one variant's failure (e.g. a kernel this device lacks)
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"  # must not lose the rest
                print(f"  [{m.name}] {name} failed: {failed[name]}", file=sys.stderr, flush=True)
                m.model.zero_grad(set_to_none=True)
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            print(f"  [{m.name} round {rep}{' warmup' if rep < args.warmup else ''}] {name}: {dt:.2f} s, "
                  f"{dc:.2f} CPU s, {mem.peak / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            if rep >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
                peaks[name].append(mem.peak)
                losses[name] = float(loss.detach())
    n_resp = int(batch["supervised"].sum())
    out = {}
    for name in (n for n in runs if n not in failed):
        t, p = statistics.median(times[name]), statistics.median(peaks[name])
        out[name] = {"s_per_step": t, "cpu_s_per_step": statistics.median(cpu[name]),
                     "response_tokens_per_s": n_resp / t, "peak_mib": p / 2**20}
    ar = out["AR SFT"]
    for name, why in failed.items():
        out[name] = {"failed": why}
    for r in out.values():
        if "failed" in r:
            continue
        r["time_vs_ar"] = r["s_per_step"] / ar["s_per_step"]
        r["cpu_vs_ar"] = r["cpu_s_per_step"] / ar["cpu_s_per_step"]
        r["mem_vs_ar"] = r["peak_mib"] / max(ar["peak_mib"], 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,llama27m",
                    help="comma list of tiny, llama27m, llada100m, dream100m, llada2_100m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--response", type=float, default=0.54, help="fraction of tokens that are response")
    ap.add_argument("--reps", type=int, default=5, help="measured rounds (medians)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="leave out the all-cuts-off variant (saves time)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    block = MaskingConfig().block_size
    results = {}
    for name in args.configs.split(","):
        try:
            m = build(name, device, args.fixtures)
        except (ImportError, OSError, ValueError) as e:
            print(f"\n== {name}: skipped ({type(e).__name__}: {e})")
            continue
        m.model.train()
        n_params = sum(p.numel() for p in m.model.parameters())
        vocab = m.model.get_input_embeddings().weight.shape[0]
        batch = make_batch(args.batch, args.length, args.response, vocab, device)
        n_resp = int(batch["supervised"].sum())
        res = measure(m, batch, args, device)
        method, ar = flop_floor(m, batch, block)
        family = family_of(m.model).model_type
        print(f"\n== {name} ({family}, layout {m.layout}): {n_params / 1e6:.1f} M parameters, "
              f"B={args.batch}, L={args.length}, block {block}, "
              f"{100 * n_resp / batch['supervised'].numel():.1f} % response tokens, {device}, "
              f"{torch.get_num_threads()} threads, median of {args.reps} interleaved steps")
        print(f"{'variant':<36}{'s/step':>9}{'CPU s':>8}{'resp tok/s':>12}{'peak MiB':>10}{'time/AR':>9}"
              f"{'CPU/AR':>8}{'mem/AR':>8}")
        for vname, r in res.items():
            if "failed" in r:
                print(f"{vname:<36} failed: {r['failed']}")
                continue
            print(f"{vname:<36}{r['s_per_step']:>9.3f}{r['cpu_s_per_step']:>8.2f}"
                  f"{r['response_tokens_per_s']:>12.0f}{r['peak_mib']:>10.0f}"
                  f"{r['time_vs_ar']:>8.2f}x{r['cpu_vs_ar']:>7.2f}x{r['mem_vs_ar']:>7.2f}x")
        rate = {k: f"{f / res[k]['s_per_step'] / 1e9:.1f}" if "s_per_step" in res[k] else "-"
                for k, f in (("default", method), ("AR SFT", ar))}
        print(f"FLOP floor (fwd+bwd): method {method / 1e9:.1f} GFLOP, AR {ar / 1e9:.1f} GFLOP "
              f"= {method / ar:.2f}x AR; default step at {rate['default']} GFLOP/s of floor work, "
              f"AR at {rate['AR SFT']}")
        results[name] = {"params": n_params, "family": family, "layout": m.layout, "batch": args.batch,
                         "length": args.length, "response_tokens": n_resp, "device": str(device),
                         "threads": torch.get_num_threads(), "flop_floor": method, "ar_flop_floor": ar,
                         "variants": res}
        del m
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
