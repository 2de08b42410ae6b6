"""Semi-autoregressive block decoding for masked diffusion LMs (LLaDA / LLaDA2 style).

The answer is written block by block (``block_size`` tokens, ``trainer.masking.BLOCK_SIZE``).  Inside the
current block every position starts as ``<|mask|>``; each denoising step runs the model once,
predicts all masked positions and *accepts* some of them:

- ``remasking="threshold"`` (LLaDA2's ``generate``): every masked token whose confidence (the
  probability of the chosen token) exceeds ``threshold`` (default 0.95), and at least the
  scheduled count by top confidence;
- ``remasking="low_confidence"`` (LLaDA v1): exactly the scheduled count by top confidence.

The schedule spreads the block's masked tokens evenly over ``steps_per_block`` steps, so a block
is always finished after ``steps_per_block`` steps (earlier when the threshold accepts more).

LLaDA2.1 (its published ``generate``): ``min_transfer`` replaces the schedule by a fixed fallback
(every masked token above ``threshold``, else the ``min_transfer`` most confident); with
``editing_threshold`` the same step also replaces every written, non-prompt token of the current
block whose top prediction differs with probability above it.  A block is then final at the first
step that starts with no mask and edits nothing, or ``max_post_steps`` steps after its last mask.
Each sample ends its block on its own; its tokens then stay fixed while the batch goes on.
Attention is block-causal: a block sees itself both ways and every earlier block, never a later
one, as in training (``trainer.attention``); finished blocks are therefore never revisited.

Prompt placement (why it is done this way).  Training packs ``prompt + response`` from position 0
and cuts it into blocks at multiples of ``block_size``, so the block holding the end of the
prompt holds the start of the answer too.  We keep exactly that geometry per sample: the prompt's
last, partial block is the first block being decoded (its prompt tokens are fixed, only the rest
is masked), just like LLaDA2's reference.  To decode a batch of prompts of different lengths in
lock-step, each sample is left-padded by a *whole number of blocks* so that every sample's partial
block lands on the same canvas block; position ids restart at 0 at each sample's first prompt
token, and pad columns are invisible to every query.  Hence block boundaries, positions and the
visible context are identical to decoding the sample alone.

KV cache (optional).  With a block-causal mask the keys/values of finished blocks never change,
so they are computed once and kept in a transformers ``DynamicCache``; each step then runs only
the current block (the first step of a block also feeds the block just finished, to commit it).
LLaDA2's reference re-runs the whole prefix each step; both give the same tokens (tested).

Stopping: once a block is complete and contains a stop token (EOS, or the chat template's
end-of-turn token), that sample stops and drops out of the batch; its text is cut at the first
stop token and never exceeds ``gen_length`` new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from trainer.families import LAYOUTS
from trainer.layout import block_causal_mask
from trainer.masking import BLOCK_SIZE
from trainer.modeling import call_model, family_of

REMASKING = ("threshold", "low_confidence")
# LLaDA2.1's two published modes (diffusers' LLaDA2Pipeline docs, "Recommended parameters").
DECODING_PRESETS: dict[str, dict[str, float | int | None]] = {
    "llada2.1-quality": {"threshold": 0.7, "editing_threshold": 0.5, "max_post_steps": 16, "min_transfer": 1},
    "llada2.1-speed": {"threshold": 0.5, "editing_threshold": None, "max_post_steps": 16, "min_transfer": 1},
}
# End-of-turn tokens of common chat templates: a chat model ends its answer with one of these.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|role_end|>", "<|endoftext|>")

StepHook = Callable[[torch.Tensor, torch.Tensor, int, int], None]


@dataclass(kw_only=True, slots=True)
class DecodeConfig:
    """Block-decoding settings (paper: 512 / 32 / 32, greedy, threshold 0.95)."""

    gen_length: int = 512
    """Maximum number of new tokens per sample."""
    block_size: int = BLOCK_SIZE
    """Tokens per block; must equal the block size the model was trained with."""
    steps_per_block: int = 32
    """Denoising steps (model calls) per block at most."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples with Gumbel-max noise from the seeded generator."""
    threshold: float = 0.95
    """Confidence above which a token is accepted at once (``remasking='threshold'``)."""
    remasking: str = "threshold"
    """``threshold`` (LLaDA2) or ``low_confidence`` (LLaDA)."""
    layout: str = "block"
    """The attention the model was trained with (``objective.layout``): 'block' decodes with the
    block-causal mask (a block sees itself and earlier blocks), 'full' lets every position see the
    whole canvas, later still-masked blocks included (LLaDA v1 and Dream decode that way)."""
    kv_cache: bool = False
    """Keep finished blocks' keys/values instead of re-running the prefix each step ('block' only)."""
    editing_threshold: float | None = None
    """LLaDA2.1 editing: rewrite a generated token whose differing top prediction beats this; None = off."""
    max_post_steps: int = 16
    """With editing: steps allowed after a block's last mask is filled (LLaDA2.1's ``max_post_steps``)."""
    min_transfer: int | None = None
    """LLaDA2.1's ``num_to_transfer``: masks accepted per step at least, no step limit; None = schedule."""

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_size", "steps_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"DecodeConfig.threshold must be in [0, 1], got {self.threshold}")
        if self.editing_threshold is not None and not 0.0 <= self.editing_threshold <= 1.0:
            raise ValueError(f"DecodeConfig.editing_threshold must be in [0, 1] or None, "
                             f"got {self.editing_threshold}")
        if self.max_post_steps < 0:
            raise ValueError(f"DecodeConfig.max_post_steps must be >= 0, got {self.max_post_steps}")
        if self.min_transfer is not None and self.min_transfer < 1:
            raise ValueError(f"DecodeConfig.min_transfer must be >= 1 or None, got {self.min_transfer}")
        if self.remasking not in REMASKING:
            raise ValueError(f"DecodeConfig.remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"DecodeConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.kv_cache and self.layout != "block":
            raise ValueError("DecodeConfig.kv_cache needs layout 'block' (with full attention finished "
                             "blocks see later ones, so their keys/values keep changing)")


def transfer_schedule(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """[R] masked tokens per row -> [R, steps] tokens to accept per step, spread evenly.

    The remainder goes to the first steps (LLaDA's ``get_num_transfer_tokens``); the row sums equal
    the counts, so a block is finished by its last step whatever the threshold did before.
    """
    base = masked_counts // steps
    rem = masked_counts % steps
    sched = base[:, None].expand(-1, steps).clone()
    sched += (torch.arange(steps, device=masked_counts.device)[None, :] < rem[:, None]).long()
    return sched


def select_transfer(confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor, *,
                    threshold: float | None) -> torch.Tensor:
    """Which masked positions to accept this step: the top-``k`` by confidence per row, plus (when
    ``threshold`` is given) every masked position with confidence > threshold.

    confidence, masked: [R, B]; k: [R] (clamped to the masked count).  Ties break by position
    (stable sort), so the choice is deterministic.
    """
    conf = confidence.masked_fill(~masked, -float("inf"))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    k = torch.minimum(k, masked.sum(1))
    chosen = (rank < k[:, None]) & masked
    if threshold is not None:
        chosen |= (conf > threshold) & masked
    return chosen


def pick_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, B, V] logits -> (tokens [R, B], confidence [R, B] = probability of the chosen token).

    Gumbel-max in float64 for temperature > 0 (low-precision Gumbel noise hurts MDM samples,
    arXiv:2409.02908), drawn from ``generator`` so runs are reproducible.
    """
    logits = logits.double()
    if temperature > 0:
        logits = logits / temperature
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        tokens = torch.argmax(logits + gumbel, dim=-1)
    else:
        tokens = torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return tokens, torch.gather(probs, -1, tokens[..., None])[..., 0]


@dataclass(slots=True)
class _Canvas:
    """A batch laid out for lock-step block decoding (see the module docstring)."""

    x: torch.Tensor          # [b, T] token ids (pad = eos, masked = mask id)
    valid: torch.Tensor      # [b, T] bool: prompt or generation slot (False = padding)
    position_ids: torch.Tensor  # [b, T]
    gen_start: list[int]     # canvas column of each sample's first generated token
    first_block: int         # canvas block index where decoding starts
    num_blocks: int


def _layout(prompts: Sequence[Sequence[int]], gen_length: int, block: int, mask_id: int, pad_id: int,
            device: torch.device) -> _Canvas:
    full = [len(p) // block for p in prompts]                  # whole prompt blocks per sample
    first = max(full)
    offsets = [(first - f) * block for f in full]              # left padding, whole blocks
    ends = [o + -(-(len(p) + gen_length) // block) * block for o, p in zip(offsets, prompts)]
    total = max(ends)
    b = len(prompts)
    x = torch.full((b, total), pad_id, dtype=torch.long)
    valid = torch.zeros(b, total, dtype=torch.bool)
    for i, (p, o, e) in enumerate(zip(prompts, offsets, ends)):
        x[i, o:o + len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        x[i, o + len(p):e] = mask_id
        valid[i, o:e] = True
    pos = (torch.arange(total)[None, :] - torch.as_tensor(offsets)[:, None]).clamp_min(0)
    return _Canvas(x.to(device), valid.to(device), pos.to(device),
                   [o + len(p) for o, p in zip(offsets, prompts)], first, total // block)


def full_canvas_mask(valid: torch.Tensor) -> torch.Tensor:
    """[b, T] validity -> [b, 1, T, T] bool: every query sees every valid key ('full' layout).

    Padding queries attend to themselves only, so no softmax row is empty (SDPA would give NaN).
    """
    t = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, t, -1) | torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return allowed[:, None]


def supports_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the model's family may decode with a KV cache (:attr:`trainer.families.Family.kv_cache`)."""
    return family_of(model).kv_cache


def check_decoding(model: torch.nn.Module, cfg: DecodeConfig) -> None:
    """Refuse a layout or KV cache the model's family cannot decode correctly, naming the setting."""
    fam = family_of(model)
    fam.check_layout(cfg.layout, "decoding")
    if cfg.kv_cache and not fam.kv_cache:
        raise ValueError(f"kv_cache: not supported for {fam.model_type} (its logit i predicts token i+1, "
                         f"so a block's first token comes from the previous block's last position, which "
                         f"the cached step does not recompute); use kv_cache=False")


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, *,
                 mask_token_id: int, stop_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, on_step: StepHook | None = None
                 ) -> list[list[int]]:
    """Decode one batch of tokenised prompts -> generated ids per sample (cut at the first stop token).

    ``on_step(canvas [b, T], rows [r], block_start, block_end)`` is called after every denoising step
    with the full canvas (for instrumentation and tests: tokens may only appear in the current block).
    """
    check_decoding(model, cfg)
    device = next(model.parameters()).device
    blk = cfg.block_size
    canvas = _layout(prompts, cfg.gen_length, blk, mask_token_id, pad_token_id, device)
    x, valid = canvas.x, canvas.valid
    full = cfg.layout == "full"
    attn = full_canvas_mask(valid) if full else block_causal_mask(valid, blk)
    stops = torch.as_tensor(sorted(set(stop_token_ids)), device=device)
    sample_end = valid.long().cumsum(1).argmax(1)  # last valid column per sample
    rows = torch.arange(len(prompts), device=device)  # samples still decoding
    cache = DynamicCache() if cfg.kv_cache else None
    cached = 0  # canvas columns whose keys/values are in the cache
    thr = cfg.threshold if cfg.remasking == "threshold" else None
    editing = cfg.editing_threshold is not None
    gen_start = torch.as_tensor(canvas.gen_start, device=device)

    for b_idx in range(canvas.first_block, canvas.num_blocks):
        start, end = b_idx * blk, (b_idx + 1) * blk
        # [r, blk] generated columns of this block (not prompt, not padding): the only editable ones
        cols = torch.arange(start, end, device=device)
        gen_cols = valid[rows, start:end] & (cols[None, :] >= gen_start[rows, None])
        masked = x[rows, start:end] == mask_token_id
        sched = transfer_schedule(masked.sum(1), cfg.steps_per_block) if cfg.min_transfer is None else None
        post = torch.zeros(len(rows), dtype=torch.long, device=device)  # steps begun with no mask left
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)  # block final for this row
        step = 0
        while True:
            block = x[rows, start:end]
            masked = block == mask_token_id
            settled = ~masked.any(1)
            if editing:
                post += (settled & ~done).long()
                done |= post > cfg.max_post_steps
            else:
                done |= settled
            if done.all():
                break
            lo = cached if cache is not None else 0
            hi = x.shape[1] if full else end  # 'full': later (masked) blocks are visible too
            logits = call_model(model, input_ids=x[rows, lo:hi], attention_mask=attn[rows, :, lo:hi, :hi],
                                position_ids=canvas.position_ids[rows, lo:hi],
                                keep=slice(start - lo, end - lo), cache=cache)  # [r, blk, V]
            if cache is not None:
                # Keep finished blocks only (the current one still changes); crop takes -n to drop n.
                cache.crop(start - end)
                cached = start
            logits[..., mask_token_id] = -float("inf")  # never "predict" the mask itself
            tokens, conf = pick_tokens(logits, cfg.temperature, generator)
            if sched is None:
                k = torch.full_like(post, cfg.min_transfer)
            else:  # the schedule empties the block within steps_per_block steps; later steps only edit
                k = sched[:, step] if step < cfg.steps_per_block else torch.zeros_like(post)
            edit = (gen_cols & ~masked & (tokens != block) & (conf > cfg.editing_threshold) if editing
                    else torch.zeros_like(masked))
            chosen = (select_transfer(conf, masked, k, threshold=thr) | edit) & ~done[:, None]
            x[rows, start:end] = torch.where(chosen, tokens, block)
            done |= settled & ~edit.any(1)  # began with no mask and changed nothing: final
            step += 1
            if on_step is not None:
                on_step(x.clone(), rows.clone(), start, end)
        # Block finished: samples that produced a stop token here, or reached their length, stop.
        has_stop = (torch.isin(x[rows, start:end], stops) & gen_cols).any(1)
        finished = has_stop | (sample_end[rows] < end)
        if finished.any():
            keep = (~finished).nonzero()[:, 0]
            rows = rows[keep]
            if cache is not None and len(rows):
                cache.batch_select_indices(keep)
        if len(rows) == 0:
            break

    out = []
    for i in range(len(prompts)):
        ids = x[i, canvas.gen_start[i]:canvas.gen_start[i] + cfg.gen_length].tolist()
        cut = next((j for j, t in enumerate(ids) if t in set(stop_token_ids)), len(ids))
        out.append([t for t in ids[:cut] if t != mask_token_id])
    return out


