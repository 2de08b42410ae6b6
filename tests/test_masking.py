"""Tests of trainer.masking: the closed forms, sampling, complement and the w <-> 1/w symmetry."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.masking import (
    MaskingConfig,
    block_probabilities,
    mask_probabilities,
    num_blocks,
    per_token_rate,
    sample_masks,
    sample_sigma,
    solve_base_prob,
)

F64 = torch.float64
MODES = ("soft", "hard", "odds", "uniform")


def _pair(n: int, k: int, sigma: float, mode: str, w: float) -> tuple[float, float]:
    a, b = block_probabilities(torch.tensor(n), torch.tensor(k), torch.tensor(sigma, dtype=F64), mode, w)
    return float(a), float(b)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize(("field", "value"), [
    ("mode", "random"), ("weight", 0.0), ("weight", -1.0), ("weight", math.inf), ("sigma_min", -0.1),
    ("sigma_max", 1.5), ("block_size", 0), ("block_size", 2.5), ("per_block", 1), ("complementary", "yes"),
])
def test_config_rejects_bad_field_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"MaskingConfig.{field}"):
        MaskingConfig(**{field: value})


def test_config_rejects_inverted_sigma_band() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        MaskingConfig(sigma_min=0.8, sigma_max=0.3)


def test_config_defaults_are_the_paper() -> None:
    cfg = MaskingConfig()
    assert (cfg.mode, cfg.weight, cfg.sigma_min, cfg.sigma_max, cfg.block_size) == ("soft", 2.0, 0.3, 0.8, 32)
    assert cfg.per_block and cfg.complementary


# ---------------------------------------------------------------- closed forms (property + exhaustive)

weights = st.floats(min_value=0.02, max_value=50.0, allow_nan=False)
sigmas = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(n=st.integers(0, 128), frac=st.floats(0, 1), w=weights, sigma=sigmas, mode=st.sampled_from(MODES))
def test_expected_rate_is_exactly_sigma(n: int, frac: float, w: float, sigma: float, mode: str) -> None:
    k = round(frac * n)
    a, b = _pair(n, k, sigma, mode, w)
    assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
    assert k * a + (n - k) * b == pytest.approx(sigma * n, abs=1e-9 * max(n, 1))


@settings(max_examples=400, deadline=None)
@given(n=st.integers(2, 128), frac=st.floats(0, 1), w=weights, sigma=st.floats(0.01, 0.99))
def test_soft_ratio_is_w_unless_one_side_saturates(n: int, frac: float, w: float, sigma: float) -> None:
    k = min(max(round(frac * n), 1), n - 1)  # both kinds present
    a, b = _pair(n, k, sigma, "soft", w)
    if a < 1 - 1e-12 and b < 1 - 1e-12:
        assert a / b == pytest.approx(w, rel=1e-9)
    elif w > 1:
        assert a == 1.0 and b <= a  # dense saturated first; others take the rest
    else:
        assert b == 1.0 and a <= b


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 128), frac=st.floats(0, 1), w=weights, sigma=st.floats(0.01, 0.99))
def test_odds_mode_has_odds_ratio_w(n: int, frac: float, w: float, sigma: float) -> None:
    k = min(max(round(frac * n), 1), n - 1)
    a, b = _pair(n, k, sigma, "odds", w)
    assert 0 < a < 1 and 0 < b < 1
    assert (a / (1 - a)) / (b / (1 - b)) == pytest.approx(w, rel=1e-7)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 128), frac=st.floats(0, 1), sigma=sigmas)
def test_hard_masks_dense_first(n: int, frac: float, sigma: float) -> None:
    k = min(max(round(frac * n), 1), n - 1)
    a, b = _pair(n, k, sigma, "hard", 1.0)
    assert a >= b
    if b > 0:  # the others are touched only once every dense token is masked
        assert a == 1.0
    if sigma * n <= k:
        assert b == 0.0 and a == pytest.approx(sigma * n / k)


def test_soft_tends_to_hard_as_w_grows() -> None:
    for n, k, sigma in [(32, 5, 0.1), (32, 5, 0.5), (32, 20, 0.7), (10, 9, 0.95)]:
        soft = _pair(n, k, sigma, "soft", 1e7)
        hard = _pair(n, k, sigma, "hard", 1.0)
        assert soft == pytest.approx(hard, abs=1e-5)


def test_exhaustive_small_blocks_all_modes() -> None:
    """Every (n, k) up to 6 on a sigma and w grid: enumerate all 2^n masks, expected count = sigma n."""
    grid_w = (0.1, 0.5, 1.0, 2.0, 5.0)
    grid_s = (0.0, 0.2, 0.3, 0.5, 0.8, 1.0)
    for n in range(7):
        for k in range(n + 1):
            for mode, w, sigma in itertools.product(MODES, grid_w, grid_s):
                a, b = _pair(n, k, sigma, mode, w)
                probs = [a] * k + [b] * (n - k)
                expected = 0.0
                for bits in itertools.product((0, 1), repeat=n):
                    pr = math.prod(p if m else 1 - p for p, m in zip(probs, bits, strict=True))
                    expected += pr * sum(bits)
                assert expected == pytest.approx(sigma * n, abs=1e-9), (n, k, mode, w, sigma)


def test_degenerate_blocks() -> None:
    assert _pair(0, 0, 0.5, "soft", 2.0)[1] == 0.5  # nothing maskable: p = sigma, finite and harmless
    assert _pair(10, 0, 0.4, "soft", 2.0)[1] == pytest.approx(0.4)  # k = 0: others carry sigma
    assert _pair(10, 10, 0.4, "soft", 2.0)[0] == pytest.approx(0.4)  # k = n: dense carry sigma
    assert _pair(10, 10, 0.4, "soft", 0.25)[0] == pytest.approx(0.4)
    assert _pair(10, 0, 0.4, "hard", 1.0)[1] == pytest.approx(0.4)
    assert _pair(10, 10, 0.4, "hard", 1.0)[0] == pytest.approx(0.4)
    # saturation both ways: w > 1 saturates the dense side, w < 1 the other side
    assert _pair(10, 2, 0.9, "soft", 5.0) == pytest.approx((1.0, 0.875))
    assert _pair(10, 8, 0.9, "soft", 0.2) == pytest.approx((0.875, 1.0))


def test_solve_base_prob_is_broadcast_and_batched() -> None:
    n = torch.tensor([[32, 32, 0], [16, 8, 4]])
    k = torch.tensor([[4, 32, 0], [0, 8, 1]])
    sigma = torch.full((2, 3), 0.5, dtype=F64)
    p = solve_base_prob(n, k, sigma, 2.0)
    assert p.shape == (2, 3)
    dense_p, other_p = (2.0 * p).clamp(max=1), p.clamp(max=1)
    assert torch.allclose(k * dense_p + (n - k) * other_p, sigma * n)


# ---------------------------------------------------------------- the w <-> 1/w symmetry, exactly

def _pair_distribution(probs: list[float]) -> dict[frozenset, float]:
    """Exact law of the unordered pair {M, S \\ M} of independent Bernoulli(probs) masks over S."""
    out: dict[frozenset, float] = {}
    full = (1,) * len(probs)
    for bits in itertools.product((0, 1), repeat=len(probs)):
        pr = math.prod(p if m else 1 - p for p, m in zip(probs, bits, strict=True))
        comp = tuple(f - m for f, m in zip(full, bits, strict=True))
        key = frozenset({bits, comp})
        out[key] = out.get(key, 0.0) + pr
    return out


def _same_law(p: dict, q: dict) -> bool:
    return all(abs(p.get(key, 0.0) - q.get(key, 0.0)) < 1e-12 for key in set(p) | set(q))


@pytest.mark.parametrize("mode", ["odds", "uniform"])
def test_pair_law_under_w_equals_law_under_inverse_w_with_complemented_sigma(mode: str) -> None:
    """{M, S\\M} under (w, sigma) ~ {M, S\\M} under (1/w, 1 - sigma): exact for odds and uniform."""
    for n, k in [(3, 1), (4, 2), (5, 1), (5, 4)]:
        for w, sigma in itertools.product((0.1, 0.5, 2.0, 7.0), (0.2, 0.3, 0.55, 0.8)):
            a, b = _pair(n, k, sigma, mode, w)
            a2, b2 = _pair(n, k, 1 - sigma, mode, 1 / w)
            assert a2 == pytest.approx(1 - a, abs=1e-12) and b2 == pytest.approx(1 - b, abs=1e-12)
            law = _pair_distribution([a] * k + [b] * (n - k))
            law2 = _pair_distribution([a2] * k + [b2] * (n - k))
            assert _same_law(law, law2)


def test_pair_law_symmetry_of_the_hard_limits() -> None:
    """hard (w -> inf) at sigma pairs like hard-on-the-others (w -> 0) at 1 - sigma: relabel dense/other."""
    for n, k, sigma in [(4, 1, 0.3), (5, 2, 0.5), (6, 5, 0.8), (6, 3, 0.55)]:
        a, b = _pair(n, k, sigma, "hard", 1.0)
        b0, a0 = _pair(n, n - k, 1 - sigma, "hard", 1.0)  # the other set prioritised
        assert (a0, b0) == pytest.approx((1 - a, 1 - b), abs=1e-12)


def test_soft_symmetry_holds_for_relabelling_but_not_exactly_for_the_pair() -> None:
    """The paper's soft rule: soft(w) on D == soft(1/w) on S\\D exactly; the pair law is only close."""
    n, k, sigma, w = 4, 1, 0.5, 2.0
    a, b = _pair(n, k, sigma, "soft", w)
    b_rel, a_rel = _pair(n, n - k, sigma, "soft", 1 / w)  # roles of the two sets swapped
    assert (a_rel, b_rel) == pytest.approx((a, b), abs=1e-12)
    # (w, sigma) = (2, .5): dense .8, other .4; complement view: .2, .6 (ratio 1/3, not 1/2)
    assert (a, b) == pytest.approx((0.8, 0.4))
    a2, b2 = _pair(n, k, 1 - sigma, "soft", 1 / w)  # 2/7, 4/7: differs from (.2, .6)
    assert (a2, b2) == pytest.approx((2 / 7, 4 / 7))
    law = _pair_distribution([a] * k + [b] * (n - k))
    law2 = _pair_distribution([a2] * k + [b2] * (n - k))
    assert not _same_law(law, law2)
    # ...yet close: the per-token probabilities differ by less than 0.09 here
    assert max(abs(1 - a - a2), abs(1 - b - b2)) < 0.09


