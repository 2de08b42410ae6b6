"""Block decoding on the built-in tiny default: block order, prompt intact, threshold extremes, EOS
stop, batching, KV cache, determinism.  Short lengths keep this file at a few seconds."""

from __future__ import annotations

import pytest
import torch

from trainer.generation import (
    DecodeConfig,
    _layout,
    block_causal_mask,
    encode_prompts,
    generate,
    generate_ids,
    select_transfer,
    transfer_schedule,
)
from trainer.modeling import ModelBundle, build_tiny_model, call_model, load_model

MASK, EOS = 1, 0
# Lengths differ so that batches need padding and one prompt spans more than one 8-token block.
PROMPTS = ["What is 2+2?", "Write a python function that adds two numbers and returns the result.", "Hi"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def small64(tiny):
    # float64 so that the cached and uncached paths cannot differ by rounding at argmax ties; a
    # narrower body of the same class keeps float64 cheap on CPU
    model = build_tiny_model(tiny.tokenizer, hidden_size=64, num_layers=2).to(torch.float64)
    return ModelBundle(model, tiny.tokenizer, MASK, EOS, "tiny_dllm")


def _ids(bundle, prompts=PROMPTS):
    return encode_prompts(bundle.tokenizer, prompts, use_chat_template=True)


def test_transfer_schedule_even_and_complete():
    s = transfer_schedule(torch.tensor([32, 7, 0, 5]), 4)
    assert s.tolist() == [[8, 8, 8, 8], [2, 2, 2, 1], [0, 0, 0, 0], [2, 1, 1, 1]]


def test_select_transfer_threshold_and_topk():
    conf = torch.tensor([[0.99, 0.2, 0.97, 0.5], [0.1, 0.3, 0.2, 0.4]])
    masked = torch.tensor([[True, True, True, True], [True, False, True, True]])
    # threshold 0.95: both confident tokens go at once even though only 1 is scheduled
    got = select_transfer(conf, masked, torch.tensor([1, 1]), threshold=0.95)
    assert got.tolist() == [[True, False, True, False], [False, False, False, True]]
    # low-confidence (no threshold): exactly k by confidence, never an unmasked position
    got = select_transfer(conf, masked, torch.tensor([1, 2]), threshold=None)
    assert got.tolist() == [[True, False, False, False], [False, False, True, True]]
    # k larger than the masked count is clamped
    assert select_transfer(conf, masked, torch.tensor([9, 9]), threshold=None).sum().item() == 7


def test_layout_aligns_partial_blocks_and_positions():
    prompts = [[5] * 3, [6] * 21, [7] * 9, [8] * 16]  # the last one ends exactly on a block boundary
    c = _layout(prompts, gen_length=10, block=8, mask_id=MASK, pad_id=EOS, device=torch.device("cpu"))
    assert c.first_block == 2  # the 21-token prompt has 2 whole blocks
    for i, p in enumerate(prompts):
        start = int(c.valid[i].nonzero()[0])
        assert start % 8 == 0, "left padding must be whole blocks"
        assert c.position_ids[i, start] == 0 and c.position_ids[i, start + len(p) - 1] == len(p) - 1
        assert c.x[i, start:start + len(p)].tolist() == p
        # the sample's partial block (prompt tail + first masks) is the common first decoded block
        assert (start + len(p)) // 8 == c.first_block
        assert (c.x[i, c.gen_start[i]:c.gen_start[i] + 10] == MASK).all()
    mask = block_causal_mask(c.valid, 8)
    assert mask.shape == (4, 1, c.x.shape[1], c.x.shape[1])
    assert not mask[0, 0, 20, 0], "padding is never visible to a real query"
    assert mask[0, 0, 17, 23] and not mask[0, 0, 17, 24], "own block visible both ways, later block not"


def test_block_order_and_prompt_intact(tiny):
    ids = _ids(tiny)
    cfg = DecodeConfig(gen_length=24, block_size=8, steps_per_block=4)
    canvases: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
    out = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[EOS],
                       pad_token_id=EOS, on_step=lambda x, rows, s, e: canvases.append((x, rows, s, e)))
    layout = _layout(ids, 24, 8, MASK, EOS, torch.device("cpu"))
    prev = layout.x
    for x, rows, s, e in canvases:
        changed = (x != prev).nonzero()
        assert changed.numel() > 0, "every step unmasks at least one token"
        assert ((changed[:, 1] >= s) & (changed[:, 1] < e)).all(), "tokens only appear in the current block"
        assert (prev[changed[:, 0], changed[:, 1]] == MASK).all(), "only masked positions change"
        assert set(changed[:, 0].tolist()) <= set(rows.tolist())
        assert not (x[:, :s] == MASK)[rows][:, layout.first_block * 8:].any(), "earlier blocks are final"
        prev = x
    for i, p in enumerate(ids):  # prompt left intact
        st = layout.gen_start[i] - len(p)
        assert prev[i, st:layout.gen_start[i]].tolist() == p
    assert all(len(o) <= 24 and MASK not in o for o in out)
    assert max(s for _, _, s, _ in canvases) >= layout.first_block * 8 + 16, "decoding went on for 3 blocks"


