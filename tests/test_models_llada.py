"""Tests of trainer.models.llada against the tiny LLaDA fixture (hidden 64, 2 layers) in ../shared.

The fixture's reference logits come from the published modeling code (full attention, positions
0..L-1); masks, position ids and the KV cache, which that code ignores, are checked for consistency
with each other (the block-diffusion layout against an equivalent plain sequence, cached chunks against
one full pass).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

from trainer.attention import block_diffusion_block_mask, block_diffusion_mask
from trainer.models.llada import LLaDAConfig, LLaDAModel, LLaDAModelLM

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "reference_models" / "llada"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(),
                                   reason="../shared/reference_models/llada not present")
# flex_attention runs on CPU with torch 2.13 (compiled: ~10-25 s per shape, hence slow)
IMPLS = ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)]
MASK_ID = 1
BLOCK = 8


def load(impl: str = "sdpa", **overrides) -> LLaDAModelLM:
    return AutoModelForCausalLM.from_pretrained(FIXTURE, attn_implementation=impl, **overrides).eval()


def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


def block_causal(n: int) -> torch.Tensor:
    """[1, 1, n, n] bool: query block >= key block (blocks of BLOCK), the layout of cached decoding."""
    blk = torch.arange(n) // BLOCK
    return (blk[:, None] >= blk[None, :])[None, None]


@needs_fixture
@pytest.mark.parametrize("impl", IMPLS)
def test_reference_logits(impl: str) -> None:
    ref = reference()
    model, info = AutoModelForCausalLM.from_pretrained(FIXTURE, attn_implementation=impl,
                                                       output_loading_info=True)
    assert isinstance(model, LLaDAModelLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(input_ids=ref["input_ids"]).logits
    assert logits.shape == ref["logits_full"].shape
    torch.testing.assert_close(logits, ref["logits_full"], atol=1e-5, rtol=0)


@needs_fixture
def test_two_loads_bit_identical() -> None:
    ref = reference()
    with torch.no_grad():
        a, b = (load()(input_ids=ref["input_ids"]).logits for _ in range(2))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref["logits_full"], atol=1e-5, rtol=0)


@needs_fixture
def test_backbone_through_automodel() -> None:
    ref = reference()
    backbone = AutoModel.from_pretrained(FIXTURE).eval()
    assert isinstance(backbone, LLaDAModel)
    with torch.no_grad():
        hidden = backbone(input_ids=ref["input_ids"]).last_hidden_state  # [B, L, D]
        logits = backbone.transformer.ff_out(hidden)
    torch.testing.assert_close(logits, ref["logits_full"], atol=1e-5, rtol=0)


def _bd_inputs(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[x_t ; x_0] ids [2, 2n] (x_t has every third token masked) and position ids [1, 2n]."""
    x0 = reference()["input_ids"][:, :n]
    xt = x0.clone()
    xt[:, ::3] = MASK_ID
    pos = torch.cat([torch.arange(n), torch.arange(n)])[None]
    return xt, x0, pos


