"""What happens after each trial, as Optuna callbacks (``study.optimize(callbacks=[...])``), each
``callback(study, finished_trial)``, in the order the sweep passes them: write the trial's record,
fail dead workers' trials (journal storage), keep the best files, write the leaderboard, report
progress, stop when done. The study's trials are read once per finished trial (``TrialsRead``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evals.registry import EVALS
from evals.schema import Field
from sweep.model_store import ModelStore
from sweep.optuna_access import retried_number
from sweep.records import write_leaderboard, write_trial_record

log = logging.getLogger("selfmerge")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def n_done(trials: list[FrozenTrial]) -> int:
    """Trials finished, not counting failures that were retried."""
    retried = {retried_number(t) for t in trials}
    retried_failures = {t.number for t in trials if t.state == TrialState.FAIL and t.number in retried}
    return sum(1 for t in trials if t.state in FINISHED and t.number not in retried_failures)


class TrialsRead:
    """The study's trials, read once after each finished trial and shared by that trial's callbacks."""

    def __init__(self) -> None:
        self._after: Optional[int] = None
        self._trials: list[FrozenTrial] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
        if self._after != trial.number:
            self._trials, self._after = study.get_trials(deepcopy=False), trial.number
        return self._trials


class WriteRecord:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        write_trial_record(self.directory, trial)


class FailStale:
    """Before the next ask, so a retry of a dead worker's trial is taken next."""

    def __init__(self, fail_stale: Callable[[optuna.Study], None]) -> None:
        self.fail_stale = fail_stale

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.fail_stale(study)


class KeepBest:
    def __init__(self, store: ModelStore, trials: TrialsRead) -> None:
        self.store, self.trials = store, trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.store.keep_best(self.trials(study, trial))


class WriteLeaderboard:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        write_leaderboard(study, self.directory)


def outcome(trial: FrozenTrial) -> str:
    """One log line's worth: the state, and the scores or the reason."""
    text = trial.state.name.lower()
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        scores = " ".join(f"{name}={attrs[name]:.3f}" for name in EVALS if name in attrs)
        return f"{text} {scores}" + (" (cache hit)" if Field.CACHE_HIT_OF in attrs else "")
    if trial.state == TrialState.PRUNED:
        return f"{text} at early ppl={attrs.get(Field.PPL_EARLY, float('nan')):.4g}"
    return f"{text} ({attrs[Field.ERROR]})" if Field.ERROR in attrs else text


class Progress:
    """The progress bar (trials done, best so far, base, pruned, failed, time left) and a log line."""

    def __init__(self, bar: tqdm, trials: TrialsRead, objective: tuple[str, str], base: dict,
                 timeout: Optional[float]) -> None:  # fmt: skip
        self.bar, self.trials, self.base, self.timeout = bar, trials, base, timeout
        self.name, self.sign = objective[0], (1 if objective[1] == "minimize" else -1)
        self.started = time.monotonic()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = self.trials(study, trial)
        self.bar.n = n_done(trials)
        scored = [t.user_attrs[self.name] for t in trials if t.state == TrialState.COMPLETE]
        best = min(scored, key=lambda v: self.sign * v) if scored else None
        postfix = {
            f"best_{self.name}": f"{best:.3f}" if best is not None else "-",
            "base": f"{self.base.get(self.name, float('nan')):.3f}",
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        if self.timeout:
            postfix["time_left"] = f"{max(0.0, self.timeout - (time.monotonic() - self.started)) / 60:.0f}m"
        self.bar.set_postfix(postfix)
        self.bar.refresh()
        log.info("trial %d %s: %s", trial.number, trial.user_attrs.get(Field.PLAN), outcome(trial))


class StopWhenDone:
    """Stop once the study has ``n_trials`` finished trials (a dead worker's retry, waiting, is run
    first), or when ``stopping()`` says so (Ctrl-C)."""

    def __init__(self, n_trials: int, trials: TrialsRead, stopping: Callable[[], bool]) -> None:
        self.n_trials, self.trials, self.stopping = n_trials, trials, stopping

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = self.trials(study, trial)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if (n_done(trials) >= self.n_trials and not waiting) or self.stopping():
            study.stop()
