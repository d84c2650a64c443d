"""Stop hopeless trials after their early perplexity, through Optuna's pruning mechanism.

The trial reports its early perplexity as intermediate value (step 0); this pruner stops it when
the value is beyond ``max_ratio`` x the base model's early perplexity. Pruned trials keep their
early value, so TPE still learns from them (it ranks pruned trials by their last reported step).
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial

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
