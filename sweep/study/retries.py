"""A trial whose worker died, or that a stop cut short: failed with its reason and enqueued once more with
the same parameters, in the form Optuna's heartbeat retry uses (``retry_history``, ``failed_trial``),
so Optuna's own ``RetryHeartbeatStaleTrialCallback.retried_trial_number`` reads ours too."""

from __future__ import annotations

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field
from sweep.study.optuna_private import storage_of, trial_id


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial whose worker is gone as failed, with ``reason``, and enqueue it for one
    retry with the same parameters (as Optuna's heartbeat does). False if another worker did first."""
    storage = storage_of(study)
    storage.set_trial_system_attr(trial_id(trial), Field.FAIL_REASON, reason)
    if not storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
        return False
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(trial_id(trial)))
    return True


def retry_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial (their workers are gone) and enqueue each for one retry."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t.number for t in running if fail_and_retry(study, t, "worker died during the trial")]


def retry_once(study: optuna.Study, trial: FrozenTrial, drop: tuple[str, ...] = ()) -> None:
    """Enqueue one retry of a finished (failed) trial without the user attributes in ``drop`` (the
    failure's reason must not follow the retry)."""
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
