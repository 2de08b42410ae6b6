"""The masked-diffusion training objective: noisy inputs, attention layout, loss and its split metrics.

One training step in these terms (``make_training_batch``, ``call_model(..., keep=tb.keep)``,
``tb.loss``):

1. ``trainer.masking.sample_masks`` draws the priority mask M (and its complement S \\ M).
2. With complementary masking on, both views are in one micro-batch, as the paper (and LLaDA2 §5.1)
   prescribe: M at rates sigma, S \\ M at rates 1 - sigma.  The per-view fields of ``TrainingBatch``
   are stacked [view 1 ; view 2] (2B rows).
3. Masked tokens are replaced by the mask token (x_t) and each row laid out by a
   ``trainer.layout.RowLayout`` (ids, positions and the mask all derive from it): 'block' =
   [x_t(M) ; x_t(S \\ M) ; x_0] per sample (``packing='shared'``, the default: the clean half is the
   same for both views) or [x_t ; x_0] per view (``packing='rows'``, ``build_model_inputs``, the
   reference), noisy blocks no row can mask left out (``skip_blocks``; per sample, all samples packed
   into one row, with the block-sparse backends); 'full' = x_t alone with
   all-to-all attention.
4. The loss: cross-entropy at the masked positions (the LM head runs on those only with
   ``masked_head``); logits at position i predict token i (no shift).  Two weightings:

   * ``masked_mean`` (default, dFactory's released code): sum of CE over masked tokens / number of
     masked tokens in the micro-batch.  Unweighted, so every masked token counts the same whatever
     its block's rate.
   * ``elbo`` (LLaDA2 report formula, ZHZisZZ/dllm ``BD3LMTrainer``): sum over masked tokens of
     CE / t, with t the block's rate (sigma, or 1 - sigma in the complementary view), divided by the
     number of supervised tokens.  This is the Monte-Carlo ELBO of the masked-diffusion model with a
     linear schedule.  With ``uniform`` masking (every supervised token masked with probability t)
     its expectation per supervised token equals the mean CE, so its scale matches ``masked_mean``
     on average while low-rate blocks (few masked tokens) weigh more per token.  With priority
     masking a token's probability is not t (dense ones are masked more often), and t stays the
     block's *schedule* rate on purpose: weighting by 1/P(token masked) instead would cancel the
     priority in expectation, which is the opposite of what the paper wants.

Both also return detached sums split by info-dense vs other masked tokens and the counts, so the loop
can log the loss on info-dense vs other tokens and the realised mask rate (``n_masked / n_supervised``).
``weighted_sum`` (with grad) and ``normalizer`` are exposed too, for a loop that wants to normalise
over several micro-batches or ranks instead of per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.layout import PackedRows, RowLayout, clean_blocks_read, kept_blocks, kept_blocks_per_row
from trainer.masking import BLOCK_SIZE, MaskingConfig, MaskSample, per_token_rate, sample_masks

Layout = Literal["block", "full"]
AttnBackend = Literal["sdpa", "sparse", "flex"]
Packing = Literal["shared", "rows"]
Weighting = Literal["masked_mean", "elbo"]
ATTN_BACKENDS = ("sdpa", "sparse", "flex")
PACKINGS = ("shared", "rows")


def build_model_inputs(input_ids: Tensor, mask: Tensor, mask_token_id: int, layout: Layout = "block",
                       block_size: int = BLOCK_SIZE, attn_backend: AttnBackend = "sdpa") -> dict:
    """Model keyword arguments for one noisy batch in the one-view-per-row form (the reference layout).

    Returns ``input_ids`` [B, L] ('full') or [B, 2L] ('block': [x_t ; x_0]), ``position_ids`` of the
    same shape, and ``attention_mask``: a bool [1, 1, Q, K] tensor shared by the batch (True = may
    attend) for 'sdpa'/'sparse', or a flex ``BlockMask`` broadcast over batch and heads for 'flex'.
    """
    if input_ids.shape != mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and mask {tuple(mask.shape)} "
                         "must both be [B, L]")
    _check_choices(layout, attn_backend, "rows")
    row = RowLayout(input_ids.shape[1], block_size, views=1, clean=layout == "block")
    x_t = torch.where(mask.bool(), torch.full_like(input_ids, mask_token_id), input_ids)
    return layout_inputs(row, row.pack([x_t], input_ids if row.clean else None), attn_backend)


def _check_choices(layout: str, attn_backend: str, packing: str) -> None:
    if layout not in ("block", "full"):
        raise ValueError(f"layout: {layout!r} is not 'block' or 'full'")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend: {attn_backend!r} is not one of {ATTN_BACKENDS}")
    if packing not in PACKINGS:
        raise ValueError(f"packing: {packing!r} is not one of {PACKINGS}")


def layout_inputs(row: RowLayout | PackedRows, ids: Tensor, attn_backend: AttnBackend) -> dict:
    """``input_ids`` [R, T] laid out by ``row`` -> the model's keyword arguments (positions and mask from
    ``row``)."""
    r, width = ids.shape
    if width != row.width:
        raise ValueError(f"layout_inputs: ids have {width} columns, the layout {row.width}")
    position_ids = row.positions(ids.device)[None].expand(r, width)
    if attn_backend != "flex":
        attn = row.dense_mask(ids.device)[None, None]  # [1, 1, T, T], shared (read-only)
    else:
        attn = _flex_mask(row, ids.device)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids}


@lru_cache(maxsize=8)
def _flex_mask(row: RowLayout, device: torch.device):
    """The broadcast flex ``BlockMask`` of a layout, built once per layout and device (read-only)."""
    return row.block_mask(device)


@dataclass(slots=True)
class LossOutput:
    """The loss to backpropagate and detached per-batch sums for logging."""

    loss: Tensor
    """Scalar with grad: weighted_sum / normalizer."""
    ce_dense_sum: Tensor
    """Sum of (unweighted) CE over masked info-dense tokens (detached)."""
    ce_other_sum: Tensor
    """Sum of (unweighted) CE over the other masked tokens (detached)."""
    n_dense: Tensor
    """Number of masked info-dense tokens."""
    n_other: Tensor
    """Number of other masked tokens."""
    n_masked: Tensor
    """n_dense + n_other."""
    n_supervised: Tensor
    """Number of supervised (maskable) tokens; realised mask rate = n_masked / n_supervised."""
    weighted_sum: Tensor
    """Sum of the per-token loss terms (with grad): CE, or CE / t for 'elbo'."""
    normalizer: Tensor
    """What weighted_sum is divided by: n_masked ('masked_mean') or n_supervised ('elbo'), at least 1."""

    @property
    def realised_rate(self) -> Tensor:
        """Fraction of supervised tokens masked over all rows (exactly 0.5 with both complementary views:
        every supervised token is masked in exactly one of them; see ``TrainingBatch.rate_stats``)."""
        return self.n_masked / self.n_supervised.clamp_min(1)


def diffusion_loss(logits: Tensor, targets: Tensor, mask: Tensor, dense: Tensor,
                   t_per_token: Tensor | None = None, weighting: Weighting = "masked_mean",
                   supervised: Tensor | None = None) -> LossOutput:
    """Cross-entropy on masked positions of the noisy half; logits [B, L or 2L, V], the rest [B, L].

    Only the masked rows of the logits are gathered (and upcast to float32), so the loss costs
    O(n_masked V) extra memory, not O(B L V).  With no masked token the loss is an exact 0 still
    connected to the graph, so every data-parallel rank runs the same backward.
    """
    if weighting not in ("masked_mean", "elbo"):
        raise ValueError(f"weighting: {weighting!r} is not 'masked_mean' or 'elbo'")
    b, length = targets.shape
    if logits.dim() != 3 or logits.shape[0] != b or logits.shape[1] not in (length, 2 * length):
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, L or 2L, V] "
                         f"for targets {tuple(targets.shape)}")
    others = {"mask": mask, "dense": dense, "t_per_token": t_per_token, "supervised": supervised}
    for name, x in others.items():
        if x is not None and x.shape != targets.shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} != targets {tuple(targets.shape)}")
    if weighting == "elbo" and t_per_token is None:
        raise ValueError("weighting='elbo' needs t_per_token (the block rate of every token)")
    mask = mask.bool()
    if supervised is None:
        supervised = mask
    mask = mask & supervised.bool()
    noisy = logits[:, :length]  # logits at position i predict token i (no shift)
    return masked_loss(noisy[mask], targets[mask], dense.bool()[mask],
                       None if t_per_token is None else t_per_token[mask], supervised.bool().sum(), weighting)


def masked_loss(logits: Tensor, targets: Tensor, dense: Tensor, t: Tensor | None, n_supervised: Tensor,
                weighting: Weighting = "masked_mean") -> LossOutput:
    """The loss from the masked tokens alone: logits [N, V], targets/dense/t [N] (one entry per masked
    token, in any order), ``n_supervised`` the number of supervised tokens (the 'elbo' normaliser)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
    if weighting == "elbo":
        if t is None:
            raise ValueError("weighting='elbo' needs t_per_token (the block rate of every token)")
        # A token is masked only if its block rate is > 0, so the clamp never bites on sampler output;
        # it replaces a data-dependent check that would force a device sync every step.
        weighted_sum = (ce / t.float().clamp_min(1e-6)).sum()
        normalizer = n_supervised
    elif weighting == "masked_mean":
        weighted_sum = ce.sum()
        normalizer = torch.as_tensor(ce.numel(), device=ce.device)
    else:
        raise ValueError(f"weighting: {weighting!r} is not 'masked_mean' or 'elbo'")
    normalizer = normalizer.clamp_min(1).to(weighted_sum.dtype)
    ce_d = ce.detach()
    n_dense = dense.sum()
    n_masked = torch.as_tensor(ce.numel(), device=ce.device)
    ce_dense_sum = (ce_d * dense).sum()  # multiply, not index: no extra device sync
    return LossOutput(
        loss=weighted_sum / normalizer,
        ce_dense_sum=ce_dense_sum, ce_other_sum=ce_d.sum() - ce_dense_sum,
        n_dense=n_dense, n_other=n_masked - n_dense, n_masked=n_masked,
        n_supervised=n_supervised, weighted_sum=weighted_sum, normalizer=normalizer,
    )


