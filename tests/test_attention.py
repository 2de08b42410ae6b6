"""Tests of trainer.attention: the block-diffusion pattern, its flex BlockMask twin, full attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.attention import (
    bidirectional_mask,
    block_diffusion_block_mask,
    block_diffusion_mask,
    block_mask_to_dense,
    full_block_mask,
)


def _reference(seq_len: int, block_size: int) -> torch.Tensor:
    """The rule written out position by position (slow, obviously right)."""
    out = torch.zeros(2 * seq_len, 2 * seq_len, dtype=torch.bool)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            q_noisy, k_noisy = q < seq_len, k < seq_len
            qb, kb = (q % seq_len) // block_size, (k % seq_len) // block_size
            if q_noisy and k_noisy:
                out[q, k] = qb == kb
            elif q_noisy:
                out[q, k] = kb < qb
            elif not k_noisy:
                out[q, k] = kb <= qb
    return out


def test_small_pattern_by_hand() -> None:
    # L = 4, blocks of 2: rows/cols are x_t[0..3] then x_0[0..3]
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_diffusion_mask(4, 2), expected)


@pytest.mark.parametrize(("seq_len", "block_size"), [(8, 1), (12, 4), (13, 4), (16, 16), (10, 32)])
def test_dense_mask_matches_reference(seq_len: int, block_size: int) -> None:
    assert torch.equal(block_diffusion_mask(seq_len, block_size), _reference(seq_len, block_size))


def test_structural_properties() -> None:
    length, bs = 64, 8
    m = block_diffusion_mask(length, bs)
    noisy_noisy, noisy_clean = m[:length, :length], m[:length, length:]
    clean_noisy, clean_clean = m[length:, :length], m[length:, length:]
    assert not clean_noisy.any()  # clean never sees noisy
    assert torch.equal(noisy_noisy, noisy_noisy.T)  # bidirectional within a block
    assert torch.equal(clean_clean | noisy_clean, clean_clean)  # noisy prefix is a subset of block-causal
    assert not (noisy_clean & torch.eye(length, dtype=torch.bool)).any()  # never its own clean copy
    assert m.diagonal().all()  # every query sees itself, so no row of softmax is empty


@pytest.mark.parametrize(("seq_len", "block_size", "tile"),
                         [(64, 8, 16), (64, 32, 16), (48, 6, 32), (40, 4, 128)])
def test_block_mask_elementwise_equals_dense(seq_len: int, block_size: int, tile: int) -> None:
    bm = block_diffusion_block_mask(seq_len, block_size, None, None, "cpu", tile=tile)
    dense = block_mask_to_dense(bm)
    assert dense.shape[-2:] == (2 * seq_len, 2 * seq_len)
    assert torch.equal(dense[0, 0], block_diffusion_mask(seq_len, block_size))


def test_block_mask_skips_masked_tiles() -> None:
    bm = block_diffusion_block_mask(512, 32, None, None, "cpu", tile=128)
    assert bm.sparsity() > 50.0  # about 3/4 of the 2L x 2L tiles are never computed


def test_bidirectional_mask_shapes() -> None:
    full = bidirectional_mask(None, 16)
    assert full.shape == (1, 1, 16, 16) and full.all()
    assert full.stride()[-1] == 0  # an expanded view: no O(L^2) memory
    keep = torch.tensor([[True, True, False], [True, True, True]])
    m = bidirectional_mask(keep)
    assert m.shape == (2, 1, 3, 3)
    assert not m[0, 0, :, 2].any() and m[1].all()
    with pytest.raises(ValueError, match="seq_len"):
        bidirectional_mask(None)
    fb = full_block_mask(40, "cpu", tile=16)
    assert block_mask_to_dense(fb)[0, 0].all()


@pytest.mark.slow
def test_compiled_flex_equals_sdpa_with_dense_mask() -> None:
    """Numerical equality of the two backends (flex compiles through inductor on CPU: a few seconds)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    length, bs = 96, 16  # 2L = 192: not a multiple of the 128 tile, so partial tiles are exercised
    q, k, v = (torch.randn(2, 2, 2 * length, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diffusion_mask(length, bs)[None, None])
    bm = block_diffusion_block_mask(length, bs, None, None, "cpu")
    out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
