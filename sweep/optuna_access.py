"""The few things selfmerge needs from Optuna that its public API does not give, in one place.

Optuna's ``Study`` and ``Trial`` keep their storage and ids private (``_storage``, ``_study_id``,
``_trial_id``); the sweep needs them to stamp, read and fail trials other than the one running in
this process (heartbeats, twins, orphans, the grid sampler's pick). If Optuna renames them, this is
the one module to change.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
import time
from collections.abc import Container
from typing import Any, Union

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from evals.schema import Field

AnyTrial = Union[optuna.Trial, FrozenTrial]


class SweepStorage(_CachedStorage):
    """Optuna's cached RDB storage (what ``optuna.create_study`` wraps an ``RDBStorage`` in), with fewer
    sorts, reads and commits; what a read brings from the database stays Optuna's.

    - Trials are handed out without a sort. Optuna's ``get_all_trials`` copies and sorts every cached
      trial on each call, three calls a trial: ~15 ms a trial at 20,000 trials. Here they are kept in
      a list by number as they arrive (the one place they do), and a read of running or waiting
      trials looks only at the unfinished ones.
    - A trial's parameters wait for its next write or read (the runner writes the plan right after
      the sampler's asks) and go in that transaction: a commit each was ~1 ms apiece. A sweep that
      dies between the two leaves a running trial with no parameters, retried as a new plan.
    - ``set_trial_user_attrs`` writes many attributes in one statement (Optuna: two queries each).
    - The trial just created is not read back at once: ``ask`` did, a read of six queries.
    - A read of the study less than ``FRESH_SECONDS`` after the last, with no write of this process
      between, is not sent again: after each trial the sweep reads the study (its index), then
      Optuna's ``ask`` reads it for a waiting trial and TPE for its window, within milliseconds.
      Another worker's changes show up at most that late; a read after this process wrote is
      always sent (the twin check reads right after writing its plan, sweep/twins.py).
    """

    _UNFINISHED = frozenset((TrialState.RUNNING, TrialState.WAITING))
    FRESH_SECONDS = 0.1

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._ordered: dict[int, list[FrozenTrial | None]] = {}  # study id -> trial n at position n
        self._params: dict[int, list[tuple]] = {}  # trial id -> parameters not written yet
        self._created: int | None = None  # the trial this process created last, not read since
        self._read_at: dict[int, float] = {}  # study id -> when its trials were last read
        self._wrote = False  # a write since the last read

    def _add_trials_to_cache(self, study_id: int, trials: list[FrozenTrial]) -> None:
        super()._add_trials_to_cache(study_id, trials)
        ordered = self._ordered.setdefault(study_id, [])
        for trial in trials:
            if trial.number >= len(ordered):  # another worker's newer trials may not be read yet
                ordered.extend([None] * (trial.number + 1 - len(ordered)))
            ordered[trial.number] = trial

    def _read_trials_from_remote_storage(self, study_id: int, force: bool = False) -> None:
        recent = time.monotonic() - self._read_at.get(study_id, -math.inf) < self.FRESH_SECONDS
        if recent and not (self._wrote or force):
            return
        self._wrote = False
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = time.monotonic()

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:  # fmt: skip
        self._flush()
        self._read_trials_from_remote_storage(study_id)
        # a gap in the numbers: this process made a trial after others' it has not read; a read fills it
        if len(self._ordered.get(study_id, [])) != len(self._studies[study_id].trials):
            self._read_trials_from_remote_storage(study_id, force=True)
        with self._lock:
            study, ordered = self._studies[study_id], self._ordered.get(study_id, [])
            if len(ordered) != len(study.trials):  # a gap in the numbers still: Optuna's way
                trials = sorted(study.trials.values(), key=lambda t: t.number)
            elif states is None:
                trials = list(ordered)
            elif self._UNFINISHED.issuperset(states):  # after the read, every other trial is finished
                numbers = sorted(
                    self._trial_id_to_study_id_and_number[i][1] for i in study.unfinished_trial_ids
                )
                trials = [ordered[n] for n in numbers]
            else:
                trials = ordered
            if states is not None:
                trials = [t for t in trials if t.state in states]
            return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:  # fmt: skip
        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            known = self._studies[study_id].param_distribution.get(param_name)
            if known is not None:  # checked now, as Optuna does; the first one against the database
                check_distribution_compatibility(known, distribution)
            self._params.setdefault(trial_id, []).append(
                (param_name, param_value_internal, distribution, known)
            )

    def _flush(self, session=None) -> None:
        """The parameters waiting, in ``session`` or a transaction of their own."""
        if not self._params:
            return
        if session is None:
            with _create_scoped_session(self._backend.scoped_session, True) as session:
                return self._flush(session)
        with self._lock:
            waiting, self._params, self._wrote = self._params, {}, True
            for trial_id, params in waiting.items():
                study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
                for name, value, distribution, known in params:
                    self._backend._set_trial_param_without_commit(
                        session, trial_id, name, value, distribution, known
                    )
                    self._studies[study_id].param_distribution.setdefault(name, distribution)

    def _before_write(self) -> None:
        """The parameters waiting go first; the next read is sent (it must see this write)."""
        self._flush()
        self._wrote = True

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """``attrs`` (and the parameters waiting) in one transaction."""
        backend, self._wrote = self._backend, True
        with _create_scoped_session(backend.scoped_session, True) as session:
            self._flush(session)
            trial = TrialModel.find_or_raise_by_id(trial_id, session)
            backend.check_trial_is_updatable(trial_id, trial.state)
            dialect = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}.get(backend.engine.name)
            if dialect is None:  # MySQL and the rest: Optuna's way, one attribute at a time
                for key, value in attrs.items():
                    backend._set_trial_attr_without_commit(
                        session, TrialUserAttributeModel, trial_id, key, value
                    )
                return
            rows = [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                for key, value in attrs.items()
            ]
            insert = dialect(TrialUserAttributeModel).values(rows)
            keys = [TrialUserAttributeModel.trial_id, TrialUserAttributeModel.key]
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=keys, set_={"value_json": insert.excluded.value_json}
                )
            )

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)  # cached as the database made it
        with self._lock:  # unfinished until a read says otherwise, as a read would have put it
            self._studies[study_id].unfinished_trial_ids.add(trial_id)
        self._created = trial_id if template_trial is None else None
        self._wrote = self._wrote or template_trial is not None  # an enqueued trial: others may take it
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id == self._created:  # as the database returned it when it was made, microseconds ago
            self._created = None
            with self._lock:
                study_id, number = self._trial_id_to_study_id_and_number[trial_id]
                return copy.deepcopy(self._studies[study_id].trials[number])
        self._flush()
        return super().get_trial(trial_id)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        self._flush()
        return super().get_best_trial(study_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        self._before_write()
        return super().set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._before_write()
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.set_trial_user_attrs(trial_id, {key: value})

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._before_write()
        super().set_trial_system_attr(trial_id, key, value)


def trial_id(trial: AnyTrial) -> int:
    return trial._trial_id


def set_system_attr(study: optuna.Study, trial: AnyTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id(trial), key, value)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """``attrs`` on a running trial in one transaction (SweepStorage). Optuna's ``set_user_attr`` commits
    each one (~2 ms apiece on SQLite): a record of a dozen fields was a quarter of a trial's bookkeeping."""
    storage = trial.study._storage
    if not isinstance(storage, SweepStorage):  # the journal storage
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    storage.set_trial_user_attrs(trial_id(trial), attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)


def read_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` as the storage holds it now (not the study's cached copy)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial whose worker is gone as failed, with ``reason``, and enqueue it for one
    retry with the same parameters (as Optuna's heartbeat does). False if another worker did first."""
    storage = study._storage
    storage.set_trial_system_attr(trial_id(trial), Field.FAIL_REASON, reason)
    if not storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
        return False
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(trial_id(trial)))
    return True


def retry_once(study: optuna.Study, trial: FrozenTrial, drop: tuple[str, ...] = ()) -> None:
    """Enqueue one retry of a finished (failed) trial, in the form Optuna's heartbeat retry uses, without
    the user attributes in ``drop`` (the failure's reason must not follow the retry)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > 1:  # retried once already
        return
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in drop},
        system_attrs={**trial.system_attrs, "failed_trial": trial.number, "retry_history": history},
    ))  # fmt: skip


def retried_number(trial: FrozenTrial) -> int | None:
    """The failed trial this one retries, if it is a retry."""
    return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


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
                trials = self._study._get_trials(deepcopy=deepcopy, states=None, use_cache=use_cache)
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