@dataclass(slots=True)
class TrainingBatch:
    """Everything a step needs: model kwargs, the positions whose logits the loss reads, and the targets.

    The per-view fields (``targets`` ... ``t``) are [R, L] with R = 2B when complementary masking is on
    ([priority view ; complementary view]), whatever the packing; ``row`` says how the views are laid
    out in the model's rows (one row per view, or both views of a sample in one row, shared x_0).
    """

    model_inputs: dict
    """input_ids, attention_mask, position_ids for ``model(**model_inputs)``."""
    row: RowLayout | PackedRows
    """The layout of every model row, or of the one row all samples are packed into."""
    keep: Tensor
    """``call_model(..., keep=)``: a [rows, T] bool of the masked columns (masked-only LM head) or of
    every noisy column; the logits come back [N, V], one row per True."""
    picked: Tensor
    """[rows, T] bool: the columns the loss reads (masked, supervised noisy tokens)."""
    targets: Tensor
    """[R, L] clean token ids."""
    mask: Tensor
    """[R, L] bool, masked positions of each view."""
    dense: Tensor
    """[R, L] bool, info-dense flags (for the loss split)."""
    supervised: Tensor
    """[R, L] bool, maskable positions."""
    t: Tensor
    """[R, L] float, block rate of each token: sigma (first view) or 1 - sigma (complement)."""
    sample: MaskSample
    """The underlying draw (sigma, probabilities) of the first view, for logging."""

    def columns(self, x: Tensor) -> Tensor:
        """A per-view [R, L] field -> [rows, T] in the model's column layout (clean columns: 0)."""
        rows = x.shape[0] // self.row.views
        views = list(x.split(rows))
        return self.row.pack(views, torch.zeros_like(views[0]) if self.row.clean else None)

    def loss(self, logits: Tensor, weighting: Weighting = "masked_mean") -> LossOutput:
        """The diffusion loss for the logits ``call_model`` returned with ``keep``: [N, V] at the picked
        columns (bool keep) or [rows, n, V] for the first n columns (slice keep)."""
        if logits.dim() == 2:  # one row per True of the bool keep, row-major
            flat = logits if self.keep is self.picked else logits[self.picked[self.keep]]
        else:
            flat = logits[self.picked[:, :logits.shape[1]]]
        if flat.shape[0] != int(self.picked.sum()):
            raise ValueError(f"TrainingBatch.loss: {flat.shape[0]} logit rows for {int(self.picked.sum())} "
                             f"masked tokens; call the model with keep=batch.keep")
        targets, dense, t = (self.columns(x)[self.picked] for x in (self.targets, self.dense, self.t))
        return masked_loss(flat, targets, dense, t, self.supervised.sum(), weighting)

    def priority_view_counts(self) -> dict[str, Tensor]:
        """Token counts of the priority view (rows [0, B)) as 0-d tensors (no sync), to be summed over
        micro-batches and ranks before dividing: ``masked_dense / dense`` and ``masked_other / other``
        are the realised mask rates on info-dense and on the other supervised tokens (with complementary
        masking the overall rate is exactly 0.5, so these are what shows the priority at work)."""
        b = self.sample.mask.shape[0]
        sup, mask = self.supervised[:b], self.mask[:b]
        dense = self.dense[:b] & sup
        other = sup & ~dense
        return {"masked_dense": (mask & dense).sum(), "dense": dense.sum(),
                "masked_other": (mask & other).sum(), "other": other.sum()}

    def rate_stats(self) -> dict[str, Tensor]:
        """Realised vs target mask rates of the priority view (rows [0, B)), as 0-d tensors (no sync).

        ``mask_rate`` should track ``target_rate`` (the supervised-token-weighted mean sigma);
        ``mask_rate_dense`` / ``mask_rate_other`` show the tilt towards info-dense tokens (about w : 1
        for 'soft' while unsaturated).  The complementary view's rates are 1 minus these.
        """
        b = self.sample.mask.shape[0]
        sup, mask, t = self.supervised[:b], self.mask[:b], self.t[:b]
        dense = self.dense[:b] & sup
        other = sup & ~dense
        n_sup = sup.sum().clamp_min(1)
        return {
            "mask_rate": mask.sum() / n_sup,
            "target_rate": (t * sup).sum() / n_sup,
            "mask_rate_dense": (mask & dense).sum() / dense.sum().clamp_min(1),
            "mask_rate_other": (mask & other).sum() / other.sum().clamp_min(1),
            "dense_fraction": dense.sum() / n_sup,
        }


