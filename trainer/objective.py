"""The masked-diffusion training objective: noisy inputs, attention layout, loss and its split metrics.

One training step in these terms (``make_training_batch`` then the model then ``diffusion_loss``):

1. ``trainer.masking.sample_masks`` draws the priority mask M (and its complement S \\ M).
2. With complementary masking on, the batch is doubled: rows [0, B) carry M at rates sigma, rows
   [B, 2B) carry S \\ M at rates 1 - sigma, as the paper (and LLaDA2 §5.1) put both views in one batch.
3. ``build_model_inputs`` replaces masked tokens by the mask token (x_t) and lays the input out:
   'block' = [x_t ; x_0] with positions 0..L-1 twice and the block-diffusion mask; 'full' = x_t alone
   with all-to-all attention.
4. ``diffusion_loss``: cross-entropy at masked positions of the noisy half; logits at position i
   predict token i (no shift).  Two weightings:

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

from trainer.attention import (
    bidirectional_mask,
    block_diffusion_block_mask,
    block_diffusion_mask,
    full_block_mask,
)
from trainer.masking import BLOCK_SIZE, MaskingConfig, MaskSample, per_token_rate, sample_masks

Layout = Literal["block", "full"]
AttnBackend = Literal["sdpa", "flex"]
Weighting = Literal["masked_mean", "elbo"]


def build_model_inputs(input_ids: Tensor, mask: Tensor, mask_token_id: int, layout: Layout = "block",
                       block_size: int = BLOCK_SIZE, attn_backend: AttnBackend = "sdpa") -> dict:
    """Model keyword arguments for one noisy batch.

    Returns ``input_ids`` [B, L] ('full') or [B, 2L] ('block'), ``position_ids`` of the same shape, and
    ``attention_mask``: a bool [1, 1, Q, K] tensor shared by the batch (True = may attend) for 'sdpa',
    or a flex ``BlockMask`` broadcast over batch and heads for 'flex'.
    """
    if input_ids.shape != mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and mask {tuple(mask.shape)} "
                         "must both be [B, L]")
    if layout not in ("block", "full"):
        raise ValueError(f"layout: {layout!r} is not 'block' or 'full'")
    if attn_backend not in ("sdpa", "flex"):
        raise ValueError(f"attn_backend: {attn_backend!r} is not 'sdpa' or 'flex'")
    b, length = input_ids.shape
    device = input_ids.device
    x_t = torch.where(mask.bool(), torch.full_like(input_ids, mask_token_id), input_ids)
    positions = torch.arange(length, device=device)
    if layout == "block":
        ids = torch.cat([x_t, input_ids], dim=1)  # [B, 2L]: noisy half, then clean half
        position_ids = positions.repeat(2)[None].expand(b, 2 * length)
    else:
        ids = x_t
        position_ids = positions[None].expand(b, length)
    attn = layout_attention_mask(layout, length, block_size, attn_backend, device)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids}


@lru_cache(maxsize=8)
def layout_attention_mask(layout: Layout, length: int, block_size: int, attn_backend: AttnBackend,
                          device: torch.device):
    """The attention mask of a layout, built once per (layout, L, block, backend, device), then shared.

    Building the dense [2L, 2L] mask costs ~17 M comparisons at L = 2048 (``create_block_mask`` more),
    which would otherwise be paid every step.  The result is shared: treat it as read-only.
    """
    if layout == "block":
        if attn_backend == "sdpa":
            return block_diffusion_mask(length, block_size, device)[None, None]  # [1, 1, 2L, 2L]
        return block_diffusion_block_mask(length, block_size, None, None, device)
    if attn_backend == "sdpa":
        return bidirectional_mask(None, length, device=device)  # [1, 1, L, L] expanded view
    return full_block_mask(length, device)


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
    mask = mask.bool()
    if supervised is None:
        supervised = mask
    mask = mask & supervised.bool()
    noisy = logits[:, :length]  # logits at position i predict token i (no shift)
    ce = F.cross_entropy(noisy[mask].float(), targets[mask], reduction="none")  # [n_masked]
    is_dense = dense.bool()[mask]
    if weighting == "elbo":
        if t_per_token is None:
            raise ValueError("weighting='elbo' needs t_per_token (the block rate of every token)")
        # A token is masked only if its block rate is > 0, so the clamp never bites on sampler output;
        # it replaces a data-dependent check that would force a device sync every step.
        t = t_per_token[mask].float().clamp_min(1e-6)
        weighted_sum = (ce / t).sum()
        normalizer = supervised.sum()
    else:
        weighted_sum = ce.sum()
        normalizer = mask.sum()
    normalizer = normalizer.clamp_min(1).to(weighted_sum.dtype)
    ce_d = ce.detach()
    n_dense = is_dense.sum()
    n_masked = mask.sum()
    ce_dense_sum = (ce_d * is_dense).sum()  # multiply, not index: no extra device sync
    return LossOutput(
        loss=weighted_sum / normalizer,
        ce_dense_sum=ce_dense_sum, ce_other_sum=ce_d.sum() - ce_dense_sum,
        n_dense=n_dense, n_other=n_masked - n_dense, n_masked=n_masked,
        n_supervised=supervised.bool().sum(), weighted_sum=weighted_sum, normalizer=normalizer,
    )


@dataclass(slots=True)
class TrainingBatch:
    """Everything a step needs: model kwargs plus what ``diffusion_loss`` compares against.

    Rows are doubled (2B) when complementary masking is on: [priority view ; complementary view].
    """

    model_inputs: dict
    """input_ids, attention_mask, position_ids for ``model(**model_inputs)``."""
    targets: Tensor
    """[R, L] clean token ids."""
    mask: Tensor
    """[R, L] bool, masked positions of each row."""
    dense: Tensor
    """[R, L] bool, info-dense flags (for the loss split)."""
    supervised: Tensor
    """[R, L] bool, maskable positions."""
    t: Tensor
    """[R, L] float, block rate of each token: sigma (first view) or 1 - sigma (complement)."""
    sample: MaskSample
    """The underlying draw (sigma, probabilities) of the first view, for logging."""

    def loss(self, logits: Tensor, weighting: Weighting = "masked_mean") -> LossOutput:
        """``diffusion_loss`` of this batch for the model's logits."""
        return diffusion_loss(logits, self.targets, self.mask, self.dense, self.t, weighting, self.supervised)

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
                        attn_backend: AttnBackend = "sdpa") -> TrainingBatch:
    """Mask a data batch (``input_ids``, ``supervised``, ``dense``: [B, L]) and build the model inputs.

    With ``cfg.complementary`` the two views are stacked along the batch dim (2B rows) so both are in
    the same micro-batch and share one forward/backward, as the paper prescribes.
    """
    for key in ("input_ids", "supervised", "dense"):
        if key not in batch:
            raise KeyError(f"make_training_batch: batch lacks {key!r} (has {sorted(batch)})")
    ids = batch["input_ids"]
    sup = batch["supervised"].bool()
    dense = batch["dense"].bool()
    sample = sample_masks(sup, dense, cfg, generator)
    t = per_token_rate(sample.sigma, ids.shape[1], cfg.block_size)
    mask = sample.mask
    if sample.complement is not None:
        ids, sup, dense = (torch.cat([x, x]) for x in (ids, sup, dense))
        mask = torch.cat([sample.mask, sample.complement])
        t = torch.cat([t, 1 - t])
    inputs = build_model_inputs(ids, mask, mask_token_id, layout, cfg.block_size, attn_backend)
    return TrainingBatch(model_inputs=inputs, targets=ids, mask=mask, dense=dense, supervised=sup, t=t,
                         sample=sample)