# ---------------------------------------------------------------- token layout and sampling

def _layout(b: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(0, length // 2, (b, 1), generator=g)
    supervised = torch.arange(length)[None] >= prompt_len
    dense = torch.rand(b, length, generator=g) < 0.3
    return supervised, dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", [64, 75])  # 75: a trailing partial block
def test_probabilities_per_block_sum_to_sigma_n(mode: str, length: int) -> None:
    cfg = MaskingConfig(mode=mode, block_size=16, weight=3.0)
    sup, dense = _layout(6, length, 1)
    sigma = sample_sigma(6, num_blocks(length, 16), cfg, torch.Generator().manual_seed(2)).double()
    probs = mask_probabilities(sup, dense, sigma, cfg)
    assert probs.shape == (6, length)
    assert (probs[~sup] == 0).all()  # prompt never maskable
    pad = num_blocks(length, 16) * 16 - length
    blocks = torch.nn.functional.pad(probs, (0, pad)).view(6, -1, 16).sum(-1)
    n = torch.nn.functional.pad(sup, (0, pad)).view(6, -1, 16).sum(-1)
    assert torch.allclose(blocks, sigma * n, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), length=st.integers(1, 80), bs=st.integers(1, 40), seed=st.integers(0, 2**16),
       mode=st.sampled_from(MODES), w=weights, per_block=st.booleans())
def test_random_layouts_keep_every_block_at_sigma(b: int, length: int, bs: int, seed: int, mode: str,
                                                  w: float, per_block: bool) -> None:
    cfg = MaskingConfig(mode=mode, weight=w, block_size=bs, per_block=per_block, sigma_min=0.0, sigma_max=1.0)
    g = torch.Generator().manual_seed(seed)
    sup = torch.rand(b, length, generator=g) < 0.7  # arbitrary holes, not only a prompt prefix
    dense = torch.rand(b, length, generator=g) < torch.rand(1, generator=g)
    sigma = sample_sigma(b, num_blocks(length, bs), cfg, g).double()
    probs = mask_probabilities(sup, dense, sigma, cfg)
    assert ((probs >= 0) & (probs <= 1)).all() and (probs[~sup] == 0).all()
    pad = num_blocks(length, bs) * bs - length
    per_block_mass = torch.nn.functional.pad(probs, (0, pad)).view(b, -1, bs).sum(-1)
    n = torch.nn.functional.pad(sup, (0, pad)).view(b, -1, bs).sum(-1)
    assert torch.allclose(per_block_mass, sigma * n, atol=1e-9)


def test_dense_outside_supervised_is_ignored() -> None:
    cfg = MaskingConfig(block_size=8)
    sup = torch.tensor([[False] * 4 + [True] * 4])
    sigma = torch.tensor([[0.5]], dtype=F64)
    dense_in_prompt = torch.tensor([[True] * 4 + [False] * 4])
    probs = mask_probabilities(sup, dense_in_prompt, sigma, cfg)
    assert torch.allclose(probs, torch.tensor([[0.0] * 4 + [0.5] * 4], dtype=F64))


def test_shape_errors_are_explicit() -> None:
    cfg = MaskingConfig(block_size=8)
    sup = torch.ones(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="sigma: expected shape"):
        mask_probabilities(sup, sup, torch.rand(2, 3), cfg)
    with pytest.raises(ValueError, match="must both be"):
        mask_probabilities(sup, sup[:, :8], torch.rand(2, 2), cfg)


def test_sample_sigma_range_and_per_sequence_option() -> None:
    g = torch.Generator().manual_seed(0)
    per_block = sample_sigma(64, 10, MaskingConfig(), g)
    assert per_block.shape == (64, 10)
    assert per_block.min() >= 0.3 and per_block.max() <= 0.8
    assert (per_block.std(dim=1) > 0).all()  # blocks of a row differ
    per_seq = sample_sigma(64, 10, MaskingConfig(per_block=False), g)
    assert per_seq.shape == (64, 10) and (per_seq == per_seq[:, :1]).all()
    assert per_seq[:, 0].std() > 0  # rows differ


@pytest.mark.parametrize("mode", MODES)
def test_mask_and_complement_partition_supervised(mode: str) -> None:
    sup, dense = _layout(8, 96, 3)
    out = sample_masks(sup, dense, MaskingConfig(mode=mode), torch.Generator().manual_seed(4))
    assert out.mask.dtype == torch.bool and out.complement is not None
    assert not (out.mask & out.complement).any()
    assert ((out.mask | out.complement) == sup).all()
    assert not out.mask[~sup].any() and not out.complement[~sup].any()
    assert out.sigma.shape == (8, 3) and out.probs.shape == (8, 96)
    no_comp = sample_masks(sup, dense, MaskingConfig(mode=mode, complementary=False),
                           torch.Generator().manual_seed(4))
    assert no_comp.complement is None and torch.equal(no_comp.mask, out.mask)


def test_sampling_is_deterministic_under_a_generator() -> None:
    sup, dense = _layout(4, 128, 5)
    cfg = MaskingConfig()
    one = sample_masks(sup, dense, cfg, torch.Generator().manual_seed(7))
    two = sample_masks(sup, dense, cfg, torch.Generator().manual_seed(7))
    three = sample_masks(sup, dense, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(one.mask, two.mask) and torch.equal(one.sigma, two.sigma)
    assert not torch.equal(one.mask, three.mask)


def _rates(mode: str, w: float, sigma: float, rows: int = 4000) -> tuple[float, float, float]:
    """Realised (overall rate, dense rate, other rate) at a fixed sigma over many sampled rows."""
    cfg = MaskingConfig(mode=mode, weight=w, sigma_min=sigma, sigma_max=sigma, block_size=32)
    g = torch.Generator().manual_seed(11)
    sup = torch.ones(rows, 64, dtype=torch.bool)
    sup[:, :8] = False  # a prompt inside the first block
    dense = torch.zeros(rows, 64, dtype=torch.bool)
    dense[:, 10:16] = True  # 6 dense of 24 supervised in block 0
    dense[:, 40:52] = True  # 12 of 32 in block 1
    out = sample_masks(sup, dense, cfg, g)
    m = out.mask
    assert not m[:, :8].any()
    return (m.sum() / sup.sum()).item(), m[dense].float().mean().item(), m[sup & ~dense].float().mean().item()


def test_statistical_rate_and_odds_ratio_soft() -> None:
    sigma, w = 0.3, 2.0
    rate, p_dense, p_other = _rates("soft", w, sigma)
    total = 4000 * 56
    assert abs(rate - sigma) < 4 * math.sqrt(sigma * (1 - sigma) / total)
    assert p_dense / p_other == pytest.approx(w, rel=0.03)
    # exact per-block values: block 0: n = 24, k = 6 -> p = 7.2 / 30; block 1: n = 32, k = 12 -> 9.6 / 44
    expected_dense = (6 * 2 * 7.2 / 30 + 12 * 2 * 9.6 / 44) / 18
    assert p_dense == pytest.approx(expected_dense, abs=0.01)


@pytest.mark.parametrize(("mode", "w"), [("uniform", 1.0), ("hard", 1.0), ("odds", 0.5), ("soft", 0.5)])
def test_statistical_rate_other_modes(mode: str, w: float) -> None:
    sigma = 0.6
    rate, p_dense, p_other = _rates(mode, w, sigma)
    assert abs(rate - sigma) < 4 * math.sqrt(sigma * (1 - sigma) / (4000 * 56))
    if mode == "uniform":
        assert p_dense == pytest.approx(p_other, abs=0.01)
    if mode == "hard":
        assert p_dense == 1.0  # sigma n exceeds k in both blocks: every dense token is masked
    if mode == "soft":
        assert p_dense / p_other == pytest.approx(w, rel=0.03)


def test_hard_never_masks_others_while_dense_absorb_sigma() -> None:
    cfg = MaskingConfig(mode="hard", sigma_min=0.3, sigma_max=0.3, block_size=32)
    sup = torch.ones(500, 32, dtype=torch.bool)
    dense = torch.zeros(500, 32, dtype=torch.bool)
    dense[:, :16] = True  # k = 16 > sigma n = 9.6
    out = sample_masks(sup, dense, cfg, torch.Generator().manual_seed(0))
    assert not out.mask[:, 16:].any()
    assert out.mask[:, :16].float().mean().item() == pytest.approx(0.6, abs=0.02)


def test_per_token_rate_broadcasts_blocks() -> None:
    sigma = torch.tensor([[0.1, 0.2, 0.3]])
    t = per_token_rate(sigma, 20, 8)
    assert t.shape == (1, 20)
    assert torch.equal(t[0, :8], torch.full((8,), 0.1)) and torch.equal(t[0, 16:], torch.full((4,), 0.3))