def make_training_batch(batch: dict, cfg: MaskingConfig, mask_token_id: int,
                        generator: torch.Generator | None = None, *, layout: Layout = "block",
                        attn_backend: AttnBackend = "sdpa", packing: Packing = "shared",
                        skip_blocks: bool = True, masked_head: bool = True) -> TrainingBatch:
    """Mask a data batch (``input_ids``, ``supervised``, ``dense``: [B, L]) and build the model inputs.

    With ``cfg.complementary`` both views are in the same micro-batch and share one forward/backward,
    as the paper prescribes: with ``packing='shared'`` (block layout) one row per sample,
    [x_t(M) ; x_t(S minus M) ; x_0], else one row per view (2B rows).  ``skip_blocks``: leave out the
    noisy blocks a sample cannot mask and the clean blocks no kept block reads; with the block-sparse
    backends ('sparse', 'flex') each sample keeps its own blocks and all rows are packed end to end
    into one ([1, T], ``trainer.layout.PackedRows``), with dense 'sdpa' the blocks some row keeps.
    ``masked_head``: ``keep`` asks for the masked columns' logits only; else for every noisy column.
    """
    for key in ("input_ids", "supervised", "dense"):
        if key not in batch:
            raise KeyError(f"make_training_batch: batch lacks {key!r} (has {sorted(batch)})")
    _check_choices(layout, attn_backend, packing)
    ids = batch["input_ids"]
    sup = batch["supervised"].bool()
    dense = batch["dense"].bool()
    length = ids.shape[1]
    sample = sample_masks(sup, dense, cfg, generator)
    t = per_token_rate(sample.sigma, length, cfg.block_size)
    masks = [sample.mask] if sample.complement is None else [sample.mask, sample.complement]
    n_views = len(masks)
    block = layout == "block"
    shared = block and n_views == 2 and packing == "shared"
    views = 2 if shared else 1
    row: RowLayout | PackedRows
    if block and skip_blocks and attn_backend != "sdpa":  # each sample its own kept blocks, end to end
        per_sample = kept_blocks_per_row(sup, cfg.block_size)
        layouts = [RowLayout(length, cfg.block_size, views=views, kept=k, clean_blocks=clean_blocks_read(k))
                   for k in per_sample]
        row = PackedRows(tuple(layouts * (n_views // views)))
    elif block and skip_blocks:  # dense SDPA would compute every score of a packed row: one layout for the
        kept = kept_blocks(sup, cfg.block_size)  # batch, the blocks some row keeps
        row = RowLayout(length, cfg.block_size, views=views, kept=kept, clean_blocks=clean_blocks_read(kept))
    else:
        row = RowLayout(length, cfg.block_size, views=views, clean=block)
    x_ts = [torch.where(m, torch.full_like(ids, mask_token_id), ids) for m in masks]
    if shared:
        row_ids = row.pack(x_ts, ids)
    else:
        row_ids = row.pack([torch.cat(x_ts)], torch.cat([ids] * n_views) if block else None)
    mask = torch.cat(masks)
    if n_views == 2:
        sup2, dense2 = torch.cat([sup, sup]), torch.cat([dense, dense])
        t = torch.cat([t, 1 - t])
    else:
        sup2, dense2 = sup, dense
    tb = TrainingBatch(model_inputs={}, row=row, keep=slice(0), picked=mask,
                       targets=torch.cat([ids] * n_views), mask=mask, dense=dense2, supervised=sup2, t=t,
                       sample=sample)
    tb.picked = tb.columns(mask & sup2)
    tb.keep = tb.picked if masked_head else tb.columns(torch.ones_like(mask))  # masked / every noisy column
    tb.model_inputs = layout_inputs(row, row_ids, attn_backend)
    return tb
