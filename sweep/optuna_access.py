"""The few things selfmerge needs from Optuna that its public API does not give, in one place.

Optuna's ``Study`` and ``Trial`` keep their storage and ids private (``_storage``, ``_study_id``,
``_trial_id``); the sweep needs them to stamp, read and fail trials other than the one running in
this process (heartbeats, twins, orphans, the grid sampler's pick). If Optuna renames them, this is
the one module to change.
"""

from __future__ import annotations

from typing import Any, Union

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field

AnyTrial = Union[optuna.Trial, FrozenTrial]


def trial_id(trial: AnyTrial) -> int:
    return trial._trial_id


def set_system_attr(study: optuna.Study, trial: AnyTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id(trial), key, value)


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