def test_batched_equals_one_by_one(tiny):
    kw = dict(mask_token_id=MASK, eos_token_id=EOS, gen_length=16, block_size=8, steps_per_block=4)
    batched = generate(tiny.model, tiny.tokenizer, PROMPTS, batch_size=3, **kw)
    single = [generate(tiny.model, tiny.tokenizer, [p], batch_size=1, **kw)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and any(batched)


def test_threshold_extremes_step_counts(tiny):
    ids = _ids(tiny, PROMPTS[:1])
    n = len(ids[0])
    steps: dict[float, list[int]] = {}
    outs = {}
    for thr in (0.0, 1.0):
        calls: list[int] = []
        cfg = DecodeConfig(gen_length=16, block_size=8, steps_per_block=8, threshold=thr)
        outs[thr] = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[],
                                 pad_token_id=EOS, on_step=lambda x, r, s, e, calls=calls: calls.append(s))
        steps[thr] = [calls.count(s) for s in sorted(set(calls))]
    # threshold 0 accepts every masked token at the first step: one model call per block
    assert steps[0.0] == [1] * len(steps[0.0])
    # threshold 1 never fires: exactly one token per step, so a block takes as many steps as it has masks
    first_masks = 8 - n % 8
    assert steps[1.0][0] == first_masks and all(s == 8 for s in steps[1.0][1:])
    # and it is then the same as LLaDA's plain low-confidence remasking
    cfg = DecodeConfig(gen_length=16, block_size=8, steps_per_block=8, remasking="low_confidence")
    low = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[], pad_token_id=EOS)
    assert low == outs[1.0]
    assert len(outs[0.0][0]) == len(outs[1.0][0]) == 16


def test_deterministic_under_seed(tiny):
    kw = dict(mask_token_id=MASK, eos_token_id=EOS, gen_length=8, block_size=8, steps_per_block=2,
              temperature=1.0, batch_size=3, use_chat_template=False)
    a = generate(tiny.model, tiny.tokenizer, PROMPTS, seed=7, **kw)
    b = generate(tiny.model, tiny.tokenizer, PROMPTS, seed=7, **kw)
    c = generate(tiny.model, tiny.tokenizer, PROMPTS, seed=8, **kw)
    assert a == b
    assert a != c, "sampling at temperature 1 must depend on the seed"


@pytest.mark.parametrize("remasking", ["threshold", "low_confidence"])
def test_kv_cache_gives_same_tokens(small64, remasking):
    kw = dict(mask_token_id=MASK, eos_token_id=EOS, gen_length=32, block_size=8, steps_per_block=4,
              remasking=remasking, batch_size=3, threshold=0.5)
    plain = generate(small64.model, small64.tokenizer, PROMPTS, kv_cache=False, **kw)
    cached = generate(small64.model, small64.tokenizer, PROMPTS, kv_cache=True, **kw)
    assert plain == cached
    assert any(plain)


def _eos_at(model, column: int):
    """Instrument the real model: its logits favour EOS at one canvas column only (one unpadded prompt,
    so a column's position id is the column; the LM head runs on the kept positions only)."""
    def hook(_module, _args, kwargs, out):
        logits = out.logits.clone()  # [r, kept, V]
        logits[..., EOS] = -1e4
        keep = kwargs["logits_to_keep"]
        kept = kwargs["position_ids"][:, keep if isinstance(keep, slice) else slice(None)]  # [r, kept]
        logits[..., EOS] = torch.where(kept == column, 1e4, logits[..., EOS])
        out.logits = logits
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


