"""Attention layouts of the diffusion objective: block diffusion over [x_t ; x_0], and full bidirectional.

Block diffusion (BD3-LMs, LLaDA2, dFactory) trains every block in one pass by feeding the noisy
sequence x_t (positions 0..L-1) followed by the clean sequence x_0 (the same positions 0..L-1 again),
length 2L.  With block index ``b(i) = (i mod L) // block_size`` at absolute positions:

* noisy query, noisy key: same block only (a block denoises itself bidirectionally);
* noisy query, clean key: clean blocks strictly before (the prefix it is conditioned on);
* clean query, clean key: clean blocks at or before (block-causal, as the KV cache at inference);
* clean query, noisy key: never (the clean half must not see the noise, or it would leak the answer
  of the noisy half through the clean half's hidden states).

Padding needs no key mask: sequences are padded with EOS to a block multiple and the padding is a
supervised, trained target (LLaDA/dFactory), so every position is a real token.

Two backends build the same pattern.  ``block_diffusion_mask`` materialises a [2L, 2L] bool tensor
(dFactory does this with an additive float mask): fine for the CPU/SDPA path and shared across the
batch as [1, 1, 2L, 2L] (16 MiB at L = 2048), but SDPA with a dense mask cannot use the flash kernel
and reads O(L^2) per head.  ``block_diffusion_block_mask`` returns a flex-attention ``BlockMask``
built from the same rule as a ``mask_mod``; it stores only block-sparsity metadata and lets the fused
kernel skip the ~3/4 of tiles that are fully masked.  Both are evaluated from ``block_diffusion_rule``
so they cannot drift apart; ``tests/test_attention.py`` checks them equal element by element.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_diffusion_rule(q_idx: Tensor, kv_idx: Tensor, seq_len: int, block_size: int) -> Tensor:
    """True where query ``q_idx`` may attend key ``kv_idx`` in the [x_t ; x_0] layout (elementwise)."""
    q_noisy = q_idx < seq_len
    kv_noisy = kv_idx < seq_len
    q_blk = torch.where(q_noisy, q_idx, q_idx - seq_len) // block_size
    kv_blk = torch.where(kv_noisy, kv_idx, kv_idx - seq_len) // block_size
    noisy_self = q_noisy & kv_noisy & (q_blk == kv_blk)
    noisy_prefix = q_noisy & ~kv_noisy & (kv_blk < q_blk)
    clean_causal = ~q_noisy & ~kv_noisy & (kv_blk <= q_blk)
    return noisy_self | noisy_prefix | clean_causal


def _check(seq_len: int, block_size: int) -> None:
    if seq_len < 1 or block_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and block_size ({block_size}) must be >= 1")


def block_diffusion_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """Dense [2L, 2L] bool mask (True = may attend) for the [x_t ; x_0] layout; add [None, None] for SDPA."""
    _check(seq_len, block_size)
    idx = torch.arange(2 * seq_len, device=device)
    return block_diffusion_rule(idx[:, None], idx[None, :], seq_len, block_size)


def block_diffusion_mask_mod(seq_len: int, block_size: int):
    """The flex-attention ``mask_mod(b, h, q_idx, kv_idx)`` of the block-diffusion layout."""

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex passes scalar tensors
        return block_diffusion_rule(q_idx, kv_idx, seq_len, block_size)

    return mask_mod


def block_diffusion_block_mask(seq_len: int, block_size: int, batch: int | None = None,
                               heads: int | None = None, device: torch.device | str | None = None, *,
                               tile: int = 128):
    """Flex-attention ``BlockMask`` for [x_t ; x_0] (length 2L).

    ``batch``/``heads`` None broadcasts over them (the pattern is the same for every sample and head,
    so None is the memory-lean choice).  ``tile`` is flex's KV/Q tile (128 on GPU); it need not be a
    multiple of ``block_size``: partially covered tiles are evaluated element by element.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    _check(seq_len, block_size)
    return create_block_mask(block_diffusion_mask_mod(seq_len, block_size), batch, heads, 2 * seq_len,
                             2 * seq_len, device=device, BLOCK_SIZE=tile)


def block_mask_to_dense(block_mask, seq_len: int | None = None) -> Tensor:
    """Element-level [B, H, Q, K] bool view of a ``BlockMask`` by evaluating its mask_mod on the full grid.

    ``BlockMask.to_dense()`` is tile-level; this evaluates the mask_mod at every (q, kv) of the tiles
    the BlockMask keeps, and is False in the tiles it skips, i.e. exactly what the kernel computes.
    """
    q_len, kv_len = block_mask.seq_lengths
    tiles = block_mask.to_dense().bool()  # [B, H, nQ, nK]; True = tile visited (full or partial)
    tq, tk = block_mask.BLOCK_SIZE
    visited = tiles.repeat_interleave(tq, dim=2).repeat_interleave(tk, dim=3)[..., :q_len, :kv_len]
    q = torch.arange(q_len, device=visited.device)[:, None]
    k = torch.arange(kv_len, device=visited.device)[None, :]
    b = torch.zeros((), dtype=torch.long, device=visited.device)
    elem = block_mask.mask_mod(b, b, q, k)
    return visited & elem


def bidirectional_mask(keep: Tensor | None, seq_len: int | None = None, *,
                       device: torch.device | str | None = None) -> Tensor:
    """Full (LLaDA-style MDM) attention: [B, 1, L, L] from a [B, L] keep-mask, or [1, 1, L, L] all True.

    Without ``keep`` (the EOS-padded training case) the result is an expanded view of one element, so
    it costs no memory; with ``keep`` padding keys are hidden from every query.
    """
    if keep is None:
        if seq_len is None:
            raise ValueError("bidirectional_mask: seq_len is required when keep is None")
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(1, 1, seq_len, seq_len)
    if keep.dim() != 2:
        raise ValueError(f"bidirectional_mask: keep must be [B, L], got {tuple(keep.shape)}")
    b, n = keep.shape
    return keep.bool()[:, None, None, :].expand(b, 1, n, n)


def full_block_mask(seq_len: int, device: torch.device | str | None = None, *, tile: int = 128):
    """Flex ``BlockMask`` for all-to-all attention over L tokens (the 'full' layout on the flex backend)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return q_idx >= 0

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device, BLOCK_SIZE=tile)
