"""The interval arithmetic of the ablation report, against hand-computed values."""

import math

import pytest

from synesthesia.ablate.stats import (
    A_BETTER,
    B_BETTER,
    NOT_DISTINGUISHABLE,
    mean_interval,
    paired_difference,
    wilson_interval,
)


def test_mean_interval_matches_hand_computed_t_interval():
    # mean 2, sample std 1, half-width t_{0.975, 2} · 1/√3 = 4.3027 · 0.5774 = 2.484
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.estimate == pytest.approx(2.0)
    assert interval.high - interval.estimate == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert (interval.low, interval.high) == pytest.approx((2.0 - 2.484, 2.0 + 2.484), abs=1e-3)
    assert interval.n == 3 and interval.confidence == 0.95


def test_mean_interval_one_value_has_no_interval_and_nan_is_left_out():
    interval = mean_interval([0.5, math.nan])
    assert interval.estimate == 0.5 and interval.n == 1
    assert math.isnan(interval.low) and math.isnan(interval.high) and not interval.has_interval
    assert math.isnan(mean_interval([]).estimate)


def test_paired_difference_of_a_clearly_better_method_excludes_zero():
    a = {0: 0.60, 1: 0.62, 2: 0.61, 3: 0.63}
    b = {0: 0.50, 1: 0.515, 2: 0.51, 3: 0.525}  # a − b ≈ +0.10 at every seed
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.1025)
    assert d.low > 0 and d.verdict == A_BETTER and d.distinguishable
    assert paired_difference(b, a).verdict == B_BETTER


def test_paired_difference_pairs_by_seed_not_by_order():
    # the per-seed spread is large, the paired difference is constant: pairing must see that
    a = {0: 0.30, 1: 0.90, 2: 0.60}
    b = {2: 0.58, 0: 0.28, 1: 0.88}
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.02) and d.verdict == A_BETTER


def test_paired_difference_of_noisy_methods_is_not_distinguishable():
    d = paired_difference({0: 0.60, 1: 0.50, 2: 0.58}, {0: 0.52, 1: 0.57, 2: 0.55})
    assert d.low < 0 < d.high and d.verdict == NOT_DISTINGUISHABLE and not d.distinguishable


def test_paired_difference_uses_only_shared_seeds():
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.9}, {1: 0.5, 2: 0.6, 5: 0.1})
    assert d.n == 2 and d.mean == pytest.approx(0.25)


def test_paired_difference_one_shared_seed_has_no_interval():
    d = paired_difference({0: 0.9, 1: 0.8}, {1: 0.1})
    assert d.n == 1 and d.mean == pytest.approx(0.7)
    assert math.isnan(d.low) and math.isnan(d.high)
    assert d.verdict == NOT_DISTINGUISHABLE


def test_wilson_interval_matches_known_values():
    w = wilson_interval(0.5, 100)
    assert (w.low, w.high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    zero = wilson_interval(0.0, 10)  # never outside [0, 1], never empty at the edges
    assert zero.low == pytest.approx(0.0, abs=1e-12) and zero.high == pytest.approx(0.2775, abs=1e-4)
    wider = wilson_interval(0.5, 100, confidence=0.99)
    assert wider.low < w.low and wider.high > w.high


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: wilson_interval(0.5, 0), "at least one test sample"),
        (lambda: wilson_interval(1.5, 10), r"in \[0, 1\]"),
        (lambda: mean_interval([1.0, 2.0], confidence=95), r"in \(0, 1\)"),
    ],
)
def test_mistakes_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
