"""Bootstrap intervals, paired tests and Holm's adjustment on correctness whose answer is known."""

import math

import numpy as np
import pytest

from moelab.modules.significance import bootstrap, holm, interval, point_estimate

N = 60


def correct(pattern, seeds=1) -> np.ndarray:
    return np.tile(np.asarray(pattern, dtype=float), (seeds, 1))


REFERENCE = correct([1] * 36 + [0] * 24)  # 60 % right


def mcnemar_exact(wins: int, losses: int) -> float:
    """The exact McNemar test's two-sided p-value, from first principles (the oracle of these tests)."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("reference_right", "significant"), [(48, True), (36, False)])
def test_a_method_right_exactly_where_the_reference_is_wrong(reference_right, significant):
    """Every example is discordant: the difference is 1 − 2·(reference accuracy), and the test agrees with
    the exact McNemar test on whether that is significant (with 60 examples, 40 % vs 60 % is not)."""
    reference = correct([1] * reference_right + [0] * (N - reference_right))
    result = interval([(1.0, {"t": 1 - reference}), (-1.0, {"t": reference})], ["t"], 4000, seed=0, key="k",
                      paired=True)
    assert result.value == pytest.approx(1 - 2 * reference_right / N)
    assert (result.high < 0) == significant and (result.p < 0.05) == significant
    exact = mcnemar_exact(N - reference_right, reference_right)
    assert (exact < 0.05) == significant and result.p == pytest.approx(exact, abs=0.06)


def test_identical_methods_differ_by_exactly_zero_with_p_one():
    result = interval([(1.0, {"t": REFERENCE}), (-1.0, {"t": REFERENCE.copy()})], ["t"], 1000, seed=0, key="k",
                      paired=True)
    assert (result.value, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)


def test_a_one_example_difference_is_not_significant():
    one_more = REFERENCE.copy()
    one_more[0, -1] = 1
    result = interval([(1.0, {"t": one_more}), (-1.0, {"t": REFERENCE})], ["t"], 2000, seed=0, key="k", paired=True)
    assert result.value == pytest.approx(1 / N)
    assert result.low <= 0 <= result.high and result.p > 0.3
    # a resample holds the changed example 0, 1, 2 … times: never a negative difference
    assert result.low == 0.0


def test_pairing_cancels_what_two_methods_share():
    """Two methods that agree on 59 examples: unpaired resampling would give an interval as wide as a cell's."""
    one_more = REFERENCE.copy()
    one_more[0, -1] = 1
    difference = interval([(1.0, {"t": one_more}), (-1.0, {"t": REFERENCE})], ["t"], 2000, seed=0, key="k")
    cell = interval([(1.0, {"t": REFERENCE})], ["t"], 2000, seed=0, key="k")
    assert difference.high - difference.low < 0.5 * (cell.high - cell.low)


def test_a_cell_interval_covers_the_estimate_and_shrinks_with_more_examples():
    small = interval([(1.0, {"t": REFERENCE})], ["t"], 2000, seed=0, key="k")
    large = interval([(1.0, {"t": np.tile(REFERENCE, 10)})], ["t"], 2000, seed=0, key="k")
    assert small.low < 0.6 < small.high and small.p is None
    assert large.high - large.low < 0.5 * (small.high - small.low)


def test_seeds_that_disagree_widen_the_interval():
    """Seeds 100 % and 0 % right: the example draw alone would give a zero-width interval at 50 %."""
    seeds = np.stack([np.ones(N), np.zeros(N)])
    result = interval([(1.0, {"t": seeds})], ["t"], 2000, seed=0, key="k")
    assert result.value == 0.5 and result.low == 0.0 and result.high == 1.0


def test_the_average_weighs_tasks_equally_and_draws_each_tasks_examples():
    terms = [(1.0, {"a": correct([1] * 10), "b": correct([0] * 90 + [1] * 10)})]
    assert point_estimate(terms, ["a", "b"]) == pytest.approx(0.55)
    replicates = bootstrap(terms, ["a", "b"], 500, np.random.default_rng(0))
    assert replicates.shape == (500,) and 0.5 < replicates.mean() < 0.6 and replicates.std() > 0


def test_the_same_seed_and_key_give_the_same_interval():
    terms = [(1.0, {"t": REFERENCE})]
    assert interval(terms, ["t"], 500, seed=3, key="a") == interval(terms, ["t"], 500, seed=3, key="a")
    assert interval(terms, ["t"], 500, seed=3, key="a") != interval(terms, ["t"], 500, seed=4, key="a")


def test_methods_scored_on_different_examples_are_refused():
    with pytest.raises(ValueError, match="t: the compared methods were scored on different numbers of examples"):
        interval([(1.0, {"t": REFERENCE}), (-1.0, {"t": REFERENCE[:, :10]})], ["t"], 10, seed=0, key="k")


def test_holm_multiplies_by_the_remaining_family_size_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == [0.02]
