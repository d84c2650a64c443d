"""Open the Optuna study of a sweep: storage by URL, sampler by config, stale trials retried once."""

from __future__ import annotations

import contextlib
import fcntl
import random
import time
from pathlib import Path
from typing import Iterator, Optional

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from evals.schema import StudyKey
from merge_core.errors import SelfMergeError
from sweep.config import SweepConfig
from sweep.optuna_access import SweepStorage, fail_and_retry
from sweep.scoring import with_new_defaults

STORAGE_ATTEMPTS = 5  # several workers starting together race to create the RDB schema
JOURNAL_PREFIX = "journal:"  # journal:/shared/path/journal.log: Optuna's JournalStorage on a file


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_PREFIX)


def make_storage(url: str, heartbeat_seconds: int) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///, postgresql://, mysql://) with Optuna's heartbeat, or journal:PATH
    (JournalStorage, for clusters with a shared file system and no database; sweep/heartbeat.py)."""
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
            return SweepStorage(storage)
        except ImportError as err:  # no driver for this URL: trying again will not help
            raise SelfMergeError(f"cannot open storage {url}: {str(err).splitlines()[0]}") from None
        except Exception as err:  # bad URL, unreachable server, or workers creating the schema at once
            if attempt == STORAGE_ATTEMPTS - 1:
                raise SelfMergeError(
                    f"cannot open storage {url}: {str(err).splitlines()[0]}{damaged_hint(url)}"
                ) from None
            time.sleep(0.2 * 2**attempt + random.random() * 0.2)


def _differences(stored, wanted, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix.rstrip('.')} was {stored}, now {wanted}"]


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


def open_sweep_study(config: SweepConfig, sampler: optuna.samplers.BaseSampler,
                     pruner: Optional[optuna.pruners.BasePruner], fingerprint: dict,
                     n_base_layers: int) -> optuna.Study:  # fmt: skip
    """The sweep's study, new or resumed. A resumed one must score as this config does (``fingerprint``,
    sweep/scoring.py) and optimise the same objectives; the error names what changed."""
    study = open_study(config, sampler, pruner)
    name = config.sweep.name
    stored = study.user_attrs.get(StudyKey.SCORING)
    if stored is None:  # the fingerprint last: a worker joining at this moment reads it as "all written"
        study.set_user_attr(StudyKey.MODEL_HF_ID, config.model.hf_id)
        study.set_user_attr(StudyKey.N_BASE_LAYERS, n_base_layers)
        study.set_user_attr(StudyKey.OBJECTIVES, config.objective_names)
        study.set_user_attr(StudyKey.SCORING, fingerprint)
    elif (stored := with_new_defaults(stored)) != fingerprint:
        changes = "; ".join(_differences(stored, fingerprint))
        raise SelfMergeError(
            f"sweep {name!r} cannot resume with other scoring ({changes}): use another sweep.name"
        )
    objectives = study.user_attrs[StudyKey.OBJECTIVES]
    if objectives != config.objective_names:
        wanted = config.objective_names
        raise SelfMergeError(f"sweep {name!r} optimises {objectives}, not {wanted}: use another sweep.name")
    return study


def open_study(
    config: SweepConfig, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """Create the sweep's study, or load it to resume; its objectives must not have changed."""
    storage = make_storage(config.storage_url, config.storage.heartbeat_seconds)
    directions = config.directions
    try:
        study = optuna.create_study(
            study_name=config.sweep.name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as err:
        raise SelfMergeError(f"sweep {config.sweep.name!r}: {err}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise SelfMergeError(
            f"sweep {config.sweep.name!r} optimises {stored}, not {directions}: use another sweep.name"
        )
    return study


def damaged_hint(url: str) -> str:
    """What to do when a storage cannot be read: a SQLite file beside its sweep's records is rebuilt."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        return f"; if the file is damaged, `selfmerge rebuild {folder}` makes the study again from {folder}/trials/"
    return ""


def load_study(url: str, name: str, sampler=None) -> optuna.Study:
    try:
        storage = make_storage(url, 60) if is_journal(url) else url
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise SelfMergeError(f"no sweep named {name!r} in {url}") from None
    except SelfMergeError:
        raise
    except Exception as err:  # SQLAlchemy's and the drivers' errors span many lines
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SelfMergeError(f"cannot read the study in {url}: {cause}{damaged_hint(url)}") from None


class SweepLock:
    """A shared flock beside a SQLite study file, held by every worker that uses that file.

    A worker that can take it exclusively knows no other worker is alive, so RUNNING trials left
    by a killed run are orphans: they are failed and retried at once instead of waiting for
    their heartbeat to go stale. Other storages are shared between machines, where only the
    heartbeat can tell: ``for_url`` gives None for them.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+")

    @classmethod
    def for_url(cls, url: str) -> SweepLock | None:
        if not url.startswith("sqlite:///"):
            return None
        return cls(Path(url[len("sqlite:///") :] + ".lock"))

    def alone(self) -> bool:
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._file, fcntl.LOCK_SH)
            return False
        fcntl.flock(self._file, fcntl.LOCK_SH)  # downgrade: later workers may join
        return True

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def sweep_lock(url: str) -> Iterator[Optional[SweepLock]]:
    """The lock beside a SQLite study for the sweep's lifetime; None for other storages."""
    lock = SweepLock.for_url(url)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.close()


def retry_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial (their workers are gone) and enqueue each for one retry."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t.number for t in running if fail_and_retry(study, t, "worker died during the trial")]
