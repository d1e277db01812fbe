"""The masking maths (hf_tdrop.masking): exact selection counts, ties, sampling, layouts."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hf_tdrop import masking


def test_fraction_count_is_floor_and_robust_to_float_rounding():
    assert masking.fraction_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert masking.fraction_count(0.75, 10) == 7
    assert masking.fraction_count(0.0, 10) == 0
    assert masking.fraction_count(1.0, 10) == 10
    assert masking.fraction_count(0.5, 1) == 0


@pytest.mark.parametrize("fraction,n,count", [
    (0.0, 0, 0), (0.0, 7, 0), (1.0, 0, 0), (1.0, 7, 7), (1.0, 1000, 1000), (0.5, 7, 3), (0.5, 1, 0),
    (0.29, 100, 29), (0.7, 10, 7), (0.1, 30, 3), (0.3, 10, 3), (0.57, 100, 57), (0.9, 10, 9),
    (1 - 1e-12, 1000, 999), (0.999999999999, 1000, 999), (0.9999999999, 10**10, 10**10 - 1),
    (1e-12, 10**12, 1), (1e-12, 10**12 - 1, 0), (5e-324, 10**6, 0), (0.1, 10**17, 10**16),
    (1, 5, 5), (0, 5, 0),
])
def test_fraction_count_is_exact_floor_of_the_fraction_as_written(fraction, n, count):
    assert masking.fraction_count(fraction, n) == count
    assert type(masking.fraction_count(fraction, n)) is int


@settings(max_examples=300, deadline=None)
@given(st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 10**7))
def test_fraction_count_matches_decimal_rational_floor(fraction, n):
    from fractions import Fraction

    expected = math.floor(Fraction(repr(fraction)) * n)
    assert masking.fraction_count(fraction, n) == expected
    assert 0 <= expected <= n


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**4), st.integers(1, 10**4))
def test_fraction_count_of_a_decimal_p_over_q_is_floor_p_n_over_q(numerator, n):
    """A fraction typed as a short decimal (p / 10**4) counts exactly floor(p * n / 10**4)."""
    fraction = numerator / 10**4
    assert masking.fraction_count(fraction, n) == numerator * n // 10**4


def test_lowest_k_selects_exactly_k_smallest_per_row():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0], [0.1, 0.5, 0.3, 0.2, 0.4]])
    mask = masking.lowest_k(scores, 2)
    assert mask.tolist() == [[False, True, False, True, False], [True, False, False, True, False]]


def test_lowest_k_breaks_ties_by_lowest_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]])
    mask = masking.lowest_k(scores, 2)
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_lowest_k_ranks_low_precision_weights_exactly():
    w = torch.tensor([[1.0, 1.0009765625, 1.001953125, 3.0]], dtype=torch.bfloat16)  # ties in bf16
    mask = masking.lowest_k(w, 2)
    assert int(mask.sum()) == 2


def test_weight_and_unit_targeting_pick_smallest_magnitudes():
    w = torch.tensor([[0.1, -3.0, 0.2, -0.05], [4.0, 4.0, 4.0, 4.0], [0.01, 0.01, 0.01, 0.01]])
    targeted = masking.targeted_weights(w, 0.5)
    assert targeted[0].tolist() == [True, False, False, True]
    assert targeted.sum(dim=1).tolist() == [2, 2, 2]
    units = masking.targeted_units(w, 0.34)  # floor(0.34 * 3) = 1
    assert units.tolist() == [False, False, True]


def test_sample_drop_extremes_and_rate():
    targeted = torch.zeros(200, 500, dtype=torch.bool)
    targeted[:, :300] = True
    assert not masking.sample_drop(targeted, 0.0).any()
    assert torch.equal(masking.sample_drop(targeted, 1.0), targeted)
    drop = masking.sample_drop(targeted, 0.3)
    assert not (drop & ~targeted).any()
    rate = drop.sum().item() / targeted.sum().item()
    # 60,000 Bernoulli(0.3) draws: standard error 0.0019; 6 sigma bound never flakes
    assert abs(rate - 0.3) < 6 * math.sqrt(0.3 * 0.7 / 60000)


def test_sample_drop_is_reproducible_under_manual_seed():
    targeted = torch.ones(32, 64, dtype=torch.bool)
    torch.manual_seed(123)
    a = masking.sample_drop(targeted, 0.5)
    torch.manual_seed(123)
    b = masking.sample_drop(targeted, 0.5)
    assert torch.equal(a, b)


def test_unit_matrix_layouts_round_trip():
    conv = torch.randn(6, 3, 2, 2)
    w2d = masking.unit_matrix(conv, masking.LAYOUT_OUT_IN)
    assert w2d.shape == (6, 12)
    assert torch.equal(w2d[4], conv[4].flatten())
    gpt2 = torch.randn(5, 7)  # Conv1D: [in, out]
    w2d = masking.unit_matrix(gpt2, masking.LAYOUT_IN_OUT)
    assert w2d.shape == (7, 5) and torch.equal(w2d[2], gpt2[:, 2])
    mask2d = masking.targeted_weights(w2d, 0.4)
    back = masking.to_weight_layout(mask2d, gpt2, masking.LAYOUT_IN_OUT)
    assert back.shape == gpt2.shape and torch.equal(back[:, 2], mask2d[2])
    with pytest.raises(ValueError, match="layout"):
        masking.unit_matrix(gpt2, "sideways")


def test_random_pruning_masks_have_exact_counts():
    w = torch.randn(8, 20)
    g = torch.Generator().manual_seed(0)
    assert masking.random_weight_prune_mask(w, 0.5, g).sum(dim=1).tolist() == [10] * 8
    assert int(masking.random_unit_prune_mask(w, 0.5, g).sum()) == 4


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_out=st.integers(1, 9),
    fan_in=st.integers(1, 17),
    gamma=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    dtype=st.sampled_from(DTYPES),
    n_distinct=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@example(n_out=1, fan_in=1, gamma=0.9999999999999999, alpha=0.0, dtype=torch.float32, n_distinct=1, seed=0)
def test_mask_properties(n_out, fan_in, gamma, alpha, dtype, n_distinct, seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct magnitudes -> many ties
    w = (torch.randint(-n_distinct, n_distinct + 1, (n_out, fan_in), generator=g).to(dtype) / 3)
    targeted = masking.targeted_weights(w, gamma)
    k = math.floor(Fraction(repr(gamma)) * fan_in)  # the documented exact count (fraction as written)
    assert targeted.sum(dim=1).tolist() == [k] * n_out
    # every targeted entry is no larger in magnitude than every untargeted one of its row
    mags = w.abs().float()
    for o in range(n_out):
        if 0 < k < fan_in:
            assert mags[o][targeted[o]].max() <= mags[o][~targeted[o]].min()
    drop = masking.sample_drop(targeted, alpha, generator=g)
    assert not (drop & ~targeted).any()
    if alpha == 0.0:
        assert not drop.any()
    if alpha == 1.0:
        assert torch.equal(drop, targeted)
    units = masking.targeted_units(w, gamma)
    assert int(units.sum()) == math.floor(Fraction(repr(gamma)) * n_out)
    masked = w.masked_fill(drop, 0)
    assert not torch.isnan(masked).any()


# --- bracketed selection: the optimised exact selection used while training ---


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_rows=st.integers(1, 12),
    n=st.integers(1, 40),
    k_fraction=st.floats(0.0, 1.0),
    n_distinct=st.sampled_from([2, 5, 1000]),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    bounds=st.lists(st.floats(-1.0, 3.0), min_size=2, max_size=2),
    margin=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_bracketed_selection_is_exact_for_any_bracket(n_rows, n, k_fraction, n_distinct, transposed, dtype, bounds, margin, seed):
    """Whatever the bracket (too low, too high, inverted, exact), the mask is lowest_k's, bit for bit,
    and so is the next call's with the bracket it returned."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(0, n_distinct, (n, n_rows) if transposed else (n_rows, n), generator=g) / n_distinct).to(dtype)
    if transposed:
        scores = scores.t()  # a [n_rows, n] view with strides (1, n_rows), like GPT-2's Conv1D
    k = math.floor(k_fraction * n)
    ranking_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bracket = masking.KthBracket(
        torch.full((n_rows,), bounds[0], dtype=ranking_dtype), torch.full((n_rows,), bounds[1], dtype=ranking_dtype), margin
    )
    expected = masking.lowest_k(scores, k)
    mask, bracket = masking.lowest_k_bracketed(scores, k, bracket)
    assert torch.equal(mask, expected)
    assert torch.equal(masking.lowest_k_bracketed(scores, k, bracket)[0], expected)
    if bracket is not None:  # 0 < k < n: the returned bounds enclose each row's k-th smallest
        kth = masking.kth_smallest(scores, k)[:, 0]
        assert (bracket.lower <= kth).all() and (kth <= bracket.upper).all()


