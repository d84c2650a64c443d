"""One plan, several workers: a plan that another worker is evaluating right now is waited for, and
its result taken when it lands, instead of being evaluated twice.

Each trial writes its plan (the runner does, before asking here), then reads the RUNNING trials with
the same plan. One with a lower number seen: this trial waits for it (``claim=wait``). None:
``claim=evaluate``; but a higher-numbered twin that read before this trial's plan was written may
have decided to evaluate too, so this trial reads each higher twin's decision and waits for the
first evaluator. Waits point only down to a lower number or up to an evaluator, which itself
waits for no one: no cycle, no deadlock. Everything goes through the shared Optuna storage.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field
from sweep.optuna_access import read_trial

log = logging.getLogger("selfmerge")
POLL_SECONDS = 0.5


class TwinPlans:
    """``fail_stale(study)`` fails trials of dead workers (called every ``heartbeat_seconds`` while
    waiting, so a twin whose worker died ends as FAIL and this trial evaluates the plan itself)."""

    def __init__(self, fail_stale: Callable[[optuna.Study], None], heartbeat_seconds: float) -> None:
        self.fail_stale, self.heartbeat_seconds = fail_stale, heartbeat_seconds

    def result_for(self, trial: optuna.Trial, plan: str) -> FrozenTrial | None:
        """The finished twin whose result this trial takes, or None: this trial evaluates the plan."""
        study = trial.study
        twins = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.user_attrs.get(Field.PLAN) == plan and t.number != trial.number]  # fmt: skip
        lower = [t.number for t in twins if t.number < trial.number]
        if lower:
            trial.set_user_attr(Field.CLAIM, "wait")
            return self._finished(study, min(lower))
        trial.set_user_attr(Field.CLAIM, "evaluate")
        for twin in sorted(t.number for t in twins if t.number > trial.number):
            if self._decision(study, twin) == "evaluate":
                trial.set_user_attr(Field.CLAIM, "wait")
                return self._finished(study, twin)
        return None

    def _poll(self, study: optuna.Study, number: int, done: Callable[[FrozenTrial], bool]) -> FrozenTrial:
        last_check = time.monotonic()
        while True:
            trial = read_trial(study, number)
            if done(trial):
                return trial
            if time.monotonic() - last_check > self.heartbeat_seconds:
                self.fail_stale(study)  # the awaited worker may have died
                last_check = time.monotonic()
            time.sleep(POLL_SECONDS)

    def _finished(self, study: optuna.Study, number: int) -> FrozenTrial | None:
        """Trial ``number`` once finished: it, if it has a result; None if it failed."""
        log.info("plan already being evaluated by trial %d: waiting for its result", number)
        trial = self._poll(study, number, lambda t: t.state.is_finished())
        return trial if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None

    def _decision(self, study: optuna.Study, number: int) -> str:
        """A twin's claim once written: evaluate | wait; "finished" if it ended first."""
        trial = self._poll(study, number, lambda t: Field.CLAIM in t.user_attrs or t.state.is_finished())
        return "finished" if trial.state.is_finished() else trial.user_attrs[Field.CLAIM]
