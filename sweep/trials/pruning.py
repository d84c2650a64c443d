"""Stop hopeless or outranked trials early, through Optuna's pruning mechanism.

Two rules, each asked mid-evaluation with a ``Stage`` (evals/base.py):
- perplexity: a trial whose early perplexity (step 0) is beyond ``max_ratio`` x the base model's stops
  there (``BaseRatioPruner``). Reported to Optuna only when perplexity is the one objective; otherwise
  applied directly, so no perplexity lands among another objective's values.
- items (``prune.min_items``): successive halving on the objective's items. After ``min_items`` items
  per task, and after each reduction_factor x as many, the trial reports its score so far at that step
  and goes on only while it ranks in the best 1/reduction_factor of the trials that reached the step:
  Optuna's ``SuccessiveHalvingPruner`` (asynchronous: each worker decides alone against what the study
  holds, so it scales with workers as the sweep does). Hyperband is not used: it would run several
  halving brackets at once and assign plans to them through its own sampler hooks, which selfmerge's
  plan sampler does not share; one bracket, its step measured on a landscape (benchmarks/), suffices.
Pruned trials keep what they reported, so the sampler still learns from them.
"""

from __future__ import annotations

import math
from typing import Mapping

import optuna
from optuna.trial import FrozenTrial

from evals.base import Stage
from evals.schema import Field

EARLY_STEP = 0


def beyond(early_ppl: float, base_early_ppl: float, max_ratio: float) -> bool:
    return not math.isfinite(early_ppl) or early_ppl > max_ratio * base_early_ppl


class BaseRatioPruner(optuna.pruners.BasePruner):
    """``base_early_ppl`` is set by the sweep once the base model is scored (or read back on resume)."""

    def __init__(self, max_ratio: float) -> None:
        self.max_ratio = max_ratio
        self.base_early_ppl: float | None = None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if self.base_early_ppl is None or EARLY_STEP not in trial.intermediate_values:
            return False
        return beyond(trial.intermediate_values[EARLY_STEP], self.base_early_ppl, self.max_ratio)


def make_pruner(max_ratio: float | None, min_items: int | None, reduction_factor: int,
                ppl_is_the_objective: bool) -> optuna.pruners.BasePruner | None:  # fmt: skip
    """The study's pruner: successive halving on items, else the perplexity ratio where it reports."""
    if min_items:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_items, reduction_factor=reduction_factor)
    if max_ratio and ppl_is_the_objective:
        return BaseRatioPruner(max_ratio)
    return None


class EarlyStop:
    """The sweep's answer to a trial's partial score: go on, or stop (``pruned``)."""

    def __init__(self, max_ratio: float | None, base_early_ppl: float | None, ppl_reports: bool) -> None:
        self.max_ratio, self.base_early_ppl, self.ppl_reports = max_ratio, base_early_ppl, ppl_reports

    def __call__(self, trial: optuna.Trial, stage: Stage) -> bool:
        if stage.field != Field.PPL_EARLY:  # an item step: Optuna's pruner ranks it among the study's
            trial.report(stage.value, stage.step)
            return trial.should_prune()
        if not self.max_ratio or self.base_early_ppl is None:
            return False
        trial.set_user_attr(Field.PPL_EARLY, stage.value)
        if self.ppl_reports:
            trial.report(stage.value if math.isfinite(stage.value) else 1e30, EARLY_STEP)
            return trial.should_prune()
        return beyond(stage.value, self.base_early_ppl, self.max_ratio)


def stopped_at(attrs: Mapping) -> str:
    """Where a pruned trial stopped, from its record: after some items, or at its early perplexity."""
    if Field.PPL_EARLY in attrs and Field.PPL not in attrs:
        return f"early ppl={attrs[Field.PPL_EARLY]:.4g}"
    if Field.BENCH_TASKS in attrs:
        n = min(task["n"] for task in attrs[Field.BENCH_TASKS].values())
        return f"{Field.BENCH}={attrs[Field.BENCH]:.3f} after {n} items per task (outranked)"
    return "a partial score"


def pruned(attrs: Mapping) -> optuna.TrialPruned:
    return optuna.TrialPruned(f"pruned at {stopped_at(attrs)}")


def replay(trial: optuna.Trial, earlier: FrozenTrial) -> optuna.TrialPruned:
    """A cache hit of a pruned plan: what it reported, reported again (the sampler learns it twice, as
    it would from a rescore), and its stop."""
    for step, value in sorted(earlier.intermediate_values.items()):
        trial.report(value, step)
    return pruned(earlier.user_attrs)