def test_eos_stops_sample_after_its_block(tiny):
    ids = _ids(tiny, PROMPTS[:1])
    n = len(ids[0])
    first_block_end = (n // 8 + 1) * 8
    eos_col = first_block_end + 3  # inside the second decoded block
    handle = _eos_at(tiny.model, eos_col)
    try:
        starts: list[int] = []
        cfg = DecodeConfig(gen_length=64, block_size=8, steps_per_block=8)
        out = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[EOS],
                           pad_token_id=EOS, on_step=lambda x, r, s, e: starts.append(s))
    finally:
        handle.remove()
    assert len(out[0]) == eos_col - n, "text is cut right before EOS"
    assert EOS not in out[0]
    assert sorted(set(starts)) == [first_block_end - 8, first_block_end], "no block after the EOS block"


def test_gen_length_not_multiple_of_block(tiny):
    ids = _ids(tiny, PROMPTS[1:2])
    cfg = DecodeConfig(gen_length=13, block_size=8, steps_per_block=2, threshold=0.0)
    out = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[], pad_token_id=EOS)
    assert len(out[0]) == 13


def test_exported_hf_folder_loads_and_generates(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.family.model_type == "tiny_dllm" and again.mask_token_id == MASK
    kw = dict(gen_length=8, block_size=8, steps_per_block=4, batch_size=2)
    a = generate(again.model, again.tokenizer, PROMPTS[:2], mask_token_id=again.mask_token_id,
                 eos_token_id=again.eos_token_id, **kw)
    b = generate(tiny.model, tiny.tokenizer, PROMPTS[:2], mask_token_id=MASK, eos_token_id=EOS, **kw)
    assert a == b


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="block_size"):
        DecodeConfig(block_size=0)
    with pytest.raises(ValueError, match="remasking"):
        DecodeConfig(remasking="random")
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(threshold=1.5)


