"""Stop hopeless trials after their early perplexity, through Optuna's pruning mechanism.

The trial reports its early perplexity as intermediate value (step 0); this pruner stops it when
the value is beyond ``max_ratio`` x the base model's early perplexity. Pruned trials keep their
early value, so TPE still learns from them (it ranks pruned trials by their last reported step).
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial

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


class EarlyStop:
    """The sweep's answer after a trial's early perplexity: go on, or stop (``pruned``). With one
    objective through Optuna's pruner (the value is reported, so TPE learns from it); with several,
    Optuna takes no intermediate values and the same rule is applied directly."""

    def __init__(self, max_ratio: float | None, base_early_ppl: float | None, n_objectives: int) -> None:
        self.max_ratio, self.base_early_ppl, self.n_objectives = max_ratio, base_early_ppl, n_objectives

    def __call__(self, trial: optuna.Trial, early_ppl: float) -> bool:
        if not self.max_ratio or self.base_early_ppl is None:
            return False
        trial.set_user_attr(Field.PPL_EARLY, early_ppl)
        if self.n_objectives == 1:
            trial.report(early_ppl if math.isfinite(early_ppl) else 1e30, EARLY_STEP)
            return trial.should_prune()
        return beyond(early_ppl, self.base_early_ppl, self.max_ratio)

    def pruned(self, early_ppl: float) -> optuna.TrialPruned:
        limit = self.base_early_ppl * self.max_ratio
        return optuna.TrialPruned(f"early ppl {early_ppl:.4g} > {limit:.4g} ({self.max_ratio} x the base's)")
