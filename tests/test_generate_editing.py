"""LLaDA2.1 decoding (mask-to-token plus token-to-token editing) in ``trainer.generation``: against an
independent transcription of the published ``generate()``, batched vs one by one, KV cache vs none,
a constructed edit, the ``max_post_steps`` bound, and the ``dm-evaluate`` presets.

The random-initialised models never change their mind as a block fills in (no edit happens even with
``editing_threshold=0``), so where edits must occur a forward hook adds a context-dependent bonus to
the real model's logits: the logit function then prefers, at each position, a token that depends on
its neighbours in the same block, and written tokens get better alternatives as the block fills.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation.cli import _decode_settings, build_parser, main
from preprocess.assets import TOKENIZER_DIR
from trainer.generation import DECODING_PRESETS, DecodeConfig, encode_prompts, generate_ids
from trainer.modeling import call_model, load_model

REPO = Path(__file__).resolve().parents[1]
LLADA2 = REPO.parent / "shared" / "reference_models" / "llada2"
EVAL_DATA = REPO / "tests" / "data" / "eval"
MASK, EOS = 1, 0
PROMPTS = ["What is 2+2?", "Write a python function that adds two numbers and returns the result.", "Hi"]
BLOCK = 8


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def llada2():
    if not LLADA2.is_dir():
        pytest.skip("../shared/reference_models/llada2 not present")
    bundle = load_model(LLADA2, tokenizer=TOKENIZER_DIR)
    # float64 so that the cached and uncached paths cannot differ by rounding at argmax ties
    bundle.model.to(torch.float64).eval()
    return bundle


def _ids(bundle, prompts=PROMPTS):
    return encode_prompts(bundle.tokenizer, prompts, use_chat_template=True)


def _decode(model, ids, calls=None, **kw):
    cfg = DecodeConfig(gen_length=16, block_size=BLOCK, **kw)
    hook = None if calls is None else (lambda x, r, s, e: calls.append((x, s)))
    return generate_ids(model, ids, cfg, mask_token_id=MASK, stop_token_ids=[], pad_token_id=EOS,
                        on_step=hook)


def _llada21_reference(model, prompt: list[int], gen_length: int, threshold: float,
                       editing_threshold: float | None, max_post_steps: int) -> tuple[list[int], int]:
    """One sample through a transcription of LLaDA2.1's published ``generate()`` (dllm's
    ``dllm/pipelines/llada21/models/modeling_llada21_moe.py``; ``num_to_transfer`` 1, greedy): the whole
    prefix re-run every step, no cache, no padding.  ``editing_threshold=None`` skips the editing
    phase, which makes it LLaDA2.0's loop with ``steps == block_length``.  As in our decoder (and the
    LLaDA2.0 reference in test_generate.py) the mask token is never predicted.  Returns the tokens and
    the number of edits made."""
    total = -(-(len(prompt) + gen_length) // BLOCK) * BLOCK
    x = torch.full((1, total), MASK, dtype=torch.long)
    x[0, :len(prompt)] = torch.tensor(prompt)
    blk = torch.arange(total) // BLOCK
    attn = (blk[:, None] >= blk[None, :])[None, None]
    edits = 0
    for b in range(len(prompt) // BLOCK, total // BLOCK):
        start, end = b * BLOCK, (b + 1) * BLOCK
        prompt_in_block = torch.arange(start, end)[None] < len(prompt)
        post_steps = 0
        while True:
            cur = x[:, start:end]
            old = cur.clone()
            active = cur == MASK
            if not active.any():
                post_steps += 1
            if post_steps > max_post_steps:
                break
            logits = call_model(model, input_ids=x[:, :end], attention_mask=attn[..., :end, :end],
                                position_ids=torch.arange(end)[None])[:, -BLOCK:].double()
            logits[..., MASK] = -float("inf")
            probs = torch.softmax(logits, -1)
            tok = probs.argmax(-1)
            p = probs.gather(-1, tok[..., None])[..., 0]
            take = torch.zeros_like(active)
            if active.any():
                conf = torch.where(active, p, -float("inf"))
                high = (conf > threshold) & active
                if high.sum() >= 1:
                    take = high
                else:
                    take[0, conf[0].argmax()] = True
            edit = torch.zeros_like(active)
            if editing_threshold is not None:
                edit = ~active & ~prompt_in_block & (p > editing_threshold) & (tok != old)
            both = take | edit
            cur[both] = tok[both]
            edits += int(edit.sum())
            if not active.any() and not edit.any():
                break
    return x[0, len(prompt):len(prompt) + gen_length].tolist(), edits


def _context_logits(model):
    """Hook: at each kept position add a bonus of 6..10 to the logit of a token chosen from its left and
    right neighbours in the same block (-1 outside it; the mask id counts as a token).  Reads the
    position ids, so it gives the same logits padded, batched, cached or not."""
    def hook(_module, _args, kwargs, out):
        ids, pos, keep = kwargs["input_ids"], kwargs["position_ids"], kwargs["logits_to_keep"]
        n = ids.shape[1]
        kept = range(n)[keep if isinstance(keep, slice) else slice(None)]
        logits = out.logits.clone()  # [r, kept, V]
        for r in range(ids.shape[0]):
            at = {int(pos[r, j]): int(ids[r, j]) for j in range(n)}  # real tokens come after left padding
            for q, j in enumerate(kept):
                p = int(pos[r, j])
                left = at.get(p - 1, -1) if (p - 1) // BLOCK == p // BLOCK else -1
                right = at.get(p + 1, -1) if (p + 1) // BLOCK == p // BLOCK else -1
                logits[r, q, 100 + (3 * left + 5 * right) % 50] += 6 + (left + right) % 5
        out.logits = logits
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


def _earlier_blocks_fixed(calls) -> bool:
    """Every step changed nothing before its block's start (finished blocks are never edited)."""
    return all(torch.equal(a[:, :s], b[:, :s]) for (a, _), (b, s) in zip(calls, calls[1:]))


