"""Heartbeats for storages that Optuna gives none (JournalStorage on a shared file system).

The RDB storages (SQLite, PostgreSQL, MySQL) use Optuna's own heartbeat. For a journal file, each
worker stamps its RUNNING trial every ``interval`` seconds, and before each trial fails the RUNNING
trials whose stamp is older than ``grace`` seconds (their worker died) and enqueues each for one
retry, as Optuna's RetryHeartbeatStaleTrialCallback does for RDB storages.
"""

from __future__ import annotations

import threading
import time

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

STAMP = "selfmerge_heartbeat"


class TrialHeartbeat:
    def __init__(self, study: optuna.Study, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="selfmerge-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._storage.set_trial_system_attr(self._trial_id, STAMP, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # the trial finished between two beats
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(study: optuna.Study, grace: float) -> list[int]:
    """Fail RUNNING trials silent for more than ``grace`` seconds and enqueue each for one retry."""
    storage, retry, failed = study._storage, RetryHeartbeatStaleTrialCallback(max_retry=1), []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        last_sign = max(trial.system_attrs.get(STAMP, 0.0), started)  # a retry inherits its original's stamp
        if now - last_sign <= grace:
            continue
        try:
            storage.set_trial_system_attr(trial._trial_id, "fail_reason", "worker died during the trial (heartbeat stale)")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
                failed.append(trial.number)
        except (RuntimeError, ValueError):  # another worker failed it first
            continue
    return failed
