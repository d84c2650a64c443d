"""Open the Optuna study of a sweep: storage by URL, sampler by config, stale trials retried once."""

from __future__ import annotations

import fcntl
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from merge_core.errors import SelfMergeError
from sweep.config import SamplerConfig, SweepConfig


def make_sampler(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    if config.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # group=True: trials with other parameter sets (the base model's trial 0, define-by-run
    # spaces) don't break the multivariate model; constant liar keeps parallel workers apart.
    return optuna.samplers.TPESampler(
        n_startup_trials=config.n_startup_trials, multivariate=True, group=True, constant_liar=True, seed=seed
    )


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


def open_study(config: SweepConfig, create: bool = True) -> optuna.Study:
    storage = make_storage(config.storage_url, config.storage.heartbeat_seconds)
    sampler = make_sampler(config.sampler, config.sweep.seed)
    if create:
        return optuna.create_study(study_name=config.sweep.name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True)
    return load_study(config.storage_url, config.sweep.name, sampler)


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
            if not trial.user_attrs.get("is_base"):  # the base trial is re-run by the sweep itself
                retry(study, storage.get_trial(trial._trial_id))
            orphans.append(trial.number)
    return orphans