def test_presets_and_bad_settings():
    q = DecodeConfig(**DECODING_PRESETS["llada2.1-quality"])
    s = DecodeConfig(**DECODING_PRESETS["llada2.1-speed"])
    assert (q.threshold, q.editing_threshold, q.max_post_steps, q.min_transfer) == (0.7, 0.5, 16, 1)
    assert (s.threshold, s.editing_threshold, s.max_post_steps, s.min_transfer) == (0.5, None, 16, 1)
    for field, value in (("editing_threshold", 1.5), ("max_post_steps", -1), ("min_transfer", 0)):
        with pytest.raises(ValueError, match=field):
            DecodeConfig(**{field: value})


def test_cli_presets_and_overrides(tmp_path):
    parse = build_parser().parse_args
    assert _decode_settings(parse(["run"])) == {}
    assert _decode_settings(parse(["run", "--decoding", "llada2.1-quality", "--threshold", "0.8",
                                   "--max-post-steps", "4"])) == \
        {"threshold": 0.8, "editing_threshold": 0.5, "max_post_steps": 4, "min_transfer": 1}
    assert _decode_settings(parse(["run", "--decoding", "llada2.1-quality", "--editing-threshold", "off"])
                            )["editing_threshold"] is None
    # end to end: the preset reaches the decoder and the results JSON
    rc = main(["run", "--model", "tiny", "--benchmarks", "gsm8k", "--gsm8k",
               str(EVAL_DATA / "gsm8k_mini.jsonl"), "--limit", "1", "--gen-length", "8", "--block-size", "8",
               "--decoding", "llada2.1-quality", "--out", str(tmp_path)])
    assert rc == 0
    decode = json.loads(next(tmp_path.glob("*.json")).read_text())["decode"]
    assert (decode["threshold"], decode["editing_threshold"], decode["min_transfer"]) == (0.7, 0.5, 1)
    assert main(["run", "--model", "tiny", "--min-transfer", "0", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_batched_editing_matches_published_loop(tiny):
    """Three prompts of different lengths decoded together (padding, rows ending their blocks at
    different steps) give exactly the published loop's tokens for each; edits happen, and finished
    blocks never change."""
    ids = _ids(tiny)
    model = tiny.model.eval()
    handle = _context_logits(model)
    try:
        calls: list = []
        ours = _decode(model, ids, calls, threshold=0.5, editing_threshold=0.3, max_post_steps=3,
                       min_transfer=1)
        with torch.no_grad():
            refs = [_llada21_reference(model, p, 16, 0.5, 0.3, 3) for p in ids]
    finally:
        handle.remove()
    assert ours == [r for r, _ in refs]
    assert all(n > 0 for _, n in refs[1:]), "the hooked logits must force edits"
    assert _earlier_blocks_fixed(calls)


@pytest.mark.slow
def test_editing_off_is_llada2_threshold_decoding(llada2):
    """Editing off: the LLaDA2.0 decoder (schedule over steps_per_block == block) and the LLaDA2.1
    fallback of one token (min_transfer=1) both give the published loop's tokens on the LLaDA2 fixture."""
    ids = _ids(llada2, PROMPTS[:2])
    model = llada2.model
    thr = 0.00045  # the fixture's top probabilities straddle it: some steps accept several tokens, some one
    with torch.no_grad():
        ref = [_llada21_reference(model, p, 16, thr, None, 16)[0] for p in ids]
    calls: list = []
    assert _decode(model, ids, calls, steps_per_block=BLOCK, threshold=thr) == ref
    steps = [sum(1 for _, s in calls if s == start) for start in sorted({s for _, s in calls})]
    assert any(1 < n < BLOCK for n in steps), steps
    assert _decode(model, ids, steps_per_block=2, threshold=thr, min_transfer=1) == ref


@pytest.mark.slow
def test_llada2_fixture_batch_and_cache(llada2):
    """On the LLaDA2 fixture with editing on: a batch of 2 equals two batches of 1 equals the published
    loop, and the KV cache gives the same tokens."""
    ids = _ids(llada2, PROMPTS[:2])
    model = llada2.model
    kw = dict(threshold=0.7, editing_threshold=0.5, max_post_steps=4, min_transfer=1)
    handle = _context_logits(model)
    try:
        batched = _decode(model, ids, **kw)
        cached = _decode(model, ids, kv_cache=True, **kw)
        single = [_decode(model, [p], **kw)[0] for p in ids]
        with torch.no_grad():
            refs = [_llada21_reference(model, p, 16, 0.7, 0.5, 4) for p in ids]
    finally:
        handle.remove()
    assert batched == cached == single == [r for r, _ in refs]
    assert sum(n for _, n in refs) > 0


def _rewrite(model, positions: int | list[int], table: dict[int, int]):
    """Hook: at the given position(s) (one unpadded prompt: column == position) the model is certain of
    ``table[current token]``; elsewhere the random model stays far below every threshold used here."""
    def hook(_module, _args, kwargs, out):
        ids, pos, keep = kwargs["input_ids"], kwargs["position_ids"], kwargs["logits_to_keep"]
        sl = keep if isinstance(keep, slice) else slice(None)
        logits = out.logits.clone()  # [r, kept, V]
        for r, q in torch.isin(pos[:, sl], torch.tensor(positions)).nonzero().tolist():
            now = int(ids[r, sl][q])
            logits[r, q, table[now]] += 1e4
        out.logits = logits
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_written_token_is_edited(tiny, kv_cache):
    """A token written at the first step gets a certain alternative once written: it is edited at the
    next step, then stable, and the block ends one step after its last mask is filled."""
    ids = _ids(tiny, PROMPTS[:1])
    n = len(ids[0])
    start = n // BLOCK * BLOCK
    col, a, b = start + BLOCK - 2, 200, 300
    handle = _rewrite(tiny.model, col, {MASK: a, a: b, b: b})
    try:
        calls: list = []
        out = _decode(tiny.model.eval(), ids, calls, threshold=0.9, editing_threshold=0.5, max_post_steps=16,
                      min_transfer=1, kv_cache=kv_cache)
    finally:
        handle.remove()
    first = [x for x, s in calls if s == start]
    masks = start + BLOCK - n
    assert [int(x[0, col]) for x in first[:2]] == [a, b], "written as a, then edited to b"
    assert len(first) == masks + 1, "one confirming step after the last mask, then the block is final"
    assert out[0][col - n] == b
    assert _earlier_blocks_fixed(calls)


def test_oscillation_stops_at_max_post_steps(tiny):
    """A token the model flips back and forth forever: the block still ends, max_post_steps steps after
    its last mask was filled, and decoding goes on with the next block."""
    ids = _ids(tiny, PROMPTS[:1])
    n = len(ids[0])
    start = n // BLOCK * BLOCK
    col, a, b, post = n, 200, 300, 2  # the first generated token
    handle = _rewrite(tiny.model, col, {MASK: a, a: b, b: a})
    try:
        calls: list = []
        out = _decode(tiny.model.eval(), ids, calls, threshold=0.9, editing_threshold=0.5,
                      max_post_steps=post, min_transfer=1)
    finally:
        handle.remove()
    masks = start + BLOCK - n
    assert sum(1 for _, s in calls if s == start) == masks + post
    assert sorted({s for _, s in calls})[1:] == [start + BLOCK, start + 2 * BLOCK]
    # written a at step 1, flipped at every later step: a after an odd number of steps
    assert out[0][col - n] == (a if (masks + post) % 2 else b)
    assert _earlier_blocks_fixed(calls)


def test_rows_end_their_blocks_independently(tiny):
    """Two prompts whose first decoded blocks hold 6 and 3 masks, each with a token flipped forever: in
    a batch the second sample's block is final 3 steps before the first's, and its tokens must then
    stay as they are (the batch equals the two samples decoded alone)."""
    ids = _ids(tiny, [PROMPTS[0], PROMPTS[2]])
    assert [len(p) for p in ids] == [18, 13], "the masks counts below assume these prompt lengths"
    handle = _rewrite(tiny.model, [18, 13], {MASK: 200, 200: 300, 300: 200})
    try:
        kw = dict(threshold=0.9, editing_threshold=0.5, max_post_steps=2, min_transfer=1)
        batched = _decode(tiny.model.eval(), ids, **kw)
        single = [_decode(tiny.model, [p], **kw)[0] for p in ids]
    finally:
        handle.remove()
    assert batched == single
    # 6 + 2 and 3 + 2 steps: an even count ends on 300, an odd one on 200
    assert (batched[0][0], batched[1][0]) == (300, 200)