def test_bracketed_selection_tracks_drifting_weights_exactly_and_cheaply():
    """Weights that move every step (and a k that ramps): every mask equals lowest_k's, the bracket
    keeps almost every row on the cheap path, and the margin stays bounded."""
    torch.manual_seed(0)
    w = torch.randn(256, 192) * 0.02
    bracket = None
    failed_rows = []
    for step in range(40):
        w += 1e-3 * torch.randn(w.shape).sign()  # Adam-like steps: every weight moves by lr
        k = 100 + step // 4  # a slow γ ramp
        scores = w.abs()
        if bracket is not None:
            kth = masking.kth_smallest(scores, k)[:, 0]
            failed_rows.append(int(((kth < bracket.lower) | (kth > bracket.upper)).sum()))
        mask, bracket = masking.lowest_k_bracketed(scores, k, bracket)
        assert torch.equal(mask, masking.lowest_k(scores, k))
        assert 1 <= bracket.margin <= 192 // 16
    assert sum(failed_rows[5:]) / (len(failed_rows[5:]) * 256) < 0.05


def test_bracketed_selection_edge_cases_and_errors():
    s = torch.rand(4, 10)
    for k in (0, 10, 12):
        mask, bracket = masking.lowest_k_bracketed(s, k)
        assert bracket is None and torch.equal(mask, masking.lowest_k(s, k))
    stale = masking.KthBracket(torch.zeros(3), torch.ones(3), 2)  # another layer's shape: ignored
    assert torch.equal(masking.lowest_k_bracketed(s, 4, stale)[0], masking.lowest_k(s, 4))
    with pytest.raises(ValueError, match="`scores` must be 2-D"):
        masking.lowest_k_bracketed(torch.rand(10), 3)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 10\]"):
        masking.kth_smallest(s, 0)
    w = torch.randn(6, 9)
    mask, _ = masking.targeted_weights_bracketed(w, 0.5)
    assert torch.equal(mask, masking.targeted_weights(w, 0.5))


