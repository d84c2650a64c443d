"""Where a sweep's study is kept: an RDB URL (SQLite, PostgreSQL, MySQL) with Optuna's heartbeat, or a
journal file; SQLite in WAL mode with write transactions that begin IMMEDIATE; and ``SweepStorage``,
Optuna's cached RDB storage with fewer sorts, reads and commits, used where the guard of
sweep/study/optuna_private.py allows (else Optuna wraps the RDB storage in its own cache, as always)."""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from merge_core.errors import SelfMergeError
from sweep.study.optuna_private import (
    CachedStorage, TrialModel, TrialUserAttributeModel, check_needed, scoped_session, speedups, storage_ready,
)  # fmt: skip

STORAGE_ATTEMPTS = 5  # several workers starting together race to create the RDB schema
JOURNAL_PREFIX = "journal:"  # journal:/shared/path/journal.log: Optuna's JournalStorage on a file


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_PREFIX)


def make_storage(url: str, heartbeat_seconds: int) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///, postgresql://, mysql://) with Optuna's heartbeat, or journal:PATH
    (JournalStorage, for clusters with a shared file system and no database; sweep/study/heartbeat.py)."""
    check_needed()  # the private attributes no sweep can do without: refused here, on one line
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if is_journal(url):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL_PREFIX) :]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise SelfMergeError(f"cannot open storage {url}: {err}") from None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            storage = RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
            if url.startswith("sqlite:///"):
                _sqlite_settings(storage)
            return _cached(storage)
        except ImportError as err:  # no driver for this URL: trying again will not help
            raise SelfMergeError(f"cannot open storage {url}: {str(err).splitlines()[0]}") from None
        except Exception as err:  # bad URL, unreachable server, or workers creating the schema at once
            if attempt == STORAGE_ATTEMPTS - 1:
                raise SelfMergeError(
                    f"cannot open storage {url}: {str(err).splitlines()[0]}{damaged_hint(url)}"
                ) from None
            time.sleep(0.2 * 2**attempt + random.random() * 0.2)


def _sqlite_settings(storage: RDBStorage) -> None:
    """SQLite in WAL mode: readers (a report, optuna-dashboard, another worker) no longer block the
    writer, and a commit costs one sync instead of a rollback journal's several (a trial's dozen
    attribute writes: 39 -> 28 ms a trial here). ``synchronous=NORMAL``, SQLite's advice for WAL: a
    commit no longer waits for its sync (~8 ms a trial of ~16 commits here); a killed or crashed
    sweep loses nothing, and a power cut or an OS crash can undo the last commits before the next
    checkpoint but never corrupts the file. The mode stays with the file; each connection sets the
    sync level.

    Every transaction is ``BEGIN IMMEDIATE``: Python's sqlite3 begins one only at the first write,
    so two workers could both read a WAITING trial (an enqueued plan, a retry) and both take it, as
    Optuna's check-then-set in ``set_trial_state_values`` is one read and one write. With 8 workers
    on one file, 1-2 of them died on "Cannot tell a COMPLETE trial" in every run; with the write lock
    taken first, none did (benchmarks/distributed_overhead.py, README)."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _pragmas(connection, record) -> None:
        connection.isolation_level = None  # no implicit BEGIN: ``_begin`` says which
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(storage.engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # connections made before the listeners reconnect with them


def damaged_hint(url: str) -> str:
    """What to do when a storage cannot be read: a SQLite file beside its sweep's records is rebuilt."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        return f"; if the file is damaged, `selfmerge rebuild {folder}` makes the study again from {folder}/trials/"
    return ""


class SweepStorage(CachedStorage or object):
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
      always sent (the twin check reads right after writing its plan, sweep/study/twins.py).
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
            with scoped_session(self._backend.scoped_session, True) as session:
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
        with scoped_session(backend.scoped_session, True) as session:
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


def _cached(storage: RDBStorage) -> optuna.storages.BaseStorage:
    """``SweepStorage`` over ``storage`` where the guard allows it; else ``storage`` itself, which
    Optuna's ``create_study`` wraps in its own cache."""
    if speedups() is not None:
        return storage
    cached = SweepStorage(storage)
    return storage if storage_ready(cached) is not None else cached
