"""Is a plan's difference to the base real, or noise? Statistics over the items both were scored on.

A plan and the base answer the same items, so the comparison is paired: per item, the plan's score
minus the base's. From those differences:

- ``low``/``high``: a 95% interval of their mean, by a paired bootstrap (items resampled with
  replacement, ``BOOTSTRAP`` times, a fixed seed, so the same scores always give the same interval);
- ``p_value``: two-sided; for right/wrong items McNemar's exact test (a binomial test on the items
  where exactly one of the two was right), else the bootstrap's (twice the share of resampled means
  on the far side of 0);
- ``detectable``: the smallest true difference these n items would detect with 80% power at the 5%
  level, (z_0.975 + z_0.8) x sd(differences) / sqrt(n): a difference smaller than that was not
  looked for hard enough to be seen, whatever the point estimate says.

``holm`` corrects p-values for the number of plans compared (Holm's step-down: each p times the
number of hypotheses not yet rejected, kept monotone); a plan "beats the base" only where its
corrected p-value is under ``ALPHA`` and its difference is positive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05  # two-sided level of every test and interval
POWER = 0.8  # of the detectable difference
BOOTSTRAP = 10_000  # resamples of the paired bootstrap
SEED = 0  # the bootstrap's: the same scores give the same interval


@dataclass(frozen=True)
class PairedDifference:
    """Plan minus base over the ``n`` items both were scored on, in the score's own unit."""

    n: int
    diff: float  # mean of plan - base per item (accuracy: a share, 0.02 = 2 points)
    low: float  # the 95% interval of ``diff``
    high: float
    p_value: float  # two-sided: McNemar's exact test for right/wrong items, else the bootstrap's
    detectable: float  # the smallest difference n such items detect (80% power, 5% level)
    test: str  # mcnemar | bootstrap
    better: int = 0  # right/wrong items: right for the plan only
    worse: int = 0  # ... for the base only

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value: of the items where exactly one of two models was right, are the
    ``better`` ones (plan right) and ``worse`` ones (base right) a fair coin's split?"""
    n = better + worse
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * scipy_stats.binom.cdf(min(better, worse), n, 0.5)))


def bootstrap_means(differences: np.ndarray, resamples: int = BOOTSTRAP, seed: int = SEED) -> np.ndarray:
    """The mean of ``differences`` over ``resamples`` resamplings of the items, with replacement."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # in blocks: 10,000 x n indices at once can be large
        stop = min(start + 1000, resamples)
        means[start:stop] = differences[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a paired test over ``n`` items of this ``sd`` detects."""
    if n == 0:
        return math.inf
    z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    return float(z * sd / math.sqrt(n))


def paired_difference(plan: Sequence[float], base: Sequence[float],
                      binary: Optional[bool] = None) -> PairedDifference:  # fmt: skip
    """``plan`` and ``base``: per-item scores on the same items, in the same order. ``binary`` (right or
    wrong items, 1/0): McNemar's test; it is read off the scores when not given."""
    plan_a, base_a = np.asarray(plan, dtype=float), np.asarray(base, dtype=float)
    if plan_a.shape != base_a.shape or plan_a.ndim != 1:
        raise ValueError(f"paired scores need the same items: {plan_a.shape} vs {base_a.shape}")
    n = len(plan_a)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, 1.0, math.inf, "none")
    binary = bool(np.isin(np.concatenate([plan_a, base_a]), (0.0, 1.0)).all()) if binary is None else binary
    differences = plan_a - base_a
    means = bootstrap_means(differences)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    sd = float(differences.std(ddof=1)) if n > 1 else 0.0
    if sd == 0.0:  # no item differs (or one item): the spread the base's own scores would give a pair
        spread = base_a.std(ddof=1) if n > 1 else 0.0
        sd = float(math.sqrt(2) * spread) if spread > 0 else (math.sqrt(2 * 0.25) if binary else 0.0)
    if binary:
        better, worse = int(((plan_a == 1) & (base_a == 0)).sum()), int(((plan_a == 0) & (base_a == 1)).sum())
        p_value, test = mcnemar_exact(better, worse), "mcnemar"
    else:
        better = worse = 0
        far = (means <= 0).mean() if differences.mean() > 0 else (means >= 0).mean()
        p_value, test = float(min(1.0, 2 * far)), "bootstrap"
    return PairedDifference(n, float(differences.mean()), float(low), float(high), p_value,
                            detectable_difference(sd, n), test, better, worse)  # fmt: skip


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: compare each with ALPHA."""
    order = np.argsort(p_values, kind="stable")
    m, adjusted, running = len(p_values), [1.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def verdict(names: Sequence[str], differences: Sequence[PairedDifference],
            unit: str = "") -> tuple[list[bool], str]:  # fmt: skip
    """Which of ``names`` beat the base after Holm's correction over all of them, and a sentence saying
    so; where none did, by how much one would have had to differ to be seen."""
    if not differences:
        return [], "no plan was compared with the base"
    adjusted = holm([d.p_value for d in differences])
    beats = [p < ALPHA and d.diff > 0 for p, d in zip(adjusted, differences)]
    k = len(differences)
    if any(beats):
        shown = ", ".join(
            f"{name} ({d.diff:+.4g}{unit}, 95% CI {d.low:+.4g} to {d.high:+.4g}, Holm p={p:.3g}, n={d.n})"
            for name, d, p, b in zip(names, differences, adjusted, beats) if b
        )  # fmt: skip
        return beats, f"{sum(beats)} of {k} plans beat the base after Holm's correction over {k}: {shown}"
    best = max(range(k), key=lambda i: differences[i].diff)
    d = differences[best]
    need = min(x.detectable for x in differences)
    return beats, (f"no plan was shown better than the base (Holm's correction over {k}); the best, "
                   f"{names[best]}, differs by {d.diff:+.4g}{unit} (95% CI {d.low:+.4g} to {d.high:+.4g}, "
                   f"n={d.n}); these items detect a difference of about {need:.3g}{unit} or more")  # fmt: skip
