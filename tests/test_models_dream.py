"""Our Dream implementation against the logits of the published code (shared/reference_models/dream)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

from trainer.attention import block_diffusion_mask
from trainer.modeling import call_model
from trainer.models.dream import DreamModel, rope_inv_freq

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference_models" / "dream"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/reference_models/dream not present")
# flex_attention runs on the CPU (torch 2.13) but compiles for ~10-20 s, hence slow.
IMPLS = ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)]
BLOCK, HALF = 8, 24  # reference.json: bd layout [x_t ; x_0] of 2 x 24 tokens, block size 8
METADATA = {"transformers_version", "torch_dtype", "dtype"}  # written by whichever transformers saves


@functools.cache
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


@functools.cache
def model(impl: str = "sdpa") -> DreamModel:
    return AutoModelForCausalLM.from_pretrained(FIXTURE, attn_implementation=impl).eval()


def fresh_compile(impl: str) -> None:
    """Start flex from a static compile: once dynamo recompiles flex_attention with dynamic shapes
    (a second mask form or shape), torch 2.13's CPU kernel fails to build ("'cur_kvSplitSize5' was
    not declared"), a torch bug unrelated to the model."""
    if impl == "flex_attention":
        torch._dynamo.reset()


def bd_inputs() -> dict[str, torch.Tensor]:
    ref = reference()
    return {"input_ids": ref["bd_input_ids"], "position_ids": ref["bd_position_ids"],
            "attention_mask": ref["bd_mask_bool"][None, None].expand(2, 1, 2 * HALF, 2 * HALF)}


@torch.no_grad()
def logits(m: DreamModel, **kwargs) -> torch.Tensor:
    return m(**kwargs).logits


