"""TPE over a bounded window of the study: the best ``size`` finished trials and the latest ``size``.

TPE's cost per ask grows with every trial of the study; through this wrapper it stops growing, and the
good region and the recent proposals (the constant liar's) are both in view. TPE reads the study
through ``Study._get_trials``, which the window's view of the study answers: a private name, so the
sampler is used only where the guard of sweep/study/optuna_private.py allows (make_sampler asks)."""

from __future__ import annotations

import heapq
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.study.optuna_private import AnyTrial, get_trials_of


class _WindowedStudy:
    """The study as a sampler sees it through ``WindowedSampler`` during one trial's asks: every
    attribute is the study's, but its trials are those of the window, read once per query for the
    whole ask (TPE asks for them about nine times a trial, each a storage read and a selection)."""

    def __init__(self, study: optuna.Study, window: "_Window", only_new: set[int] | None = None) -> None:
        self._study, self._window, self._only_new = study, window, only_new
        self._read: dict[Any, list[FrozenTrial]] = {}  # by deepcopy: the window; by (deepcopy, states)

    def new_trials_only(self, seen: set[int]) -> "_WindowedStudy":
        """The same view, each query answered with the trials not in ``seen`` (which it then joins)."""
        view = _WindowedStudy(self._study, self._window, seen)
        view._read = self._read
        return view

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        """One storage read per ask: every trial, from which the window is chosen; then each query's
        ``states`` picked from the window once."""
        key = (deepcopy, tuple(states) if states is not None else None)
        if key not in self._read:
            if deepcopy not in self._read:
                trials = get_trials_of(self._study, deepcopy, None, use_cache)
                self._read[deepcopy] = self._window.select(trials)
            chosen = self._read[deepcopy]
            self._read[key] = chosen if states is None else [t for t in chosen if t.state in states]
        if self._only_new is None:
            return self._read[key]
        new = [trial for trial in self._read[key] if trial.number not in self._only_new]
        self._only_new.update(trial.number for trial in new)
        return new

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


class _Window:
    """The best ``size`` finished trials by the first objective, kept in a heap as trials finish, and
    the latest ``size`` trials; running ones always (TPE's constant liar needs them). ``select`` takes
    every trial of the study (trial n at position n) and looks only at those new since the last call
    and those that were not finished then (another worker's may finish after later ones)."""

    def __init__(self, size: int, minimize: bool) -> None:
        self.size, self.sign = size, 1.0 if minimize else -1.0
        self._best: list[tuple[float, int]] = []  # max-heap of the best, as (-sign * value, number)
        self._next = 0  # trials from this number on were not looked at yet
        self._open: set[int] = set()  # looked at, not finished then

    def select(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        if len(trials) <= 2 * self.size:
            return trials
        if trials[-1].number != len(trials) - 1:  # not a whole study: the positions are not the numbers
            raise ValueError("the window selects from every trial of one study")
        pending, self._open = [*sorted(self._open), *range(self._next, len(trials))], set()
        for number in pending:
            trial = trials[number]
            if not trial.state.is_finished():
                self._open.add(number)
            elif trial.state == TrialState.COMPLETE and trial.values:
                item = (-self.sign * trial.values[0], number)
                (heapq.heappush if len(self._best) < self.size else heapq.heappushpop)(self._best, item)
        self._next = len(trials)
        keep = {number for _, number in self._best} | set(range(len(trials) - self.size, len(trials)))
        keep |= {number for number in self._open if trials[number].state == TrialState.RUNNING}
        return [trials[number] for number in sorted(keep)]


class WindowedSampler(optuna.samplers.BaseSampler):
    """``inner`` (TPE) modelling a bounded window of the study: the best ``size`` trials and the latest
    ``size``. Its cost per ask stops growing with the study (TPE's own grows with every trial), and
    the good region and the recent proposals (the constant liar's) are both in view."""

    def __init__(self, inner: optuna.samplers.BaseSampler, size: int, minimize: bool) -> None:
        self.inner, self.size, self._window = inner, size, _Window(size, minimize)
        self._views: dict[int, _WindowedStudy] = {}  # the current trial's view only
        self._in_search_space: set[int] = set()  # trials the inner sampler's search space has seen

    def _view(self, study: optuna.Study, trial: AnyTrial) -> Any:
        if trial.number not in self._views:
            self._views = {trial.number: _WindowedStudy(study, self._window)}
        return self._views[trial.number]

    def infer_relative_search_space(self, study, trial):
        """TPE's grouped search space grows by each trial's distributions and keeps what it saw, so it
        is shown only the trials it has not seen: walking the whole window each ask cost a third of it."""
        view = self._view(study, trial)
        if getattr(self.inner, "_group", False):
            view = view.new_trials_only(self._in_search_space)
        return self.inner.infer_relative_search_space(view, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
