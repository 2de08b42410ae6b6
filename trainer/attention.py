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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.masking import BLOCK_SIZE


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


# --- Block-sparse SDPA (CPU): each query tile gets only the keys it may see -------------------------

BLOCK_SPARSE_SDPA = "sdpa_block_sparse"
"""The ``attn_implementation`` name of :func:`block_sparse_sdpa` (registered with transformers below)."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    q: slice
    """Query columns of the chunk."""
    keys: tuple[slice, ...]
    """Key column ranges it reads (every other key is masked out for all its queries)."""
    bias: Tensor | None
    """The additive (0 / -inf, float32) mask over the chunk's queries and keys when some (query, key)
    inside the ranges is masked out; None: SDPA runs with no mask.  Built once per plan, not per call."""

    @property
    def need_mask(self) -> bool:
        return self.bias is not None


def tile_maps(mask: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """[B|1, H|1, Q, K] bool mask -> ([nq, nk] any, [nq, nk] all) over (rows, heads, tile x tile)."""
    q_len, k_len = mask.shape[-2:]
    nq, nk = -(-q_len // tile), -(-k_len // tile)
    m = mask.reshape(-1, q_len, k_len)
    m_any, m_all = (m[0], m[0]) if m.shape[0] == 1 else (m.any(0), m.all(0))
    pad = (0, nk * tile - k_len, 0, nq * tile - q_len)
    any_t = F.pad(m_any, pad).view(nq, tile, nk, tile).any(dim=(1, 3))  # [nq, nk]
    # Padding counts as allowed for the all-test (it is sliced away), as not visited for the any-test.
    all_t = F.pad(m_all, pad, value=True).view(nq, tile, nk, tile).all(dim=(1, 3))
    return any_t, all_t


def _coarsen(maps: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
    """Tile maps at tile t -> at tile n t (the same as ``tile_maps(mask, n * t)``, without the mask)."""
    any_t, all_t = maps
    nq, nk = any_t.shape
    pad = (0, -nk % n, 0, -nq % n)
    shape = (-(-nq // n), n, -(-nk // n), n)
    return (F.pad(any_t, pad).view(shape).any(dim=(1, 3)),
            F.pad(all_t, pad, value=True).view(shape).all(dim=(1, 3)))


def sparse_plan(mask: Tensor, tile: int, maps: tuple[Tensor, Tensor] | None = None) -> list[_Chunk]:
    """Split a [B|1, H|1, Q, K] bool mask into query chunks with the key ranges each may see.

    Query and key tiles of ``tile`` columns: a key tile is read by a query tile when any (row, head,
    query, key) in it is True; consecutive query tiles with the same key tiles form one chunk.  A chunk
    needs its sub-mask only when some element inside its tiles is False (in the block-diffusion layouts
    with ``tile`` = the block size, none does, so SDPA runs unmasked on its fused kernel).  ``maps``: the
    mask's :func:`tile_maps` at ``tile`` when already computed.
    """
    q_len, k_len = mask.shape[-2:]
    nq = -(-q_len // tile)
    any_t, all_t = maps if maps is not None else tile_maps(mask, tile)
    any_rows, all_rows = any_t.tolist(), all_t.tolist()
    chunks: list[_Chunk] = []
    start = 0
    for i in range(1, nq + 1):
        if i < nq and any_rows[i] == any_rows[start] and all_rows[i] == all_rows[start]:
            continue
        cols = [j for j, a in enumerate(any_rows[start]) if a]
        ranges: list[slice] = []
        for j in cols:
            lo, hi = j * tile, min((j + 1) * tile, k_len)
            if ranges and ranges[-1].stop == lo:
                ranges[-1] = slice(ranges[-1].start, hi)
            else:
                ranges.append(slice(lo, hi))
        q = slice(start * tile, min(i * tile, q_len))
        bias = None
        if ranges and any(not all_rows[start][j] for j in cols):
            index = torch.cat([torch.arange(r.start, r.stop, device=mask.device) for r in ranges])
            sub = mask[:, :, q][..., index]  # [B|1, H|1, q, k]
            bias = torch.zeros(sub.shape, device=sub.device).masked_fill_(~sub, float("-inf"))
        chunks.append(_Chunk(q, tuple(ranges), bias))
        start = i
    return chunks


# Relative cost of one chunk's kernel call and of an additive sub-mask, in computed scores: a rough CPU
# model (fixed work per call, the mask built and read per score) used to pick the tile.
CALL_COST = 16_384
MASKED_SCORE_COST = 0.5
TILE_CHOICES = (1, 2, 3, 4)
"""Tiles tried by :func:`choose_plan`, in units of the smallest tile (the block size)."""


def plan_cost(plan: list[_Chunk]) -> float:
    """Estimated cost of a plan: scores computed (masked ones dearer) plus a fixed cost per call."""
    total = 0.0
    for c in plan:
        if not c.keys:
            continue
        scores = (c.q.stop - c.q.start) * sum(r.stop - r.start for r in c.keys)
        total += scores * (1 + MASKED_SCORE_COST * c.need_mask) + CALL_COST
    return total


def choose_plan(mask: Tensor, base_tile: int) -> list[_Chunk]:
    """The cheapest ``sparse_plan`` (by :func:`plan_cost`) over tiles of 1-4 x ``base_tile``: small tiles
    skip the most scores but make many small calls; larger ones fewer calls over a masked superset."""
    base = tile_maps(mask, base_tile)  # one pass over the mask; the larger tiles from its tile maps
    plans = [sparse_plan(mask, base_tile * n, base if n == 1 else _coarsen(base, n)) for n in TILE_CHOICES]
    return min(plans, key=plan_cost)


_PLANS: dict[tuple, tuple[Tensor, list[_Chunk]]] = {}


def _cached_plan(mask: Tensor, tile: int, fixed: bool) -> list[_Chunk]:
    """The plan once per mask object (every layer of a forward passes the same one): ``sparse_plan`` at
    ``tile`` when ``fixed``, else :func:`choose_plan` from it.  The entry holds the mask, so its id cannot
    be reused by another tensor while cached."""
    key = (id(mask), tuple(mask.shape), tile, fixed)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    plan = sparse_plan(mask, tile) if fixed else choose_plan(mask, tile)
    if len(_PLANS) >= 4:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (mask, plan)
    return plan


def _plan_of(plan_id: int) -> list[_Chunk]:
    """The cached plan whose ``id`` the op was given (ops take tensors and scalars, not Python objects)."""
    for _, plan in _PLANS.values():
        if id(plan) == plan_id:
            return plan
    raise RuntimeError("block-sparse attention: its plan is no longer cached (more than 4 masks in use)")


# One op, not a Python autograd.Function, so that a dispatch mode (trainer.recompute's selective
# recomputation) sees the whole attention as one kernel: it keeps its output and never replays the
# per-chunk gathers, nor intercepts each of their ops.
@torch.library.custom_op("density_masking::block_sparse_attention", mutates_args=(), device_types="cpu")
def _attend(query: Tensor, key: Tensor, value: Tensor, plan_id: int, scale: float | None
            ) -> tuple[Tensor, Tensor]:
    """Attention over a ``sparse_plan``, the fused CPU flash kernel per chunk: [B, H, Q, D] x3 ->
    ([B, H, Q, D] output, [B, H, Q] float32 log-sum-exp)."""
    b, h, q_len, _ = query.shape
    # Stored [B, Q, H, D] like the fused kernel's own output, so the caller's transpose + reshape to
    # [B, Q, H*D] (the output projection's input, which it saves) is a view, not a second copy.
    out = query.new_zeros(b, q_len, h, value.shape[-1]).transpose(1, 2)  # [B, H, Q, D] view
    lse = query.new_zeros(query.shape[:-1], dtype=torch.float32)  # [B, H, Q]
    for c in _plan_of(plan_id):
        if not c.keys:
            continue  # no visible key: output 0, as flex gives
        k, v = _gather(key, c.keys), _gather(value, c.keys)
        o, l_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, c.q], k, v, 0.0, False, attn_mask=_sub_mask(c, query.dtype), scale=scale)
        out[:, :, c.q] = o
        lse[:, :, c.q] = l_
    return out, lse


def _attend_setup(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    query, key, value, plan_id, scale = inputs
    ctx.save_for_backward(query, key, value, *output)
    ctx.plan, ctx.scale = _plan_of(plan_id), scale


def _attend_backward(ctx, grad: Tensor, _grad_lse: Tensor | None):  # noqa: ANN001, ANN202
    """Each chunk's gradients added into one buffer per input, in place (autograd through per-chunk
    slices would materialise a full-size zero gradient for every slice)."""
    query, key, value, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for c in ctx.plan:
        if not c.keys:
            continue
        k, v = _gather(key, c.keys), _gather(value, c.keys)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad[:, :, c.q].contiguous(), query[:, :, c.q], k, v, out[:, :, c.q], lse[:, :, c.q], 0.0, False,
            attn_mask=_sub_mask(c, query.dtype), scale=ctx.scale)
        dq[:, :, c.q] = gq
        at = 0
        for r in c.keys:
            n = r.stop - r.start
            dk[:, :, r] += gk[:, :, at:at + n]
            dv[:, :, r] += gv[:, :, at:at + n]
            at += n
    return dq, dk, dv, None, None


_attend.register_autograd(_attend_backward, setup_context=_attend_setup)
block_sparse_attention = torch.ops.density_masking.block_sparse_attention
"""The op itself (``trainer.recompute`` keeps its outputs)."""


def _gather(x: Tensor, ranges: tuple[slice, ...]) -> Tensor:
    return x[:, :, ranges[0]] if len(ranges) == 1 else torch.cat([x[:, :, r] for r in ranges], dim=2)


def _sub_mask(c: _Chunk, dtype: torch.dtype) -> Tensor | None:
    """The chunk's additive mask in the query's dtype, or None when nothing in its tiles is masked out."""
    return None if c.bias is None else c.bias.to(dtype)


def block_sparse_sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: attention over only the key tiles each query tile may see.

    query [B, H, Q, D], key/value [B, Hkv, K, D], ``attention_mask`` a 4-D bool [B|1, 1, Q, K] mask
    (True = may attend) -> ([B, Q, H, D], None), equal to SDPA with the dense mask (tested) while the
    masked-out tiles (three quarters of the block-diffusion scores at L = 512) are never computed.
    The tile is ``module.config.block_sparse_tile`` when set, else the cheapest of 32, 64, 96 and 128
    (:func:`choose_plan`; 32 is the default block size).
    CPU only (the fused CPU flash kernel); anything else (another device, dropout, no mask, a float
    mask) goes to plain SDPA.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    kwargs.pop("is_causal", None)
    if (attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or query.device.type != "cpu" or dropout > 0):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                      is_causal=False, **kwargs)
    fixed = int(getattr(getattr(module, "config", None), "block_sparse_tile", 0) or 0)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    plan = _cached_plan(attention_mask, fixed or BLOCK_SIZE, bool(fixed))
    out, _ = _attend(query, key, value, id(plan), scaling)
    return out.transpose(1, 2), None  # [B, Q, H, D]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(BLOCK_SPARSE_SDPA, block_sparse_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BLOCK_SPARSE_SDPA, sdpa_mask)


_register()
