"""Tests of trainer.objective: noisy inputs, layouts on the tiny model, the loss and its split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.masking import MaskingConfig
from trainer.objective import build_model_inputs, diffusion_loss, make_training_batch
from trainer.tiny_model import TinyDLLMForMaskedDiffusion, tiny_config

MASK_ID, EOS_ID, VOCAB = 1, 0, 97


@pytest.fixture(scope="module")
def model() -> TinyDLLMForMaskedDiffusion:
    torch.manual_seed(0)
    cfg = tiny_config(VOCAB, MASK_ID, EOS_ID, hidden_size=64, num_layers=2, num_heads=2, max_positions=256)
    return TinyDLLMForMaskedDiffusion(cfg).eval()


def _ids(b: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- inputs

def test_block_layout_inputs() -> None:
    ids = _ids(3, 16)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    out = build_model_inputs(ids, mask, MASK_ID, "block", 4)
    x = out["input_ids"]
    assert x.shape == (3, 32)
    assert torch.equal(x[:, 16:], ids)  # clean half is x_0
    assert (x[:, :16][mask] == MASK_ID).all() and torch.equal(x[:, :16][~mask], ids[~mask])
    assert torch.equal(out["position_ids"], torch.arange(16).repeat(2).expand(3, 32))
    assert out["attention_mask"].shape == (1, 1, 32, 32) and out["attention_mask"].dtype == torch.bool


def test_full_layout_inputs() -> None:
    ids = _ids(2, 12)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 3] = True
    out = build_model_inputs(ids, mask, MASK_ID, "full", 4)
    assert out["input_ids"].shape == (2, 12) and (out["input_ids"][:, 3] == MASK_ID).all()
    assert out["attention_mask"].shape == (1, 1, 12, 12) and out["attention_mask"].all()
    assert torch.equal(out["position_ids"][1], torch.arange(12))


def test_bad_arguments_are_named() -> None:
    ids = _ids(1, 8)
    with pytest.raises(ValueError, match="layout"):
        build_model_inputs(ids, ids > 50, MASK_ID, "causal", 4)
    with pytest.raises(ValueError, match="attn_backend"):
        build_model_inputs(ids, ids > 50, MASK_ID, "block", 4, "xformers")
    with pytest.raises(KeyError, match="dense"):
        make_training_batch({"input_ids": ids, "supervised": ids > 0}, MaskingConfig(), MASK_ID)


# ---------------------------------------------------------------- block layout end-to-end on the tiny model

@torch.no_grad()
def test_block_layout_information_flow(model: TinyDLLMForMaskedDiffusion) -> None:
    length, bs, blk = 32, 8, 1  # 4 blocks; probe noisy block 1 (positions 8..15)
    ids = _ids(1, length, 3)
    mask = torch.rand(1, length, generator=torch.Generator().manual_seed(4)) < 0.5

    def logits(x0: torch.Tensor, m: torch.Tensor = mask) -> torch.Tensor:
        return model(**build_model_inputs(x0, m, MASK_ID, "block", bs)).logits[0]

    base = logits(ids)
    noisy = slice(0, length)
    upto_b = slice(0, (blk + 1) * bs)
    # a clean-half token of block b+1 changes: noisy blocks <= b must not move
    changed = ids.clone()
    changed[0, (blk + 1) * bs + 2] = (changed[0, (blk + 1) * bs + 2] + 1 - 2) % (VOCAB - 2) + 2
    changed_mask = mask.clone()
    changed_mask[0, (blk + 1) * bs + 2] = False  # make sure it is visible as a clean token, not masked
    a = logits(ids, changed_mask)
    b = logits(changed, changed_mask)
    torch.testing.assert_close(a[noisy][upto_b], b[noisy][upto_b], atol=0, rtol=0)
    # ...but the noisy block b+1 itself sees its own (unmasked) noisy token change
    assert not torch.allclose(a[(blk + 1) * bs:(blk + 2) * bs], b[(blk + 1) * bs:(blk + 2) * bs])
    # x_0 in block b-1 changes: noisy block b must change (it is conditioned on earlier clean blocks)
    prev = ids.clone()
    prev[0, (blk - 1) * bs + 1] = (prev[0, (blk - 1) * bs + 1] - 2 + 5) % (VOCAB - 2) + 2
    all_masked_prev = mask.clone()
    all_masked_prev[0, (blk - 1) * bs:blk * bs] = True  # the noisy copy of block b-1 is all masks
    c = logits(ids, all_masked_prev)
    d = logits(prev, all_masked_prev)
    assert not torch.allclose(c[blk * bs:(blk + 1) * bs], d[blk * bs:(blk + 1) * bs])
    # a noisy token of block b changes: other noisy blocks and the whole clean half must not move
    noisy_change = mask.clone()
    noisy_change[0, blk * bs + 3] = ~noisy_change[0, blk * bs + 3]
    e = logits(ids, noisy_change)
    others = torch.ones(2 * length, dtype=torch.bool)
    others[blk * bs:(blk + 1) * bs] = False
    torch.testing.assert_close(base[others], e[others], atol=0, rtol=0)


@torch.no_grad()
def test_full_layout_is_all_to_all(model: TinyDLLMForMaskedDiffusion) -> None:
    ids = _ids(1, 24, 5)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    a = model(**build_model_inputs(ids, mask, MASK_ID, "full", 8)).logits
    mask[0, 23] = True  # the last token becomes a mask: the first position must see it
    b = model(**build_model_inputs(ids, mask, MASK_ID, "full", 8)).logits
    assert a.shape == (1, 24, VOCAB)
    assert not torch.allclose(a[0, 0], b[0, 0])


# ---------------------------------------------------------------- loss

def _loss_case(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, length = 3, 20
    logits = torch.randn(b, 2 * length, VOCAB, generator=g, requires_grad=True)
    targets = torch.randint(0, VOCAB, (b, length), generator=g)
    supervised = torch.arange(length)[None].expand(b, length) >= 5
    mask = (torch.rand(b, length, generator=g) < 0.5) & supervised
    dense = torch.rand(b, length, generator=g) < 0.3
    t = torch.rand(b, length, generator=g) * 0.5 + 0.3
    return logits, targets, mask, dense, t, supervised


def test_masked_mean_loss_matches_manual() -> None:
    logits, targets, mask, dense, t, sup = _loss_case()
    out = diffusion_loss(logits, targets, mask, dense, t, "masked_mean", sup)
    ce = F.cross_entropy(logits[:, :20].reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(3, 20)
    assert out.loss.item() == pytest.approx(ce[mask].mean().item(), rel=1e-6)
    assert out.ce_dense_sum.item() == pytest.approx(ce[mask & dense].sum().item(), rel=1e-6)
    assert out.ce_other_sum.item() == pytest.approx(ce[mask & ~dense].sum().item(), rel=1e-6)
    assert out.n_dense.item() == (mask & dense).sum().item()
    assert out.n_other.item() == (mask & ~dense).sum().item()
    assert out.n_masked.item() == mask.sum().item() and out.n_supervised.item() == sup.sum().item()
    assert out.realised_rate.item() == pytest.approx(mask.sum().item() / sup.sum().item())
    out.loss.backward()
    assert logits.grad[:, 20:].abs().sum() == 0  # the clean half carries no loss
    assert (logits.grad[:, :20][~mask].abs().sum(-1) == 0).all()


def test_elbo_loss_matches_manual() -> None:
    logits, targets, mask, dense, t, sup = _loss_case(1)
    out = diffusion_loss(logits, targets, mask, dense, t, "elbo", sup)
    ce = F.cross_entropy(logits[:, :20].reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(3, 20)
    assert out.loss.item() == pytest.approx((ce[mask] / t[mask]).sum().item() / sup.sum().item(), rel=1e-6)
    assert out.normalizer.item() == sup.sum().item()
    with pytest.raises(ValueError, match="t_per_token"):
        diffusion_loss(logits, targets, mask, dense, None, "elbo", sup)


def test_loss_accepts_length_l_logits_and_ignores_unsupervised_masks() -> None:
    logits, targets, mask, dense, t, sup = _loss_case(2)
    short = diffusion_loss(logits[:, :20], targets, mask, dense, t, "masked_mean", sup)
    long = diffusion_loss(logits, targets, mask, dense, t, "masked_mean", sup)
    assert short.loss.item() == pytest.approx(long.loss.item())
    leaked = mask | ~sup  # masks on the prompt are not supervised targets
    assert diffusion_loss(logits, targets, leaked, dense, t, "masked_mean", sup).loss.item() == \
        pytest.approx(long.loss.item())


def test_empty_mask_gives_zero_loss_with_a_graph() -> None:
    logits, targets, mask, dense, t, sup = _loss_case(3)
    out = diffusion_loss(logits, targets, torch.zeros_like(mask), dense, t, "masked_mean", sup)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert logits.grad.abs().sum() == 0


def test_loss_shape_errors() -> None:
    logits, targets, mask, dense, t, sup = _loss_case()
    with pytest.raises(ValueError, match="logits"):
        diffusion_loss(logits[:, :7], targets, mask, dense, t)
    with pytest.raises(ValueError, match="dense"):
        diffusion_loss(logits, targets, mask, dense[:, :3], t)
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(logits, targets, mask, dense, t, "sum")


# ---------------------------------------------------------------- training batch

def _data(b: int = 2, length: int = 64) -> dict:
    g = torch.Generator().manual_seed(9)
    ids = _ids(b, length, 9)
    sup = torch.arange(length)[None].expand(b, length) >= 10
    ids[:, 50:] = EOS_ID  # EOS padding: supervised and trained
    return {"input_ids": ids, "supervised": sup, "dense": torch.rand(b, length, generator=g) < 0.3}


def test_training_batch_stacks_complementary_views() -> None:
    data = _data()
    tb = make_training_batch(data, MaskingConfig(block_size=16), MASK_ID, torch.Generator().manual_seed(0))
    # default: both views of a sample in one row sharing x_0, [x_t(M) ; x_t(S - M) ; x_0]; x_0's last block
    # is read by no noisy block (noisy block b reads clean blocks < b), so it is left out
    assert tb.targets.shape == (4, 64) and tb.model_inputs["input_ids"].shape == (2, 2 * 64 + 48)
    rows = make_training_batch(data, MaskingConfig(block_size=16), MASK_ID, torch.Generator().manual_seed(0),
                               packing="rows")
    assert rows.model_inputs["input_ids"].shape == (4, 64 + 48) and torch.equal(rows.mask, tb.mask)
    m1, m2 = tb.mask[:2], tb.mask[2:]
    assert not (m1 & m2).any() and torch.equal(m1 | m2, data["supervised"])
    assert torch.allclose(tb.t[2:], 1 - tb.t[:2])
    sigma0 = tb.sample.sigma[:, :1]  # block 0 of each sample
    assert torch.equal(tb.t[:2, :16], sigma0.expand(2, 16))
    assert torch.equal(tb.t[2:, :16], (1 - sigma0).expand(2, 16))
    stats = tb.rate_stats()
    sup0 = data["supervised"]
    assert stats["mask_rate"].item() == pytest.approx((m1.sum() / sup0.sum()).item())
    assert stats["target_rate"].item() == pytest.approx((tb.t[:2][sup0].mean()).item())
    assert 0.3 <= stats["target_rate"].item() <= 0.8
    single = make_training_batch(data, MaskingConfig(block_size=16, complementary=False), MASK_ID,
                                 torch.Generator().manual_seed(0))
    assert single.targets.shape == (2, 64) and torch.equal(single.mask, m1)


def test_rate_stats_track_targets_statistically() -> None:
    g = torch.Generator().manual_seed(1)
    b, length = 512, 64
    data = {"input_ids": torch.randint(2, VOCAB, (b, length), generator=g),
            "supervised": torch.arange(length)[None].expand(b, length) >= 8,
            "dense": torch.rand(b, length, generator=g) < 0.25}
    # sigma <= 0.5 keeps w p < 1 (no saturation) so the dense : other rate ratio is w exactly
    tb = make_training_batch(data, MaskingConfig(weight=2.0, sigma_max=0.5), MASK_ID, g)
    stats = tb.rate_stats()
    assert stats["mask_rate"].item() == pytest.approx(stats["target_rate"].item(), abs=0.01)
    assert (stats["mask_rate_dense"] / stats["mask_rate_other"]).item() == pytest.approx(2.0, rel=0.08)
    out = tb.loss(torch.zeros(int(tb.picked.sum()), VOCAB))
    assert out.realised_rate.item() == 0.5  # both views together mask every supervised token once


def test_training_step_runs_and_learns(model: TinyDLLMForMaskedDiffusion) -> None:
    """A few optimizer steps on one batch through the real model lower the loss (both layouts)."""
    for layout, weighting in (("block", "masked_mean"), ("full", "elbo")):
        torch.manual_seed(0)
        cfg = tiny_config(VOCAB, MASK_ID, EOS_ID, hidden_size=32, num_layers=1, num_heads=2,
                          max_positions=128)
        net = TinyDLLMForMaskedDiffusion(cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        data = _data(2, 32)
        first = last = None
        for step in range(25):
            tb = make_training_batch(data, MaskingConfig(block_size=8), MASK_ID,
                                     torch.Generator().manual_seed(step % 3), layout=layout)
            out = tb.loss(net(**tb.model_inputs).logits, weighting)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            first = out.loss.item() if first is None else first
            last = out.loss.item()
            assert out.n_masked.item() > 0
        assert last < 0.7 * first, (layout, first, last)


@pytest.mark.slow
@torch.no_grad()
def test_flex_backend_equals_sdpa_on_the_model(model: TinyDLLMForMaskedDiffusion) -> None:
    """The same logits through flex attention (compiled on CPU) and the dense SDPA mask."""
    from transformers import LlamaForCausalLM

    ids = _ids(2, 64, 6)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(6)) < 0.5
    ref = model(**build_model_inputs(ids, mask, MASK_ID, "block", 16, "sdpa")).logits
    cfg = tiny_config(VOCAB, MASK_ID, EOS_ID, hidden_size=64, num_layers=2, num_heads=2, max_positions=256)
    cfg._attn_implementation = "flex_attention"
    flex_model = TinyDLLMForMaskedDiffusion(cfg).eval()
    flex_model.load_state_dict(model.state_dict())
    inputs = build_model_inputs(ids, mask, MASK_ID, "block", 16, "flex")
    # TinyDLLMForMaskedDiffusion.forward calls attention_mask.dim(), which a BlockMask lacks: go to Llama's.
    out = LlamaForCausalLM.forward(flex_model, **inputs).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
