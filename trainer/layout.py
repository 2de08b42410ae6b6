"""One description of a training row, from which its ids, positions and every attention mask derive.

A row holds ``views`` noisy segments and, for the block layout, the clean sequence x_0 after them:

* ``views=1``: [x_t ; x_0] (the reference form; with complementary masking each view is its own row);
* ``views=2``: [x_t(M) ; x_t(S minus M) ; x_0], both complementary views of one sample sharing one
  clean half.  The clean half never attends to noisy tokens, so its hidden states are the same in
  both views; computing it once instead of twice is exact (the loss and gradients are equal, see
  ``tests/test_step_cost.py``) and saves a quarter of the tokens.

Each noisy segment holds only the ``kept`` blocks: a noisy block is read by its own queries only and
feeds the loss only through its masked tokens, so a block with no maskable token in any row of the
micro-batch (the prompt every row shares) can be left out of the row entirely.

With ``pos`` the position of a column in its sequence (0..L-1 in every segment), ``blk = pos //
block_size`` and ``seg`` the segment (0..views-1 noisy, ``views`` clean), the attention rule is the
per-view block-diffusion rule of ``trainer.attention``:

* noisy query, noisy key: same segment and same block;
* noisy query, clean key: clean blocks strictly before;
* clean query, clean key: clean blocks at or before (block-causal, the KV cache of decoding);
* clean query, noisy key: never.

The clean half holds only the blocks some kept noisy block reads (``clean_blocks``: noisy block b
reads clean blocks < b, so with b_max the last kept block, clean blocks 0..b_max-1): a clean block no
noisy block reads feeds no loss.

When the rows of a micro-batch keep different blocks (prompts of different lengths), ``PackedRows``
lays each sample out with its own ``RowLayout`` and puts them end to end in one model row (varlen
packing, one sequence of the summed widths): the same attention rule within a sample, nothing across
samples.  The columns then are the method's floor for every sample instead of the widest one's.

``clean=False`` is the 'full' layout (x_t alone, all-to-all).  ``dense_mask`` (SDPA, and the
block-sparse chunked SDPA that reads it), ``block_mask`` (flex) and ``block_causal_mask`` (decoding with
a KV cache, ``trainer.generation``) all evaluate :meth:`RowLayout.rule`, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class RowLayout:
    """Segments, kept blocks and attention rule of one training row (see the module docstring)."""

    length: int
    """L: tokens per sample."""
    block_size: int
    views: int = 1
    """Noisy segments per row: 1, or 2 for complementary views sharing one clean half."""
    kept: tuple[int, ...] | None = None
    """Noisy blocks present in each noisy segment, ascending (None: all of them)."""
    clean: bool = True
    """Whether x_0 follows the noisy segments (block layout); False: 'full' layout, all-to-all."""
    clean_blocks: int | None = None
    """Clean blocks present, from block 0 (None: all); see :func:`clean_blocks_read`."""

    def __post_init__(self) -> None:
        if self.length < 1 or self.block_size < 1 or self.views < 1:
            raise ValueError(f"RowLayout: length ({self.length}), block_size ({self.block_size}) and views "
                             f"({self.views}) must be >= 1")
        if not self.clean and (self.views != 1 or self.kept is not None):
            raise ValueError("RowLayout: the 'full' layout (clean=False) has one view and keeps every block")
        n_blocks = -(-self.length // self.block_size)
        if self.clean_blocks is not None and not (self.clean and 0 <= self.clean_blocks <= n_blocks):
            raise ValueError(f"RowLayout: clean_blocks {self.clean_blocks} needs the block layout and must "
                             f"be in [0, {n_blocks}]")
        if self.kept is not None and (list(self.kept) != sorted(set(self.kept))
                                      or any(not 0 <= b < n_blocks for b in self.kept)):
            raise ValueError(f"RowLayout: kept blocks {self.kept} must be distinct, ascending, "
                             f"in [0, {n_blocks})")

    @property
    def noisy_columns(self) -> list[int]:
        """Token indices (0..L-1) of one noisy segment, in order."""
        if self.kept is None:
            return list(range(self.length))
        bs = self.block_size
        return [i for b in self.kept for i in range(b * bs, min((b + 1) * bs, self.length))]

    @property
    def noisy_width(self) -> int:
        return len(self.noisy_columns)

    @property
    def clean_width(self) -> int:
        """Columns of the clean half (0 for the 'full' layout)."""
        if not self.clean:
            return 0
        return self.length if self.clean_blocks is None else min(self.clean_blocks * self.block_size,
                                                                  self.length)

    @property
    def width(self) -> int:
        """Columns of the row: views x noisy width, plus the clean half's."""
        return self.views * self.noisy_width + self.clean_width

    def tables(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(seg [T], pos [T]) long: segment of each column (``views`` = clean) and its position 0..L-1."""
        return _tables(self, torch.device(device or "cpu"))

    def positions(self, device: torch.device | str | None = None) -> Tensor:
        """[T] position ids of the row."""
        return self.tables(device)[1]

    def rule(self, q: Tensor, k: Tensor, seg: Tensor, pos: Tensor) -> Tensor:
        """True where column ``q`` may attend column ``k`` (elementwise; ``seg``/``pos`` from ``tables``)."""
        if not self.clean:
            return (q >= 0) & (k >= 0)
        sq, sk = seg[q], seg[k]
        bq, bk = pos[q] // self.block_size, pos[k] // self.block_size
        qn, kn = sq < self.views, sk < self.views
        noisy_self = qn & kn & (sq == sk) & (bq == bk)
        noisy_prefix = qn & ~kn & (bk < bq)
        clean_causal = ~qn & ~kn & (bk <= bq)
        return noisy_self | noisy_prefix | clean_causal

    def dense_mask(self, device: torch.device | str | None = None) -> Tensor:
        """[T, T] bool, True = may attend (add [None, None] for SDPA); cached per layout and device."""
        return _dense_mask(self, torch.device(device or "cpu"))

    def block_mask(self, device: torch.device | str | None = None, *, tile: int = 128):
        """Flex-attention ``BlockMask`` of the row, broadcast over batch and heads."""
        from torch.nn.attention.flex_attention import create_block_mask

        dev = torch.device(device or "cpu")
        seg, pos = self.tables(dev)

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex passes scalar tensors
            return self.rule(q_idx, kv_idx, seg, pos)
        return create_block_mask(mask_mod, None, None, self.width, self.width, device=dev, BLOCK_SIZE=tile)

    def pack(self, noisy: list[Tensor], clean: Tensor | None) -> Tensor:
        """Per-view [B, L] noisy ids (and [B, L] x_0 for the block layout) -> the row's [B, T] ids."""
        if len(noisy) != self.views or (clean is None) == self.clean:
            raise ValueError(f"RowLayout.pack: {len(noisy)} noisy view(s) and clean={clean is not None} for "
                             f"a layout of {self.views} view(s), clean={self.clean}")
        if self.kept is None:
            parts = noisy
        else:  # long even when no block is kept (an empty list would give a float index)
            cols = torch.as_tensor(self.noisy_columns, dtype=torch.long, device=noisy[0].device)
            parts = [x[:, cols] for x in noisy]
        return torch.cat(parts + ([clean[:, :self.clean_width]] if self.clean else []), dim=1)


def kept_blocks_per_row(supervised: Tensor, block_size: int) -> list[tuple[int, ...]]:
    """For each row of ``supervised`` [R, L], the blocks holding a maskable token (the others are prompt:
    no token of theirs is ever masked, so they feed no loss).  One pass, one host transfer."""
    r, length = supervised.shape
    n_blocks = -(-length // block_size)
    padded = torch.nn.functional.pad(supervised.bool(), (0, n_blocks * block_size - length))
    has = padded.view(r, n_blocks, block_size).any(dim=2).tolist()  # [R][n_blocks]
    return [tuple(b for b, h in enumerate(row) if h) for row in has]


def kept_blocks(supervised: Tensor, block_size: int) -> tuple[int, ...]:
    """Blocks holding a maskable token in some row of ``supervised`` [R, L] (the others are prompt in
    every row)."""
    return tuple(sorted(set().union(*kept_blocks_per_row(supervised, block_size))))


def clean_blocks_read(kept: tuple[int, ...]) -> int:
    """Clean blocks that the kept noisy blocks read: 0..max(kept)-1 (noisy block b reads clean blocks < b;
    none for a one-block sample).  One for a row that keeps no noisy block (nothing to mask), so it still
    has a column to run."""
    return max(kept) if kept else 1


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Samples laid out by their own :class:`RowLayout` and put end to end in one model row [1, T].

    Attention: each sample's rule inside the sample, nothing across samples.  Position ids restart at
    every sample.  The rows share ``views``, ``block_size`` and ``clean`` (their ``kept`` differ).
    """

    rows: tuple[RowLayout, ...]

    def __post_init__(self) -> None:
        shapes = {(r.views, r.block_size, r.clean, r.length) for r in self.rows}
        if len(shapes) != 1:
            raise ValueError("PackedRows: one or more rows sharing views, block_size, clean and length")

    @property
    def views(self) -> int:
        return self.rows[0].views

    @property
    def clean(self) -> bool:
        return self.rows[0].clean

    @property
    def width(self) -> int:
        return sum(r.width for r in self.rows)

    def pack(self, noisy: list[Tensor], clean: Tensor | None) -> Tensor:
        """Per-view [B, L] noisy ids (and [B, L] x_0) -> [1, T]: sample i laid out by ``rows[i]``."""
        if noisy[0].shape[0] != len(self.rows):
            raise ValueError(f"PackedRows.pack: {noisy[0].shape[0]} samples for {len(self.rows)} rows")
        return torch.cat([r.pack([x[i:i + 1] for x in noisy], None if clean is None else clean[i:i + 1])
                          for i, r in enumerate(self.rows)], dim=1)

    def tables(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(seg [T], pos [T], sample [T]) long."""
        return _packed_tables(self, torch.device(device or "cpu"))

    def positions(self, device: torch.device | str | None = None) -> Tensor:
        return self.tables(device)[1]

    def rule(self, q: Tensor, k: Tensor, seg: Tensor, pos: Tensor, sample: Tensor) -> Tensor:
        """:meth:`RowLayout.rule` within a sample, False across samples."""
        return (sample[q] == sample[k]) & self.rows[0].rule(q, k, seg, pos)

    def dense_mask(self, device: torch.device | str | None = None) -> Tensor:
        """[T, T] bool, True = may attend: the rows' (cached) masks on the diagonal, what :meth:`rule`
        gives without evaluating it over all T x T pairs."""
        dev = torch.device(device or "cpu")
        out = torch.zeros(self.width, self.width, dtype=torch.bool, device=dev)
        at = 0
        for r in self.rows:
            out[at:at + r.width, at:at + r.width] = r.dense_mask(dev)
            at += r.width
        return out

    def block_mask(self, device: torch.device | str | None = None, *, tile: int = 128):
        """Flex-attention ``BlockMask`` of the packed row (batch 1)."""
        from torch.nn.attention.flex_attention import create_block_mask

        dev = torch.device(device or "cpu")
        seg, pos, sample = self.tables(dev)

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex passes scalar tensors
            return self.rule(q_idx, kv_idx, seg, pos, sample)
        return create_block_mask(mask_mod, None, None, self.width, self.width, device=dev, BLOCK_SIZE=tile)


def block_causal_mask(valid: Tensor, block_size: int) -> Tensor:
    """[b, T] validity -> [b, 1, T, T] bool: the clean-half rule of :class:`RowLayout` (query block >= key
    block) over a decoding canvas, padding keys hidden.  Padding queries attend to themselves only, so no
    softmax row is empty (SDPA would give NaN)."""
    t = valid.shape[1]
    layout = RowLayout(t, block_size, views=1)
    seg, pos = layout.tables(valid.device)
    clean = torch.arange(t, device=valid.device) + layout.noisy_width  # the clean half's columns
    allowed = layout.rule(clean[:, None], clean[None, :], seg, pos)[None] & valid[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return allowed[:, None]


@lru_cache(maxsize=64)
def _tables(layout: RowLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    noisy = torch.as_tensor(layout.noisy_columns, dtype=torch.long, device=device)
    n = noisy.numel()
    seg = [torch.full((n,), v, dtype=torch.long, device=device) for v in range(layout.views)]
    pos = [noisy] * layout.views
    if layout.clean:
        seg.append(torch.full((layout.clean_width,), layout.views, dtype=torch.long, device=device))
        pos.append(torch.arange(layout.clean_width, device=device))
    return torch.cat(seg), torch.cat(pos)


@lru_cache(maxsize=16)
def _dense_mask(layout: RowLayout, device: torch.device) -> Tensor:
    seg, pos = _tables(layout, device)
    idx = torch.arange(layout.width, device=device)
    return layout.rule(idx[:, None], idx[None, :], seg, pos)


@lru_cache(maxsize=16)
def _packed_tables(packed: PackedRows, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    segs, poss = zip(*(r.tables(device) for r in packed.rows))
    sample = torch.cat([torch.full((r.width,), i, dtype=torch.long, device=device)
                        for i, r in enumerate(packed.rows)])
    return torch.cat(segs), torch.cat(poss), sample
