"""What happens after each trial, as Optuna callbacks (``study.optimize(callbacks=[...])``), each
``callback(study, finished_trial)``, in the order the sweep passes them: write the trial's record,
fail dead workers' trials (journal storage), bring the study index up to date, draw an unscored plan
after too many repeats, keep the best files, write the leaderboard, report progress, stop when done.
The study is read once per finished trial (``Refresh``); the rest works from the index."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evals.registry import EVALS
from evals.schema import Field
from sweep.trials.model_store import ModelStore
from sweep.trials.pruning import stopped_at
from sweep.results.records import write_leaderboard, write_trial_record
from sweep.search.spaces import SearchSpace
from sweep.study.index import StudyIndex

log = logging.getLogger("selfmerge")
LEADERBOARD_SECONDS = 5.0  # the leaderboard is rewritten at most this often (and when the sweep ends)


class Refresh:
    def __init__(self, index: StudyIndex) -> None:
        self.index = index

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.index.refresh(study)


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


class DrawUnscored:
    """After ``max_repeats`` proposals in a row of plans already scored, the next trial is an unscored
    plan drawn uniformly from the space (enqueued: the next ask takes it). ``exhausted`` once every
    plan of the space is scored: the sweep then stops, saying so."""

    def __init__(self, index: StudyIndex, space: SearchSpace, space_kind: str, max_repeats: int, seed: int) -> None:
        self.index, self.space, self.space_kind, self.max_repeats = index, space, space_kind, max_repeats
        self.rng = random.Random(seed)
        self.repeats = 0
        self.exhausted: Optional[str] = None
        self._plans: Optional[dict] = None  # the space's plans, listed on first need

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.repeats = self.repeats + 1 if Field.CACHE_HIT_OF in trial.user_attrs else 0
        if self.repeats < self.max_repeats:
            return
        self.repeats = 0
        params = self._unscored()
        if params is None:
            self.exhausted = f"all {len(self._plans)} plans of space '{self.space_kind}' are scored"
            return
        log.info("%d proposals in a row were plans already scored: the next plan is drawn from the unscored ones", self.max_repeats)
        study.enqueue_trial(params, user_attrs={Field.DRAWN: "uniform"})

    def _unscored(self) -> Optional[dict]:
        if self._plans is None:
            self._plans, complete = self.space.enumerate_plans()
            if not complete:
                log.warning("space '%s' has over a million plans: the draw is from the first million", self.space_kind)
        unscored = [plan for plan in self._plans if plan not in self.index.scored]
        return dict(self._plans[self.rng.choice(unscored)]) if unscored else None


class KeepBest:
    def __init__(self, store: ModelStore, index: StudyIndex) -> None:
        self.store, self.index = store, index

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.store.keep_best(self.index.trials)


class WriteLeaderboard:
    """At most every ``LEADERBOARD_SECONDS``, and at most a tenth of the time: rebuilding it reads every
    trial (0.5 s at 20,000 trials on 2 cores; every 5 s, it was a seventh of a fast sweep's bookkeeping
    in a profile). ``flush`` writes it now."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.written, self.took = directory, 0.0, 0.0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if time.monotonic() - self.written >= max(LEADERBOARD_SECONDS, 10 * self.took):
            self.flush(study)

    def flush(self, study: optuna.Study) -> None:
        start = time.monotonic()
        write_leaderboard(study, self.directory)
        self.written = time.monotonic()
        self.took = self.written - start


def outcome(trial: FrozenTrial) -> str:
    """One log line's worth: the state, and the scores or the reason."""
    text = trial.state.name.lower()
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        scores = " ".join(f"{name}={attrs[name]:.3f}" for name in EVALS if name in attrs)
        return f"{text} {scores}" + (" (cache hit)" if Field.CACHE_HIT_OF in attrs else "")
    if trial.state == TrialState.PRUNED:
        return f"{text} at {stopped_at(attrs)}"
    return f"{text} ({attrs[Field.ERROR]})" if Field.ERROR in attrs else text


class Progress:
    """The progress bar (distinct plans done, best so far, base, pruned, failed, repeats, time left)
    and a log line."""

    def __init__(self, bar: tqdm, index: StudyIndex, base: dict, timeout: Optional[float]) -> None:
        self.bar, self.index, self.base, self.timeout = bar, index, base, timeout
        self.started = time.monotonic()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        index = self.index
        self.bar.n = index.n_done
        postfix = {
            f"best_{index.name}": f"{index.best:.3f}" if index.best is not None else "-",
            "base": f"{self.base.get(index.name, float('nan')):.3f}",
            "pruned": index.n_pruned,
            "failed": index.n_failed,
            "repeats": index.n_cache_hits,
        }
        if self.timeout:
            postfix["time_left"] = f"{max(0.0, self.timeout - (time.monotonic() - self.started)) / 60:.0f}m"
        self.bar.set_postfix(postfix)
        self.bar.refresh()
        log.info("trial %d %s: %s", trial.number, trial.user_attrs.get(Field.PLAN), outcome(trial))


class StopWhenDone:
    """Stop once the study has ``n_trials`` distinct plans done (a dead worker's retry, waiting, is
    run first), when every plan of the space is scored, or when ``stopping()`` says so (Ctrl-C)."""

    def __init__(self, n_trials: int, index: StudyIndex, draw: DrawUnscored, stopping: Callable[[], bool]) -> None:
        self.n_trials, self.index, self.draw, self.stopping = n_trials, index, draw, stopping

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.draw.exhausted:
            log.warning("sweep stops: %s", self.draw.exhausted)
            study.stop()
        elif (self.index.n_done >= self.n_trials and not self.index.waiting) or self.stopping():
            study.stop()
