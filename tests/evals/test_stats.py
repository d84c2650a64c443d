"""Paired statistics on constructed data whose answers are known."""

import math

import numpy as np
import pytest

from evals.stats import ALPHA, detectable_difference, holm, mcnemar_exact, paired_difference, verdict


def test_equal_models_give_an_interval_that_covers_zero():
    rng = np.random.default_rng(1)
    base = (rng.random(200) < 0.6).astype(float)
    same = paired_difference(base, base)
    assert same.diff == 0 and same.low <= 0 <= same.high and same.p_value == 1.0 and same.test == "mcnemar"
    noisy = paired_difference(rng.permutation(base), base)  # as accurate, right on other items
    assert noisy.low < 0 < noisy.high and noisy.p_value > ALPHA


def test_a_clear_difference_excludes_zero():
    base = np.array([1.0] * 50 + [0.0] * 50)
    plan = np.array([1.0] * 80 + [0.0] * 20)  # right on every item the base got, and 30 more
    d = paired_difference(plan, base)
    assert d.diff == pytest.approx(0.3) and 0 < d.low < 0.3 < d.high and d.better == 30 and d.worse == 0
    assert d.p_value == pytest.approx(2 * 0.5**30)


def test_mcnemar_matches_the_exact_binomial_of_a_textbook_case():
    # 12 items only the plan got right, 3 only the base: 2 x P(X <= 3 | 15, 1/2) = 2 x 576 / 32768
    assert mcnemar_exact(12, 3) == pytest.approx(0.03515625)
    assert mcnemar_exact(3, 12) == mcnemar_exact(12, 3) and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def test_the_bootstrap_is_reproducible_and_continuous_scores_use_it():
    rng = np.random.default_rng(2)
    base = rng.normal(5, 1, 60)
    plan = base + rng.normal(0.1, 0.5, 60)
    first, again = paired_difference(plan, base), paired_difference(plan, base)
    assert first == again and first.test == "bootstrap" and first.low < first.diff < first.high


def test_the_detectable_difference_is_detected_about_eight_times_in_ten():
    """Simulated plans whose true difference is exactly the detectable one (sd 1, n 100)."""
    n, sd = 100, 1.0
    delta = detectable_difference(sd, n)
    assert delta == pytest.approx(2.8016 * sd / 10, rel=1e-3)
    rng = np.random.default_rng(3)
    hits = sum(paired_difference(rng.normal(delta, sd, n), np.zeros(n)).p_value < ALPHA for _ in range(150))
    assert 0.65 <= hits / 150 <= 0.93
    assert detectable_difference(sd, 0) == math.inf


def test_holm_matches_a_worked_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == [] and holm([0.5]) == [0.5]


def test_the_verdict_says_which_plan_beats_the_base_or_what_could_have_been_seen():
    base = np.array([1.0] * 50 + [0.0] * 50)
    better = paired_difference(np.array([1.0] * 80 + [0.0] * 20), base)
    level = paired_difference(base[::-1].copy(), base)
    beats, text = verdict(["0-16,8-30", "0-20,14-30"], [better, level])
    assert beats == [True, False] and text.startswith("1 of 2 plans beat the base after Holm's correction over 2")
    beats, text = verdict(["0-20,14-30"], [level])
    assert beats == [False] and text.startswith("no plan was shown better than the base")
    assert "detect a difference of about" in text