def stop_tokens_of(tokenizer: PreTrainedTokenizerBase, eos_token_id: int, use_chat_template: bool
                   ) -> list[int]:
    """EOS plus, when a chat template is used, the template's end-of-turn token (if the vocab has one)."""
    ids = {int(eos_token_id)}
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        vocab = tokenizer.get_vocab()
        ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in tokenizer.chat_template}
    return sorted(ids)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], use_chat_template: bool
                   ) -> list[list[int]]:
    """Prompts -> token ids, through the tokenizer's chat template as one user turn when it has one.

    Must reproduce the prompt tokens of training (``preprocess.pipeline``): the rendered text is
    tokenized without special tokens, and when no chat template is applied (not asked for, or
    absent) the tokenizer's BOS id (when it has one) is prepended, exactly as the preprocessor
    does; a model trained on ``<bos> prompt`` and evaluated on ``prompt`` would see a shifted,
    unfamiliar context.
    """
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [int(bos)] if not templated and bos is not None else []
    out = []
    for p in prompts:
        if templated:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False)
        else:
            text = p
        out.append(prefix + tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
             mask_token_id: int, eos_token_id: int, gen_length: int = 512, block_size: int = BLOCK_SIZE,
             steps_per_block: int = 32, temperature: float = 0.0, threshold: float = 0.95,
             remasking: str = "threshold", use_chat_template: bool = True, batch_size: int = 8,
             seed: int = 0, layout: str = "block", kv_cache: bool = False,
             editing_threshold: float | None = None, max_post_steps: int = 16,
             min_transfer: int | None = None, on_step: StepHook | None = None) -> list[str]:
    """Generate one answer per prompt (text after the prompt, cut at the first stop token).

    Prompts are sorted by length into batches (less padding) and answers returned in input order.
    Deterministic under ``seed`` (greedy decoding is deterministic anyway; sampling uses a seeded
    generator).
    """
    cfg = DecodeConfig(gen_length=gen_length, block_size=block_size, steps_per_block=steps_per_block,
                       temperature=temperature, threshold=threshold, remasking=remasking, layout=layout,
                       kv_cache=kv_cache, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
                       min_transfer=min_transfer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts, use_chat_template)
    stops = stop_tokens_of(tokenizer, eos_token_id, use_chat_template)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids = generate_ids(model, [encoded[i] for i in idx], cfg, mask_token_id=mask_token_id,
                               stop_token_ids=stops, pad_token_id=eos_token_id, generator=generator,
                               on_step=on_step)
            for i, g in zip(idx, ids):
                texts[i] = tokenizer.decode(g, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts
