"""The optimised training step equals the reference one (one [x_t ; x_0] row per view, every noisy block,
LM head on every noisy column, dense SDPA): loss and gradients, for every masking mode and layout.

Also: the row layout's masks agree with each other (dense, flex, decoding), and the block-sparse SDPA
equals dense SDPA, forward and backward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.attention import (
    BLOCK_SPARSE_SDPA,
    _coarsen,
    block_diffusion_mask,
    block_mask_to_dense,
    block_sparse_sdpa,
    tile_maps,
)
from trainer.layout import PackedRows, RowLayout, block_causal_mask, kept_blocks
from trainer.masking import MaskingConfig
from trainer.modeling import call_model
from trainer.objective import make_training_batch
from trainer.tiny_model import TinyDLLMForMaskedDiffusion, tiny_config

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "reference_models"
VOCAB, MASK_ID, EOS_ID, BLOCK = 512, 1, 2, 8
REFERENCE = {"packing": "rows", "skip_blocks": False, "masked_head": False, "attn_backend": "sdpa"}
DEFAULT = {"packing": "shared", "skip_blocks": True, "masked_head": True, "attn_backend": "sparse"}


def _batch(b: int = 3, length: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    sup = torch.zeros(b, length, dtype=torch.bool)
    for i, start in enumerate((21, 35, 17)[:b]):  # prompts: blocks 0-1 are prompt in every row
        sup[i, start:] = True
    ids[:, 56:] = EOS_ID
    return {"input_ids": ids, "supervised": sup, "dense": torch.rand(b, length, generator=g) < 0.3}


def _model(impl: str) -> TinyDLLMForMaskedDiffusion:
    torch.manual_seed(0)
    cfg = tiny_config(VOCAB, MASK_ID, EOS_ID, hidden_size=64, num_layers=2, num_heads=2, max_positions=128,
                      attn_implementation=impl)
    return TinyDLLMForMaskedDiffusion(cfg)


def _step(masking: MaskingConfig, layout: str, opts: dict) -> tuple[dict, list[torch.Tensor]]:
    model = _model(BLOCK_SPARSE_SDPA if opts["attn_backend"] == "sparse" else "sdpa")
    tb = make_training_batch(_batch(), masking, MASK_ID, torch.Generator().manual_seed(1), layout=layout,
                             **opts)
    logits = call_model(model, **tb.model_inputs, keep=tb.keep)
    elbo = tb.loss(logits, "elbo")
    elbo.loss.backward()
    mean = tb.loss(logits.detach(), "masked_mean")
    values = {"elbo": elbo.loss.detach(), "masked_mean": mean.loss, "n_masked": elbo.n_masked,
              "n_dense": elbo.n_dense, "ce_dense": elbo.ce_dense_sum, "ce_other": elbo.ce_other_sum,
              "n_supervised": elbo.n_supervised, "width": tb.model_inputs["input_ids"].shape[1]}
    return values, [p.grad.clone() for p in model.parameters()]


def _variants(layout: str) -> list[dict]:
    """The default step and the default with each cut off in turn."""
    if layout == "full":  # no clean half, nothing to share or skip
        return [{**DEFAULT, "packing": "rows", "skip_blocks": False},
                {**DEFAULT, "packing": "rows", "skip_blocks": False, "masked_head": False}]
    return [DEFAULT] + [{**DEFAULT, key: REFERENCE[key]} for key in DEFAULT]


@pytest.mark.parametrize("mode,complementary,layout", [
    ("soft", True, "block"), ("hard", True, "block"), ("odds", True, "block"), ("uniform", True, "block"),
    ("soft", False, "block"), ("soft", True, "full"),
])
def test_optimised_step_equals_the_reference(mode: str, complementary: bool, layout: str) -> None:
    masking = MaskingConfig(mode=mode, complementary=complementary, block_size=BLOCK)
    ref, ref_grads = _step(masking, layout, REFERENCE)
    assert ref["n_masked"] > 0
    for opts in _variants(layout):
        got, grads = _step(masking, layout, opts)
        for key in ("n_masked", "n_dense", "n_supervised"):
            assert got[key] == ref[key], (opts, key)
        for key in ("elbo", "masked_mean", "ce_dense", "ce_other"):
            torch.testing.assert_close(got[key], ref[key], rtol=2e-6, atol=1e-5, msg=f"{opts} {key}")
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=f"{opts} gradient")
    if layout == "block":
        shared_skip, _ = _step(masking, layout, DEFAULT)
        # One packed row of the 3 samples (prompts end in blocks 2, 4, 2), each [x_t(M) ; x_t(S - M) ; x_0]
        # with its prompt-only blocks left out and the clean blocks 0-6 that its noisy blocks read.
        views = 2 if complementary else 1
        assert shared_skip["width"] == sum(views * 8 * kept + 56 for kept in (6, 4, 6))
        dense_skip, _ = _step(masking, layout, {**DEFAULT, "attn_backend": "sdpa"})
        assert dense_skip["width"] == views * 48 + 56  # dense SDPA: one layout, the blocks any row keeps


@pytest.mark.parametrize("layout", ["block", "full"])
def test_a_micro_batch_without_supervised_tokens_still_runs_every_module(layout: str) -> None:
    """Every noisy block is left out and the head keeps no position, yet the step is an exact 0 that
    reaches every parameter: under ZeRO-3 each rank must run the same modules, forward and backward."""
    batch = _batch()
    batch["supervised"][:] = False
    model = _model(BLOCK_SPARSE_SDPA)
    tb = make_training_batch(batch, MaskingConfig(block_size=BLOCK), MASK_ID,
                             torch.Generator().manual_seed(1), layout=layout, **DEFAULT)
    logits = call_model(model, **tb.model_inputs, keep=tb.keep)
    out = tb.loss(logits, "elbo")
    assert out.loss.item() == 0.0 and out.n_masked.item() == 0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_kept_blocks_are_those_some_row_can_mask() -> None:
    sup = _batch()["supervised"]
    assert kept_blocks(sup, BLOCK) == tuple(range(2, 8))
    sup[1, 3] = True  # one maskable token in block 0 of one row keeps block 0 for the micro-batch
    assert kept_blocks(sup, BLOCK) == (0,) + tuple(range(2, 8))
    assert kept_blocks(torch.zeros(2, 10, dtype=torch.bool), 4) == ()


def test_layout_masks_agree() -> None:
    length = 24
    one = RowLayout(length, 4)
    assert torch.equal(one.dense_mask(), block_diffusion_mask(length, 4))
    shared = RowLayout(length, 4, views=2, kept=(1, 2, 4))
    m, n = shared.dense_mask(), shared.noisy_width
    assert n == 12 and shared.width == 2 * 12 + length
    assert torch.equal(shared.positions()[:n], torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19]))
    clean = slice(2 * n, None)
    assert not m[clean, :2 * n].any()  # the clean half never sees a noisy token: the same for both views
    assert not m[:n, n:2 * n].any() and not m[n:2 * n, :n].any()  # views never see each other
    sub = RowLayout(length, 4, kept=(1, 2, 4)).dense_mask()
    for v in range(2):
        cols = torch.cat([torch.arange(v * n, (v + 1) * n), torch.arange(2 * n, shared.width)])
        assert torch.equal(m[cols][:, cols], sub)  # each view is the one-view row
    valid = torch.ones(1, length, dtype=torch.bool)
    assert torch.equal(block_causal_mask(valid, 4)[0, 0], m[clean, clean])  # decoding = the clean half
    assert torch.equal(block_mask_to_dense(shared.block_mask("cpu", tile=16))[0, 0], m)
    packed = PackedRows((RowLayout(length, 4, views=2, kept=(1, 2, 4), clean_blocks=4),
                         RowLayout(length, 4, views=2, kept=(5,), clean_blocks=5)))
    pm, (r0, r1) = packed.dense_mask(), (r.width for r in packed.rows)
    assert pm.shape == (r0 + r1, r0 + r1) and not pm[:r0, r0:].any() and not pm[r0:, :r0].any()
    for i, (lo, hi) in enumerate(((0, r0), (r0, r0 + r1))):
        assert torch.equal(pm[lo:hi, lo:hi], packed.rows[i].dense_mask())
        assert torch.equal(packed.positions()[lo:hi], packed.rows[i].positions())
    trimmed = packed.rows[0].dense_mask()  # clean blocks 0-3 kept: the untrimmed row restricted to them
    assert torch.equal(trimmed, m[:2 * n + 16, :2 * n + 16])
    assert torch.equal(block_mask_to_dense(packed.block_mask("cpu", tile=16))[0, 0], pm)  # flex: the rule
    seg, pos, sample = packed.tables()
    idx = torch.arange(packed.width)
    assert torch.equal(packed.rule(idx[:, None], idx[None, :], seg, pos, sample), pm)
    for tile, n in ((4, 2), (4, 3), (8, 4)):  # the block-sparse plan's coarser tiles from the finer maps
        for got, want in zip(_coarsen(tile_maps(pm, tile), n), tile_maps(pm, n * tile)):
            assert torch.equal(got, want)
    x = torch.arange(2 * length).view(2, length)
    want = torch.cat([x[1, 20:24], -x[1, 20:24], x[1, :20] + 100])  # sample 1: block 5 twice, clean 0-4
    assert r1 == 2 * 4 + 20 and torch.equal(packed.pack([x, -x], x + 100)[0, r0:], want)
    full = RowLayout(length, 4, clean=False)
    assert full.dense_mask().all() and full.width == length


@pytest.mark.parametrize("tile,kv_heads", [(8, 4), (12, 2), (5, 1), (0, 2)])
def test_block_sparse_sdpa_equals_dense(tile: int, kv_heads: int) -> None:
    """Tiles equal to, not dividing, and smaller than the block (partial tiles take the sub-mask path), the
    chosen tile (0: `choose_plan`);
    grouped-query attention (fewer key/value heads)."""
    row = RowLayout(40, 8, views=2, kept=(1, 2, 4))
    mask = row.dense_mask()[None, None]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, row.width, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, row.width, 16, generator=g, requires_grad=True) for _ in range(2))

    class Attn(torch.nn.Module):
        num_key_value_groups = 4 // kv_heads

        def __init__(self) -> None:
            super().__init__()
            self.config = tiny_config(VOCAB, MASK_ID, EOS_ID)
            self.config.block_sparse_tile = tile

    out, _ = block_sparse_sdpa(Attn(), q, k, v, mask, scaling=0.25)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    rep = 4 // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=0.25).transpose(1, 2)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream", "llada2"])
def test_families_masked_head_and_sparse_attention(family: str) -> None:
    """Our published-family models: the block-sparse SDPA gives the sdpa logits, and a bool keep (the
    masked-only head; for Dream the predecessors, through call_model's shift) the slice-form logits."""
    from transformers import AutoModelForCausalLM

    import trainer.models.dream  # noqa: F401 - registers the families
    import trainer.models.llada  # noqa: F401
    import trainer.models.llada2  # noqa: F401

    path = FIXTURES / family
    layout = "full" if family == "dream" else "block"
    models = {impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
              for impl in ("sdpa", BLOCK_SPARSE_SDPA)}
    vocab = models["sdpa"].config.vocab_size
    mask_id = int(getattr(models["sdpa"].config, "mask_token_id", None) or vocab - 1)
    data = _batch(2, 32)
    data["input_ids"] = data["input_ids"] % (vocab - 2)
    data["supervised"][0] = True  # token 0 maskable: Dream's token 0 keeps its own logit
    tb = make_training_batch(data, MaskingConfig(block_size=BLOCK), mask_id, torch.Generator().manual_seed(2),
                             layout=layout, attn_backend="sparse")
    with torch.no_grad():
        noisy = tb.columns(torch.ones_like(tb.mask))  # every noisy column
        ref = call_model(models["sdpa"], **tb.model_inputs, keep=noisy)  # [n, V]
        sparse = call_model(models[BLOCK_SPARSE_SDPA], **tb.model_inputs, keep=noisy)
        masked = call_model(models["sdpa"], **tb.model_inputs, keep=tb.keep)  # [N, V]
    torch.testing.assert_close(sparse, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked, ref[tb.picked[noisy]], rtol=1e-4, atol=1e-5)
    if family == "dream":  # token 0 is masked in one of the two views (rows 0 and 2)
        assert tb.picked[:, 0].any()


@pytest.mark.parametrize("family", ["tiny", "llada2"])
def test_activation_checkpointing_keeps_loss_and_gradients(family: str) -> None:
    """'selective' (matmul and attention outputs kept, the rest recomputed) and 'full' recomputation give
    the loss and gradients of the plain step (the MoE family too)."""
    from transformers import AutoModelForCausalLM

    import trainer.models.llada2  # noqa: F401 - registers the family
    from trainer.recompute import enable_activation_checkpointing

    results = {}
    for mode in ("none", "selective", "full"):
        if family == "tiny":
            model, mask_id = _model(BLOCK_SPARSE_SDPA), MASK_ID
        else:
            model = AutoModelForCausalLM.from_pretrained(FIXTURES / family,
                                                         attn_implementation=BLOCK_SPARSE_SDPA)
            mask_id = int(getattr(model.config, "mask_token_id", None) or model.config.vocab_size - 1)
        model.train()
        enable_activation_checkpointing(model, mode)
        data = _batch()
        data["input_ids"] = data["input_ids"] % (model.config.vocab_size - 3) + 3
        tb = make_training_batch(data, MaskingConfig(block_size=BLOCK), mask_id,
                                 torch.Generator().manual_seed(1), **DEFAULT)
        loss = tb.loss(call_model(model, **tb.model_inputs, keep=tb.keep)).loss
        loss.backward()
        results[mode] = (loss.detach(), [p.grad for p in model.parameters() if p.grad is not None])
    with pytest.raises(ValueError, match="activation checkpointing"):
        enable_activation_checkpointing(model, "some")
    ref_loss, ref_grads = results["none"]
    for mode in ("selective", "full"):
        loss, grads = results[mode]
        assert len(grads) == len(ref_grads)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=mode)


def test_activation_checkpointing_auto_and_its_refusals() -> None:
    """'auto' is selective with the CPU attentions, none with flex and for the built-in tiny model;
    selective with flex is refused."""
    from trainer.components import resolve_activation_checkpointing as resolve
    from trainer.config import ConfigError

    assert resolve("auto", "sparse", builtin=False) == resolve("auto", "sdpa", builtin=False) == "selective"
    assert resolve("auto", "flex", builtin=False) == resolve("auto", "sparse", builtin=True) == "none"
    assert resolve("full", "flex", builtin=False) == "full"
    assert resolve("selective", "sparse", builtin=True) == "selective"
    with pytest.raises(ConfigError, match="model.activation_checkpointing: selective .* flex"):
        resolve("selective", "flex", builtin=False)


def test_selective_recompute_refuses_a_kept_output_changed_in_place() -> None:
    """A kept matmul output modified in place after the forward would hand the backward a wrong value:
    the recompute raises instead."""
    from torch.utils.checkpoint import checkpoint

    from trainer.recompute import _selective_contexts

    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = x @ w  # kept (aten.mm)
        y.mul_(2)  # changes the kept output after the forward recorded it
        return y.sin()

    out = checkpoint(f, x, use_reentrant=False, context_fn=_selective_contexts)
    with pytest.raises(RuntimeError, match="kept output was modified in place"):
        out.sum().backward()


@pytest.mark.slow
def test_bench_train_step_prints_its_table(tmp_path) -> None:
    """benchmarks/bench_train_step.py runs every variant on a small batch and writes ratios to AR."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "steps.json"
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_train_step.py"), "--configs", "tiny",
                        "--batch", "2", "--length", "64", "--reps", "1", "--warmup", "0", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=repo)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "FLOP floor" in p.stdout and "time/AR" in p.stdout
    variants = json.loads(out.read_text())["tiny"]["variants"]
    assert {"default", "default + selective recompute", "AR SFT", "AR SFT + selective recompute",
            "reference (all cuts off)"} <= set(variants)
    for name, r in variants.items():
        assert "failed" not in r, (name, r)
        assert r["cpu_vs_ar"] > 0 and r["mem_vs_ar"] > 0