@needs_fixture
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_block_diffusion_perturbation(impl: str) -> None:
    model, n = load(impl), 32
    xt, x0, pos = _bd_inputs(n)
    mask = block_diffusion_mask(n, BLOCK)[None, None]

    def noisy_logits(xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:  # [B, n / BLOCK, BLOCK, V]
        with torch.no_grad():
            out = model(input_ids=torch.cat([xt, x0], 1), attention_mask=mask, position_ids=pos).logits
        return out[:, :n].unflatten(1, (n // BLOCK, BLOCK))

    base = noisy_logits(xt, x0)
    for b in range(n // BLOCK):
        clean = x0.clone()
        clean[:, b * BLOCK + 1] = 7 + b
        changed = (noisy_logits(xt, clean) - base).abs().amax(dim=(0, 2, 3))  # [n / BLOCK]
        assert (changed[: b + 1] == 0).all(), (b, changed)
        assert (changed[b + 1:] > 1e-4).all(), (b, changed)
        noisy = xt.clone()
        noisy[:, b * BLOCK + 1] = 7 + b
        changed = (noisy_logits(noisy, x0) - base).abs().amax(dim=(0, 2, 3))
        assert changed[b] > 1e-4 and (torch.cat([changed[:b], changed[b + 1:]]) == 0).all(), (b, changed)


@needs_fixture
def test_block_diffusion_equals_plain_prefix_sequence() -> None:
    """Noisy block b of [x_t ; x_0] (both halves at positions 0..n-1) == the last block of the plain
    sequence [x_0 blocks < b ; x_t block b] under a block-causal mask: the layout's position ids and
    4-D mask are honoured (ignoring either shifts the relative positions or leaks the noise)."""
    model, n = load(), 32
    xt, x0, pos = _bd_inputs(n)
    with torch.no_grad():
        bd_mask = block_diffusion_mask(n, BLOCK)[None, None]
        bd = model(input_ids=torch.cat([xt, x0], 1), attention_mask=bd_mask, position_ids=pos).logits[:, :n]
        for b in range(n // BLOCK):
            end = (b + 1) * BLOCK
            seq = torch.cat([x0[:, : b * BLOCK], xt[:, b * BLOCK: end]], 1)
            plain = model(input_ids=seq, attention_mask=block_causal(end)).logits[:, -BLOCK:]
            torch.testing.assert_close(bd[:, b * BLOCK: end], plain, atol=1e-5, rtol=0)


@needs_fixture
@pytest.mark.slow
def test_flex_block_mask_equals_dense_mask() -> None:
    n = 32
    xt, x0, pos = _bd_inputs(n)
    ids = torch.cat([xt, x0], 1)
    with torch.no_grad():
        dense = load()(input_ids=ids, attention_mask=block_diffusion_mask(n, BLOCK)[None, None],
                       position_ids=pos).logits
        block_mask = block_diffusion_block_mask(n, BLOCK, tile=16)
        flex = load("flex_attention")(input_ids=ids, attention_mask=block_mask, position_ids=pos).logits
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


@needs_fixture
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_mask(impl: str) -> None:
    """Padded keys are invisible: a [B, L] 0/1 mask or its [B, 1, L, L] boolean form gives the logits of
    the unpadded sequence at the real positions."""
    model, ids = load(impl), reference()["input_ids"][:, :24]
    keep = torch.ones_like(ids)
    keep[0, 16:] = 0
    with torch.no_grad():
        alone = model(input_ids=ids[:1, :16]).logits
        two_d = model(input_ids=ids, attention_mask=keep).logits
        four_d = model(input_ids=ids, attention_mask=keep.bool()[:, None, None, :].expand(2, 1, 24, 24))
        four_d = four_d.logits
        full = model(input_ids=ids[1:]).logits
    for logits in (two_d, four_d):
        torch.testing.assert_close(logits[:1, :16], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1:], full, atol=1e-5, rtol=0)


@needs_fixture
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
def test_kv_cache_chunks_equal_full_pass(impl: str, cache_kwarg: str) -> None:
    model, ids, n, split = load(impl), reference()["input_ids"][:, :32], 32, 24
    mask = block_causal(n)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        created = model(input_ids=ids[:, :4], use_cache=True).cache
        assert isinstance(created, DynamicCache) and created.get_seq_length() == 4
        cache = DynamicCache()
        first = model(input_ids=ids[:, :split], attention_mask=mask[..., :split, :split],
                      use_cache=True, **{cache_kwarg: cache})
        assert first.cache is cache and cache.get_seq_length() == split
        # position ids default to past + 0..L-1; pass them explicitly once too
        second = model(input_ids=ids[:, split:], attention_mask=mask[..., split:, :], use_cache=True,
                       **{cache_kwarg: cache}).logits
        cache.crop(split - n)  # drop the second chunk again
        explicit = model(input_ids=ids[:, split:], attention_mask=mask[..., split:, :], use_cache=True,
                         position_ids=torch.arange(split, n)[None], **{cache_kwarg: cache}).logits
    torch.testing.assert_close(first.logits, full[:, :split], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, full[:, split:], atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit, full[:, split:], atol=1e-5, rtol=0)


@needs_fixture
def test_published_attention_bias_is_refused() -> None:
    """The published forward takes ``attention_bias`` and ignores it; ours must not ignore it silently."""
    ids = reference()["input_ids"][:, :8]
    with pytest.raises(TypeError, match="attention_bias"):
        load()(input_ids=ids, attention_bias=torch.zeros(1, 1, 8, 8))


@needs_fixture
def test_logits_to_keep() -> None:
    model, ids = load(), reference()["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        keep = torch.zeros(ids.shape[1], dtype=torch.bool)
        keep[5:9] = True
        for arg, expected in [(0, full), (3, full[:, -3:]), (slice(0, 24), full[:, :24]),
                              (keep, full[:, 5:9]), (torch.tensor([1, 4, 30]), full[:, [1, 4, 30]])]:
            torch.testing.assert_close(model(input_ids=ids, logits_to_keep=arg).logits, expected,
                                       atol=1e-6, rtol=0)


@needs_fixture
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_save_reload(tmp_path: Path, shard: str | None) -> None:
    model, ids = load(), reference()["input_ids"]
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    saved = json.loads((tmp_path / "config.json").read_text())
    published = json.loads((FIXTURE / "config.json").read_text())
    metadata = {"transformers_version", "torch_dtype", "dtype"}
    assert {k: v for k, v in saved.items() if k not in metadata} == \
        {k: v for k, v in published.items() if k not in metadata}
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


@needs_fixture
def test_gradient_checkpointing_same_grads() -> None:
    ids = reference()["input_ids"][:, :16]
    grads, calls = [], []
    for on in (False, True):
        model = load().train()
        if on:
            model.activation_checkpointing_enable()
        q_calls = []  # forward runs of block 0's q_proj
        model.model.transformer.blocks[0].q_proj.register_forward_hook(lambda *_, log=q_calls: log.append(1))
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        calls.append(len(q_calls))
    assert calls == [1, 2]  # checkpointing re-runs the block in backward
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@needs_fixture
def test_scale_logits_and_weight_tying() -> None:
    ref = reference()
    with torch.no_grad():
        scaled = load(scale_logits=True)(input_ids=ref["input_ids"]).logits
        torch.testing.assert_close(scaled, ref["logits_full"] / math.sqrt(64), atol=1e-6, rtol=0)
        untied = load()
        tied = load(weight_tying=True)
        assert "model.transformer.ff_out.weight" not in tied.state_dict()
        untied.model.transformer.ff_out.weight.copy_(untied.model.transformer.wte.weight)
        torch.testing.assert_close(tied(input_ids=ref["input_ids"]).logits,
                                   untied(input_ids=ref["input_ids"]).logits, atol=1e-6, rtol=0)


def small_config(**overrides) -> LLaDAConfig:
    kw = dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96, vocab_size=100,
              embedding_size=128, eos_token_id=0, pad_token_id=0, mask_token_id=1)
    return LLaDAConfig(**(kw | overrides))


def test_fresh_model_gqa_padded_vocab_and_init() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config(attn_implementation="sdpa")).eval()
    ids = torch.randint(2, 100, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids).logits
    assert logits.shape == (2, 12, 128)  # embedding_size, padded past vocab_size
    torch.testing.assert_close(eager, logits, atol=1e-5, rtol=0)
    block = model.model.transformer.blocks[1]
    assert block.k_proj.weight.shape == (32, 64)  # 2 kv heads of 16
    # mitchell init: std 1/sqrt(fan_in), block outputs further / sqrt(2 (layer + 1)), truncated at 3 std
    wte = model.model.transformer.wte.weight
    for weight, std in [(block.q_proj.weight, 64 ** -0.5), (block.attn_out.weight, 64 ** -0.5 / 2),
                        (block.ff_out.weight, 96 ** -0.5 / 2), (wte, 64 ** -0.5)]:
        assert abs(weight.std().item() / (std * 0.986) - 1) < 0.15  # 0.986: std of a 3-sigma truncated normal
        assert weight.abs().max() <= 3 * std + 1e-6


@pytest.mark.parametrize("key,value", [("alibi", True), ("block_type", "sequential"), ("block_group_size", 2),
                                       ("rope", False), ("attention_layer_norm", True),
                                       ("activation_type", "swiglu"), ("layer_norm_type", "low_precision"),
                                       ("init_fn", "kaiming_normal"), ("embedding_size", 64),
                                       ("multi_query_attention", True)])
def test_config_refuses_unimplemented(key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        small_config(**{key: value})


def test_config_generic_names() -> None:
    cfg = small_config(n_kv_heads=None, multi_query_attention=True, mlp_hidden_size=None)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.padded_vocab_size) == (64, 2, 4, 1, 256, 100, 128)