def _llada2_reference(model, prompt: list[int], gen_length: int, block: int, threshold: float) -> list[int]:
    """Independent transcription of LLaDA2's reference loop for one sample (steps == block length,
    schedule of ones, whole prefix re-run every step, no cache), to check our batched decoder."""
    total = -(-(len(prompt) + gen_length) // block) * block
    x = torch.full((1, total), MASK, dtype=torch.long)
    x[0, :len(prompt)] = torch.tensor(prompt)
    blk = torch.arange(total) // block
    attn = (blk[:, None] >= blk[None, :])[None, None]
    for b in range(len(prompt) // block, total // block):
        end = (b + 1) * block
        for _ in range(block):
            cur = x[:, end - block:end]
            active = cur == MASK
            if not active.any():
                break
            logits = call_model(model, input_ids=x[:, :end], attention_mask=attn[..., :end, :end],
                                position_ids=torch.arange(end)[None])[:, -block:].double()
            logits[..., MASK] = -float("inf")
            probs = torch.softmax(logits, -1)
            tok = probs.argmax(-1)
            conf = torch.where(active, probs.gather(-1, tok[..., None])[..., 0], -float("inf"))
            take = (conf > threshold) & active
            if take.sum() < 1:
                take = torch.zeros_like(active)
                take[0, conf[0].argmax()] = True
            cur[take] = tok[take]
    return x[0, len(prompt):len(prompt) + gen_length].tolist()


# A random-init model's top probability is ~1e-3: 0.95 never fires (top-1 per step), 7e-4 fires for
# some positions (mixed steps), 5e-4 for all (one step per block).
@pytest.mark.parametrize("threshold", [0.95, 0.0007, 0.0005])
def test_matches_llada2_reference_loop(tiny, threshold):
    ids = _ids(tiny, PROMPTS[:2])
    cfg = DecodeConfig(gen_length=12, block_size=8, steps_per_block=8, threshold=threshold)
    ours = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[], pad_token_id=EOS)
    with torch.no_grad():
        ref = [_llada2_reference(tiny.model, p, 12, 8, threshold) for p in ids]
    assert ours == ref


# ---------------------------------------------------------------- training <-> inference consistency

def _pipeline_prompts(tmp_path, tokenizer_dir, use_chat_template: bool, rows: list[dict]):
    """Prompt tokens exactly as the preprocessor writes them to the shards (the real pipeline)."""
    import json

    import numpy as np

    from preprocess.pipeline import PreprocessConfig, run_pipeline
    from preprocess.shards import ShardedDataset

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = run_pipeline(PreprocessConfig(inputs=[inp], output_dir=tmp_path / f"out{int(use_chat_template)}",
                                        tokenizer=tokenizer_dir, extractor="none", workers=1, num_shards=1,
                                        use_chat_template=use_chat_template))
    by_id = {}
    for s in ShardedDataset(out):
        by_id[s.sample_id] = s.tokens[:int(np.argmax(s.supervised))].tolist()
    return [by_id[r["id"]] for r in rows]


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_prompt_tokens_match_the_preprocessor(tmp_path, use_chat_template):
    """Evaluation must feed the prompt tokens the model was trained on: chat template + generation
    prompt when on, and ``<bos> + raw prompt`` when off (the preprocessor adds the tokenizer's BOS
    there).  A tokenizer copy with a BOS makes the second case meaningful."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from evaluation.prompts import gsm8k_prompt, mbpp_prompt
    from preprocess.assets import TOKENIZER_DIR

    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<|endoftext|>"  # any id the chat template does not start with
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.bos_token_id is not None
    prompts = [gsm8k_prompt({"question": "Tom has 3 apples and buys 4 more. How many now?"}),
               mbpp_prompt({"text": "Write a function to add two numbers.",
                            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]})]
    rows = [{"id": f"r{i}", "domain": "math", "prompt": p, "response": "7"} for i, p in enumerate(prompts)]
    expected = _pipeline_prompts(tmp_path, tok_dir, use_chat_template, rows)
    assert encode_prompts(tok, prompts, use_chat_template=use_chat_template) == expected
    assert (expected[0][0] == tok.bos_token_id) == (not use_chat_template)


def test_decoding_forward_equals_training_noisy_half(small64):
    """The logits generation computes for a block (clean prefix blocks + the partly masked block,
    block-causal mask, positions from 0) equal the logits the training layout [x_t ; x_0] computes
    for the same block: the model is evaluated exactly as it was trained."""
    from trainer.objective import build_model_inputs

    model, blk = small64.model.eval(), 8
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 4000, (n,), generator=g).tolist() for n in (13, 5)]
    answers = [torch.randint(2, 4000, (n,), generator=g).tolist() for n in (27, 30)]
    canvas = _layout(prompts, 35, blk, MASK, EOS, torch.device("cpu"))
    attn = block_causal_mask(canvas.valid, blk)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        seq = torch.tensor([p + a])
        length = seq.shape[1]
        off = canvas.gen_start[row] - len(p)
        for b in range(len(p) // blk, -(-length // blk)):
            start, end = b * blk, min((b + 1) * blk, length)
            mask = torch.zeros(1, length, dtype=torch.bool)
            mask[0, max(start, len(p)):end] = True
            mask[0, max(start, len(p)):end:3] = False  # some answer tokens already decoded
            inputs = build_model_inputs(seq, mask, MASK, "block", blk)
            cols = slice(0, off + end)  # the canvas up to the end of block b, left padding included
            x = canvas.x[row:row + 1, cols].clone()
            x[0, off:] = torch.where(mask[0, :end], MASK, seq[0, :end])
            with torch.no_grad():
                train_logits = call_model(model, **inputs)[0, start:end]
                infer_logits = call_model(model, input_ids=x, attention_mask=attn[row:row + 1, :, cols, cols],
                                          position_ids=canvas.position_ids[row:row + 1, cols])
            torch.testing.assert_close(infer_logits[0, off + start:], train_logits, rtol=0, atol=1e-9)


def test_full_layout_sees_later_blocks(tiny):
    """layout='full' (a model trained with full attention): a query sees the still-masked later blocks,
    so the first block's logits change when a later canvas column changes; 'block' never lets them."""
    from trainer.generation import block_causal_mask, full_canvas_mask

    valid = torch.tensor([[False] * 4 + [True] * 12])
    full, causal = full_canvas_mask(valid)[0, 0], block_causal_mask(valid, 4)[0, 0]
    assert full[4:, 4:].all() and not full[4:, :4].any() and full[:4, :4].diagonal().all()
    assert not causal[4, 8] and causal[8, 4]
    ids = _ids(tiny, PROMPTS[:1])
    cfg = DecodeConfig(gen_length=16, block_size=8, steps_per_block=4, layout="full")
    out = generate_ids(tiny.model.eval(), ids, cfg, mask_token_id=MASK, stop_token_ids=[], pad_token_id=EOS)
    assert len(out[0]) == 16
    with pytest.raises(ValueError, match="kv_cache needs layout 'block'"):
        DecodeConfig(layout="full", kv_cache=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        DecodeConfig(layout="causal")

