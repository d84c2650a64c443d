"""Heartbeats for storages that Optuna gives none (JournalStorage on a shared file system).

The RDB storages (SQLite, PostgreSQL, MySQL) use Optuna's own heartbeat. For a journal file, each
worker stamps its RUNNING trial every ``interval`` seconds, and before each trial fails the RUNNING
trials whose stamp is older than ``grace`` seconds (their worker died) and enqueues each for one
retry, as Optuna's RetryHeartbeatStaleTrialCallback does for RDB storages.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import optuna
from optuna.trial import TrialState

from sweep.study.optuna_private import AnyTrial, set_system_attr
from sweep.study.retries import fail_and_retry

STAMP = "selfmerge_heartbeat"


@contextlib.contextmanager
def trial_heartbeat(study: optuna.Study, trial: AnyTrial, interval: float) -> Iterator[None]:
    """Stamp ``trial`` now and every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                set_system_attr(study, trial, STAMP, time.time())
            except Exception:  # the trial finished between two beats
                return

    set_system_attr(study, trial, STAMP, time.time())
    thread = threading.Thread(target=beat, name="selfmerge-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study: optuna.Study, grace: float) -> list[int]:
    """Fail RUNNING trials silent for more than ``grace`` seconds and enqueue each for one retry."""
    failed, now = [], time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        last_sign = max(trial.system_attrs.get(STAMP, 0.0), started)  # a retry inherits its original's stamp
        if now - last_sign <= grace:
            continue
        try:
            if fail_and_retry(study, trial, "worker died during the trial (heartbeat stale)"):
                failed.append(trial.number)
        except (RuntimeError, ValueError):  # another worker failed it first
            continue
    return failed