@pytest.mark.parametrize("impl", IMPLS)
def test_reproduces_published_logits(impl):
    ref = reference()
    m = model(impl)
    fresh_compile(impl)
    assert type(m) is DreamModel and m.config._attn_implementation == impl
    torch.testing.assert_close(logits(m, input_ids=ref["input_ids"]), ref["logits_full"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(m, **bd_inputs()), ref["bd_logits"], atol=1e-5, rtol=0)


def test_loads_every_published_name_and_rope_is_rederived():
    m, info = AutoModel.from_pretrained(FIXTURE, output_loading_info=True)
    assert type(m) is DreamModel  # the hub's AutoModel class, with the LM head
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(m.model.rotary_emb.inv_freq, rope_inv_freq(m.config))
    # A second load must give the very same logits (transformers 5 refills RoPE buffers with garbage).
    ids = reference()["input_ids"]
    assert torch.equal(logits(m.eval(), input_ids=ids), logits(model(), input_ids=ids))


def test_block_diffusion_mask_isolates_blocks():
    m, bd = model(), bd_inputs()
    base = logits(m, **bd)
    for b in range(HALF // BLOCK):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        # A clean token of block b: noisy blocks <= b see clean blocks < b only, so they must not move.
        ids = bd["input_ids"].clone()
        ids[:, HALF + lo + 3] = (ids[:, HALF + lo + 3] + 1) % m.config.vocab_size
        diff = (logits(m, **{**bd, "input_ids": ids}) - base).abs().amax(dim=(0, 2))  # [2L]
        assert diff[:hi].sum() == 0 and diff[HALF:HALF + lo].sum() == 0  # diffs are >= 0
        assert diff[HALF + lo:].max() > 1e-3  # control: clean blocks >= b see it
        # A noisy token of block b changes its own noisy block only.
        ids = bd["input_ids"].clone()
        ids[:, lo + 3] = 5 if ids[0, lo + 3] != 5 else 6
        diff = (logits(m, **{**bd, "input_ids": ids}) - base).abs().amax(dim=(0, 2))
        assert diff[:lo].sum() == 0 and diff[hi:].sum() == 0 and diff[lo:hi].max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_forms(impl):
    """None = full bidirectional; a 2-D padding mask blocks padded keys only, never causal."""
    m, ids = model(impl), reference()["input_ids"]
    fresh_compile(impl)
    full = logits(m, input_ids=ids)
    torch.testing.assert_close(full, reference()["logits_full"], atol=1e-5, rtol=0)
    ones = torch.ones(ids.shape, dtype=torch.long)
    torch.testing.assert_close(logits(m, input_ids=ids, attention_mask=ones), full, atol=1e-6, rtol=0)
    pad = ones.clone()
    pad[0, -5:] = 0
    as_4d = pad.bool()[:, None, None, :].expand(2, 1, ids.shape[1], ids.shape[1])
    padded = logits(m, input_ids=ids, attention_mask=pad)
    torch.testing.assert_close(padded, logits(m, input_ids=ids, attention_mask=as_4d), atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[1], full[1], atol=1e-6, rtol=0)  # the unpadded sample is unchanged
    assert (padded[0] - full[0]).abs().max() > 1e-3


def test_logits_to_keep_selects_positions():
    m, bd = model(), bd_inputs()
    full = logits(m, **bd)
    keep = torch.zeros(2 * HALF, dtype=torch.bool)
    keep[[1, 7, 30]] = True
    for arg, want in [(5, full[:, -5:]), (slice(0, HALF), full[:, :HALF]), (keep, full[:, keep]),
                      (keep.nonzero()[:, 0], full[:, keep])]:
        torch.testing.assert_close(logits(m, **bd, logits_to_keep=arg), want, atol=1e-6, rtol=0)


def test_trainer_call_path_gives_the_noisy_half():
    """The trainer's own block-diffusion mask and call_model (logits_to_keep = noisy half) reproduce it,
    aligned by call_model so that logit i predicts token i (the raw logits shifted right by one; see
    trainer/families.py for why Dream still trains in the full layout only)."""
    ref = reference()
    mask = block_diffusion_mask(HALF, BLOCK)  # [2L, 2L]
    assert torch.equal(mask, ref["bd_mask_bool"])
    with torch.no_grad():
        got = call_model(model(), input_ids=ref["bd_input_ids"], attention_mask=mask[None, None],
                         position_ids=ref["bd_position_ids"], keep=slice(0, HALF))
    raw = ref["bd_logits"][:, :HALF]
    torch.testing.assert_close(got, torch.cat([raw[:, :1], raw[:, :-1]], 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_save_reload_keeps_logits_and_published_config(tmp_path, shard):
    m, bd = model(), bd_inputs()
    m.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(back.eval(), **bd), logits(m, **bd))
    saved, published = (json.loads((p / "config.json").read_text()) for p in (tmp_path, FIXTURE))
    strip = lambda d: {k: v for k, v in d.items() if k not in METADATA}  # noqa: E731
    assert strip(saved) == strip(published)


def test_gradient_checkpointing_gives_the_same_grads():
    m = AutoModelForCausalLM.from_pretrained(FIXTURE).train()
    bd = bd_inputs()

    def grads() -> dict[str, torch.Tensor]:
        m.zero_grad()
        m(**bd).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    assert m(**bd).cache is None  # no cache is built in training unless asked for
    plain = grads()
    m.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in m.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_matches_one_full_forward(impl):
    """Block-causal decoding: chunk 2 with chunk 1's cache == the same rows of one full forward."""
    m, ids = model(impl), reference()["input_ids"]
    n, cut = ids.shape[1], 32
    blk = torch.arange(n) // 16
    allowed = (blk[:, None] >= blk[None, :])[None, None].expand(2, 1, n, n)  # [B, 1, L, L]
    full = logits(m, input_ids=ids, attention_mask=allowed)
    assert isinstance(m(input_ids=ids).cache, DynamicCache)  # eval: config.use_cache (true, as published)
    cache = DynamicCache()
    first = logits(m, input_ids=ids[:, :cut], attention_mask=allowed[:, :, :cut, :cut], cache=cache,
                   use_cache=True)
    assert cache.get_seq_length() == cut
    pos = torch.arange(cut, n)[None].expand(2, -1)
    second = logits(m, input_ids=ids[:, cut:], attention_mask=allowed[:, :, cut:, :], position_ids=pos,
                    cache=cache, use_cache=True)
    torch.testing.assert_close(first, full[:, :cut], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, full[:, cut:], atol=1e-5, rtol=0)