# --- random words: the Bernoulli draws ---


def test_random_words_are_uniform_16_bit_and_reproducible():
    g = torch.Generator().manual_seed(0)
    words = masking.random_words((1000, 401), generator=g)  # an odd count: the last 64-bit draw is cut
    assert words.dtype == torch.int16 and words.shape == (1000, 401)
    bits = torch.stack([(words.int() >> b) & 1 for b in range(16)]).float().mean(dim=(1, 2))
    # 401,000 fair bits per position: standard error 0.0008; 6 sigma
    assert ((bits - 0.5).abs() < 6 * 0.5 / math.sqrt(words.numel())).all()
    low_byte = torch.bincount((words.int() & 255).flatten(), minlength=256).float()
    expected = words.numel() / 256
    chi2 = float(((low_byte - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 degrees of freedom: p < 1e-7 above this
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(words, masking.random_words((1000, 401), generator=g2))


def test_drop_probability_is_alpha_at_16_bit_resolution():
    assert masking.drop_word_threshold(0.5) == 0
    assert masking.drop_word_threshold(0.3) == round(0.3 * 65536) - 32768
    assert masking.drop_word_threshold(1e-6) == -32768  # rounds to 0: nothing dropped
    assert masking.drop_word_threshold(1 - 1e-6) == 32768  # rounds to 1: every targeted element
    targeted = torch.ones(50, 50, dtype=torch.bool)
    assert not masking.sample_drop(targeted, 1e-6).any()
    assert masking.sample_drop(targeted, 1 - 1e-6).all()
    # the drop decision is exactly "word < threshold" on the words the same RNG state gives
    torch.manual_seed(5)
    drop = masking.sample_drop(targeted, 0.66)
    torch.manual_seed(5)
    words = masking.random_words(targeted.shape)
    assert torch.equal(drop, words < masking.drop_word_threshold(0.66))
