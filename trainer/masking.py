"""Complementary priority masking: which supervised tokens the diffusion objective hides.

Pure tensor math, no distributed state, no Python loop over tokens: every function takes batched
tensors and returns tensors on the input's device, so the trainer can call it per micro-batch on the
GPU for well under 1 % of the step time (see ``benchmarks/bench_masking.py``).

The paper ("Mask Is What DLLM Needs", §2.2) in our terms, per sample and per block of ``block_size``
tokens at absolute positions:

* ``sigma ~ U[sigma_min, sigma_max]`` is the block's target mask rate (per block as the paper says,
  or one per sequence as dFactory's released ``sft_noise_transition`` does: ``per_block=False``).
* ``S`` = supervised (maskable) positions of the block: response and EOS, EOS padding included; the
  prompt is never masked.  ``n = |S|``, ``k`` = info-dense positions in ``S``.
* ``soft`` (the paper): info-dense tokens are masked with probability ``min(w p, 1)``, the others with
  ``min(p, 1)``; ``p`` is solved in closed form (:func:`solve_base_prob`) so that the block's expected
  masked count ``k min(w p, 1) + (n - k) min(p, 1)`` is exactly ``sigma n``.
* ``hard`` (the w -> inf ablation): info-dense first, ``min(sigma n / k, 1)``, the rest take what is
  left, ``max(0, (sigma n - k) / (n - k))``.
* ``odds`` (our addition): ``odds(P_dense) = w odds(P_other)``.  Unlike ``soft`` it never saturates and
  makes the paper's w <-> 1/w symmetry exact (see below); ``p`` solves a quadratic in closed form.
* ``uniform`` (the baseline, w = 1): every supervised token with probability ``sigma``.
* complementary: the second view masks ``S \\ M`` (never the prompt) at block rate ``1 - sigma`` and
  is stacked in the same micro-batch by ``trainer.objective.make_training_batch``.

The w <-> 1/w symmetry, exactly.  Because tokens are masked independently given the probability
vector ``pi`` over ``S``, the distribution of the unordered pair ``{M, S \\ M}`` is fixed by ``pi`` up to
``pi <-> 1 - pi``.  So the pair under ``(w, sigma)`` has the same distribution as under ``(1/w, 1 - sigma)``
iff ``pi(1/w, 1 - sigma) = 1 - pi(w, sigma)`` on ``S``.  This holds exactly for ``uniform``, for ``odds``
(complementing a Bernoulli turns an odds ratio ``w`` into ``1/w``) and for the ``hard`` limits (hard on
the dense set vs hard on the other set, i.e. w -> inf vs w -> 0).  It does NOT hold exactly for the
paper's ``soft`` rule, whose probability ratio ``w`` becomes ``(1 - w p)/(1 - p)``, not ``1/w``, after
complementing; there the paper's "isomorphic in expectation" is only approximate.  What holds for
every mode and every ``w``: each supervised token is masked in exactly one of the two views, so the
pair covers every token once, and ``soft(w)`` on the dense set equals ``soft(1/w)`` on the other set.
``tests/test_masking.py`` checks each of these statements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MaskMode = Literal["soft", "hard", "odds", "uniform"]
_MODES = ("soft", "hard", "odds", "uniform")
BLOCK_SIZE = 32
"""Tokens per diffusion block at absolute positions (the paper and LLaDA2: 32): the one definition that
training, generation and evaluation default to."""


@dataclass(kw_only=True, slots=True)
class MaskingConfig:
    """How the forward (noising) process picks masked tokens; defaults are the paper's settings."""

    mode: MaskMode = "soft"
    """'soft' (paper, probability ratio w), 'hard' (w -> inf ablation), 'odds' (odds ratio w, exact
    w <-> 1/w symmetry) or 'uniform' (baseline: every supervised token with probability sigma)."""
    weight: float = 2.0
    """Bias weight w: P(dense)/P(other) for 'soft', odds ratio for 'odds'.  w < 1 favours the non-dense
    tokens; ignored by 'hard' and 'uniform'.  The paper's best is w = 2 (and w = 0.5)."""
    sigma_min: float = 0.3
    """Lower end of the target mask rate band (paper: 0.3)."""
    sigma_max: float = 0.8
    """Upper end of the target mask rate band (paper: 0.8)."""
    block_size: int = BLOCK_SIZE
    """Tokens per diffusion block at absolute positions (paper/LLaDA2: 32)."""
    per_block: bool = True
    """True: one sigma per block (the paper); False: one sigma per sequence, shared by all its blocks
    (dFactory's released SFT code)."""
    complementary: bool = True
    """Add the complementary view S \\ M (rate 1 - sigma) to the same micro-batch (the paper's method)."""

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"MaskingConfig.mode: {self.mode!r} is not one of {_MODES}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"MaskingConfig.weight: must be a finite number > 0, got {self.weight!r}")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"MaskingConfig.{name}: must be in [0, 1], got {value!r}")
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"MaskingConfig.sigma_min: {self.sigma_min} exceeds sigma_max {self.sigma_max}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"MaskingConfig.block_size: must be an int >= 1, got {self.block_size!r}")
        for name in ("per_block", "complementary"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MaskingConfig.{name}: must be a bool, got {getattr(self, name)!r}")


@dataclass(slots=True)
class MaskSample:
    """One draw of the forward process for a batch."""

    mask: Tensor
    """[B, L] bool: positions replaced by the mask token in the first (priority) view."""
    sigma: Tensor
    """[B, nb] float: the target rate of each block of the first view (the complement's is 1 - sigma)."""
    complement: Tensor | None
    """[B, L] bool: supervised & ~mask (the second view), or None when complementary is off."""
    probs: Tensor
    """[B, L] float: per-token masking probability of the first view (0 outside supervised)."""


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering ``seq_len`` tokens; a trailing partial block counts as a block."""
    return -(-seq_len // block_size)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device | str | None) -> Tensor:
    """U[0, 1) on ``device``, drawn on the generator's own device (a CPU generator may serve GPU inputs)."""
    if generator is None or torch.device(generator.device) == torch.device(device or "cpu"):
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.rand(shape, generator=generator, device=generator.device).to(device, non_blocking=True)


def sample_sigma(batch: int, num_blocks: int, cfg: MaskingConfig, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Target rates [batch, num_blocks] ~ U[sigma_min, sigma_max]; one per sequence if not per_block."""
    cols = num_blocks if cfg.per_block else 1
    u = _uniform((batch, cols), generator, device)
    sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
    return sigma.expand(batch, num_blocks).contiguous()


def solve_base_prob(n: Tensor, k: Tensor, sigma: Tensor, w: float) -> Tensor:
    """Closed-form base probability p with ``k min(w p, 1) + (n - k) min(p, 1) = sigma n`` (soft rule).

    The left side is piecewise linear and non-decreasing in p with one kink: where the dense tokens
    saturate (w > 1, at p = 1/w) or where the others do (w < 1, at p = 1).  Try the unsaturated
    solution ``p0 = sigma n / (w k + n - k)`` first; if it overshoots the kink, the saturated side is
    pinned at 1 and the other side absorbs the rest of the mass:
      w > 1: dense all masked, ``p = (sigma n - k) / (n - k)``;
      w < 1: others all masked, ``p = (sigma n - (n - k)) / (w k)`` (>= 1, so min(p, 1) = 1).
    Degenerate blocks: n = 0 gives p = sigma (nothing to mask, any p works); k = 0 gives p = sigma;
    k = n gives p = sigma / w (dense prob sigma).  Shapes broadcast; dtype follows ``sigma``.
    """
    n = n.to(sigma.dtype)
    k = k.to(sigma.dtype)
    mass = sigma * n
    denom = w * k + (n - k)
    p0 = torch.where(denom > 0, mass / denom.clamp_min(1e-30), sigma)
    if w > 1:
        sat = (w * p0 > 1) & (n > k)
        p_sat = (mass - k) / (n - k).clamp_min(1e-30)
        return torch.where(sat, p_sat, p0)
    if w < 1:
        sat = (p0 > 1) & (k > 0)
        p_sat = (mass - (n - k)) / (w * k).clamp_min(1e-30)
        return torch.where(sat, p_sat, p0)
    return p0


def solve_odds_base_prob(n: Tensor, k: Tensor, sigma: Tensor, w: float) -> Tensor:
    """Closed-form q = P(other) for the odds rule: ``P(dense) = w q / (1 - q + w q)`` and the mass is sigma n.

    Multiplying ``k w q / (1 + c q) + (n - k) q = sigma n`` (c = w - 1) by ``1 + c q`` gives the
    quadratic ``A q^2 + B q - C = 0`` with ``A = (n - k) c``, ``B = n - k + w k - sigma n c``,
    ``C = sigma n``; its root in [0, 1] is ``2 C / (B + sqrt(B^2 + 4 A C))`` (the cancellation-free
    form, valid for A = 0 too).
    """
    n = n.to(sigma.dtype)
    k = k.to(sigma.dtype)
    c = w - 1.0
    a = (n - k) * c
    b = (n - k) + w * k - sigma * n * c
    cc = sigma * n
    disc = (b * b + 4 * a * cc).clamp_min(0)
    den = b + disc.sqrt()
    return torch.where(den > 0, 2 * cc / den.clamp_min(1e-30), sigma)


def block_probabilities(n: Tensor, k: Tensor, sigma: Tensor, mode: MaskMode,
                        w: float) -> tuple[Tensor, Tensor]:
    """Per-block (P(dense masked), P(other masked)) for ``mode``; shapes broadcast like the inputs."""
    if mode == "uniform":
        return sigma, sigma
    nf, kf = n.to(sigma.dtype), k.to(sigma.dtype)
    if mode == "soft":
        p = solve_base_prob(n, k, sigma, w)
        return (w * p).clamp(0, 1), p.clamp(0, 1)
    if mode == "odds":
        q = solve_odds_base_prob(n, k, sigma, w)
        return (w * q / (1 - q + w * q).clamp_min(1e-30)).clamp(0, 1), q.clamp(0, 1)
    if mode == "hard":
        mass = sigma * nf
        p_dense = torch.where(kf > 0, mass / kf.clamp_min(1e-30), sigma).clamp(0, 1)
        p_other = torch.where(nf > kf, (mass - kf) / (nf - kf).clamp_min(1e-30), sigma).clamp(0, 1)
        return p_dense, p_other
    raise ValueError(f"mode: {mode!r} is not one of {_MODES}")


def _blocked(x: Tensor, block_size: int) -> Tensor:
    """[B, L] -> [B, nb, block_size], zero/False-padding a trailing partial block."""
    b, length = x.shape
    pad = num_blocks(length, block_size) * block_size - length
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(b, -1, block_size)


def mask_probabilities(supervised: Tensor, dense: Tensor, sigma: Tensor, cfg: MaskingConfig) -> Tensor:
    """Per-token masking probability [B, L] (0 outside ``supervised``; dense outside it is ignored)."""
    if supervised.shape != dense.shape or supervised.dim() != 2:
        raise ValueError(f"supervised {tuple(supervised.shape)} and dense {tuple(dense.shape)} "
                         "must both be [B, L]")
    b, length = supervised.shape
    nb = num_blocks(length, cfg.block_size)
    if sigma.shape != (b, nb):
        raise ValueError(f"sigma: expected shape {(b, nb)} for L={length}, block_size={cfg.block_size}, "
                         f"got {tuple(sigma.shape)}")
    sup = supervised.bool()
    den = dense.bool() & sup
    sup_b, den_b = _blocked(sup, cfg.block_size), _blocked(den, cfg.block_size)  # [B, nb, bs]
    n = sup_b.sum(-1)  # [B, nb]
    k = den_b.sum(-1)
    p_dense, p_other = block_probabilities(n, k, sigma, cfg.mode, cfg.weight)  # [B, nb] each
    probs = torch.where(den_b, p_dense[..., None], p_other[..., None])
    probs = probs * sup_b
    return probs.view(b, -1)[:, :length]


def sample_masks(supervised: Tensor, dense: Tensor, cfg: MaskingConfig,
                 generator: torch.Generator | None = None) -> MaskSample:
    """Draw sigma, the priority mask M and (if complementary) its complement S \\ M for a batch.

    Determinism: the same ``generator`` state gives the same draw (sigma first, then one uniform per
    token).  A generator on the inputs' device is fastest; one on another device (e.g. a CPU generator
    for GPU inputs) works too, at the cost of a small copy (B L floats).
    """
    sup = supervised.bool()
    b, length = sup.shape
    sigma = sample_sigma(b, num_blocks(length, cfg.block_size), cfg, generator, sup.device)
    probs = mask_probabilities(sup, dense, sigma, cfg)
    u = _uniform((b, length), generator, sup.device)
    mask = (u < probs) & sup  # u in [0, 1): probability exactly probs; & sup guards prob-0 tokens
    complement = (sup & ~mask) if cfg.complementary else None
    return MaskSample(mask=mask, sigma=sigma, complement=complement, probs=probs)


def per_token_rate(sigma: Tensor, seq_len: int, block_size: int) -> Tensor:
    """Broadcast block rates [B, nb] to tokens [B, L] (the t of the ELBO weight 1/t)."""
    return sigma.repeat_interleave(block_size, dim=1)[:, :seq_len]
