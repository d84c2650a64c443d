"""What the sweep knows of its study between trials, kept up to date incrementally.

After each trial the study's trials are read once (Optuna's cached storage fetches only the new and
unfinished ones) and only the trials not digested yet are looked at, so the bookkeeping of trial
20,000 costs what it cost at trial 10: the scored plans (plan -> the trial that scored it, for cache
hits and the uniform draw), the distinct plans done (what ``sweep.n_trials`` counts), counts by
outcome, the best value, and whether a retry is waiting. Trials of other workers are digested the
same way, so every worker of one study agrees.
"""

from __future__ import annotations

from typing import Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field
from sweep.study.retries import retried_number


class StudyIndex:
    def __init__(self, objective: tuple[str, str]) -> None:
        self.name, self.sign = objective[0], (1 if objective[1] == "minimize" else -1)
        self.scored: dict[str, int] = {}  # plan -> the trial that scored (or pruned) it itself
        self.n_done = 0  # finished distinct plans: not cache hits, not failures that were retried
        self.n_pruned = self.n_failed = self.n_cache_hits = 0
        self.best: Optional[float] = None
        self._next = 0  # trials below this number were seen
        self._open: set[int] = set()  # seen, not finished yet (running, or waiting for a worker)
        self._failed: set[int] = set()  # counted in n_done, until a retry shows up
        self._retried: set[int] = set()
        self._waiting: list[int] = []
        self.trials: list[FrozenTrial] = []  # as last read

    @property
    def waiting(self) -> bool:
        """A trial is enqueued and not taken yet (e.g. a dead worker's, retried)."""
        return bool(self._waiting)

    def refresh(self, study: optuna.Study) -> StudyIndex:
        """Digest what changed since the last refresh (``trials`` holds the study's trials as read)."""
        trials = study.get_trials(deepcopy=False)
        for number in [*sorted(self._open), *range(self._next, len(trials))]:
            trial = trials[number]
            self._open.discard(number)
            failed = retried_number(trial)
            if failed is not None and failed not in self._retried:  # a retry cancels its failure's count
                self._retried.add(failed)
                if failed in self._failed:
                    self._failed.discard(failed)
                    self.n_done -= 1
            if trial.state.is_finished():
                self._digest(trial)
            else:
                self._open.add(number)
        self._next, self.trials = len(trials), trials
        self._waiting = [n for n in self._open if trials[n].state == TrialState.WAITING]
        return self

    def _digest(self, trial: FrozenTrial) -> None:
        attrs = trial.user_attrs
        if Field.CACHE_HIT_OF in attrs:
            self.n_cache_hits += 1
            return
        if trial.state == TrialState.FAIL:
            self.n_failed += 1
            if trial.number not in self._retried:
                self.n_done += 1
                self._failed.add(trial.number)
            return
        self.n_done += 1
        plan = attrs.get(Field.PLAN)
        if plan is not None:
            self.scored.setdefault(plan, trial.number)
        if trial.state == TrialState.PRUNED:
            self.n_pruned += 1
        elif self.name in attrs and (self.best is None or self.sign * attrs[self.name] < self.sign * self.best):
            self.best = attrs[self.name]
