"""Open the Optuna study of a sweep: storage by URL, sampler by config, stale trials retried once."""

from __future__ import annotations

import fcntl
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from merge_core.errors import SelfMergeError
from sweep.config import SweepConfig


def make_storage(url: str, heartbeat_seconds: int) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_seconds,
            grace_period=2 * heartbeat_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except Exception as err:  # bad URL, missing driver, unreachable server
        raise SelfMergeError(f"cannot open storage {url}: {str(err).splitlines()[0]}") from None


def open_study(config: SweepConfig, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the sweep's study, or load it to resume; its objectives must not have changed."""
    storage = make_storage(config.storage_url, config.storage.heartbeat_seconds)
    directions = config.directions
    try:
        study = optuna.create_study(study_name=config.sweep.name, storage=storage, sampler=sampler, pruner=pruner, directions=directions, load_if_exists=True)
    except ValueError as err:
        raise SelfMergeError(f"sweep {config.sweep.name!r}: {err}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise SelfMergeError(f"sweep {config.sweep.name!r} optimises {stored}, not {directions}: use another sweep.name")
    return study


def load_study(url: str, name: str, sampler=None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=url, sampler=sampler)
    except KeyError:
        raise SelfMergeError(f"no sweep named {name!r} in {url}") from None


class SweepLock:
    """A shared flock held by every worker of a sweep on this machine's file system.

    A worker that can take it exclusively knows no other worker is alive, so RUNNING trials left
    by a killed run are orphans: they are failed and retried at once instead of waiting for
    their heartbeat to go stale.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file = open(directory / ".sweep.lock", "a+")

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


def retry_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial (their workers are gone) and enqueue each for one retry."""
    storage, retry = study._storage, RetryHeartbeatStaleTrialCallback(max_retry=1)
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_system_attr(trial._trial_id, "fail_reason", "worker died during the trial")
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            retry(study, storage.get_trial(trial._trial_id))
            orphans.append(trial.number)
    return orphans
