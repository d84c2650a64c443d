"""Every private name of Optuna's that selfmerge uses, imported here and nowhere else, and the guard
that checks them before a sweep relies on them.

Two kinds of use:

- **Needed**, no public way exists: a study's storage and id and a trial's id (``Study._storage``,
  ``Study._study_id``, ``Trial._trial_id``), to stamp, read and fail trials other than the one running
  in this process (heartbeats, twins, orphans, the grid sampler's pick). Optuna has kept them since
  2.x; without them no sweep can run, and ``check_needed`` says which one is missing.
- **Speed-ups**: ``SweepStorage`` (sweep/study/storage.py) subclasses Optuna's ``_CachedStorage`` and
  writes through its RDB models and sessions; ``WindowedSampler`` (sweep/search/windowed.py) hands TPE
  a window of the study through ``Study._get_trials``. Together they take per-trial bookkeeping at
  20,000 trials from ~84 to ~49 ms. They are used only where ``speedups()`` allows: the installed
  Optuna inside ``TESTED`` (the releases CI runs them on) and every internal they touch present, with
  the parameters they pass. Otherwise the sweep uses Optuna's own storage and TPE over every trial and
  says so once, on one line: the same plans and scores, slower bookkeeping in long studies.
  ``SELFMERGE_PLAIN_OPTUNA=1`` asks for that fallback whatever the version.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any, Optional, Union

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from merge_core.errors import SelfMergeError

try:  # the speed-ups' internals; any of them missing turns the speed-ups off, nothing else
    from optuna.storages._cached_storage import _CachedStorage as CachedStorage
    from optuna.storages._cached_storage import _StudyInfo as CachedStudyInfo
    from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
    from optuna.storages._rdb.storage import _create_scoped_session as scoped_session

    _IMPORT_ERROR = ""
except ImportError as err:  # pragma: no cover - exercised by a future Optuna
    CachedStorage = CachedStudyInfo = TrialModel = TrialUserAttributeModel = scoped_session = None
    _IMPORT_ERROR = str(err)

log = logging.getLogger("selfmerge")
AnyTrial = Union[optuna.Trial, FrozenTrial]

TESTED_RANGE = ">=4.9,<5.2"  # CI runs the speed-ups on 4.9.0 (the oldest allowed) and on the newest, 5.1.0
TESTED = SpecifierSet(TESTED_RANGE)
PLAIN_ENV = "SELFMERGE_PLAIN_OPTUNA"  # =1: Optuna's own storage and sampler, whatever the version
COST = ("the same plans and scores up to 2 x sampler.window trials; bookkeeping ~0.65 s instead of ~0.06 s a "
        "trial at 20,000 trials (benchmarks/sweep_overhead.py --plain-optuna)")  # fmt: skip

# What the speed-ups call or override, with the parameters they pass (names, in order, after self).
_SIGNATURES = {
    ("CachedStorage", "_add_trials_to_cache"): ("study_id", "trials"),
    ("CachedStorage", "_read_trials_from_remote_storage"): ("study_id",),
    ("CachedStorage", "get_all_trials"): ("study_id", "deepcopy", "states"),
    ("CachedStorage", "set_trial_param"): ("trial_id", "param_name", "param_value_internal", "distribution"),
    ("CachedStorage", "create_new_trial"): ("study_id", "template_trial"),
    ("CachedStorage", "get_trial"): ("trial_id",),
    ("CachedStorage", "get_best_trial"): ("study_id",),
    ("CachedStorage", "set_trial_state_values"): ("trial_id", "state", "values"),
    ("CachedStorage", "set_trial_intermediate_value"): ("trial_id", "step", "intermediate_value"),
    ("CachedStorage", "set_trial_user_attr"): ("trial_id", "key", "value"),
    ("CachedStorage", "set_trial_system_attr"): ("trial_id", "key", "value"),
    ("RDBStorage", "_set_trial_param_without_commit"): (
        "session", "trial_id", "param_name", "param_value_internal", "distribution", "previous_distribution"),
    ("RDBStorage", "_set_trial_attr_without_commit"): ("session", "model_cls", "trial_id", "key", "value"),
    ("RDBStorage", "check_trial_is_updatable"): ("trial_id", "trial_state"),
    ("TrialModel", "find_or_raise_by_id"): ("trial_id", "session"),
    ("Study", "_get_trials"): ("deepcopy", "states", "use_cache"),
}  # fmt: skip
_STORAGE_ATTRIBUTES = ("_backend", "_studies", "_lock", "_trial_id_to_study_id_and_number")
_STUDY_INFO_ATTRIBUTES = ("trials", "unfinished_trial_ids", "param_distribution")
_NEEDED = (("Study", "_storage"), ("Study", "_study_id"), ("Trial", "_trial_id"), ("FrozenTrial", "_trial_id"))


def _parameters(function: Any) -> tuple[str, ...]:
    names = list(inspect.signature(function).parameters)
    return tuple(names[1:] if names[:1] in (["self"], ["cls"]) else names)


def _missing_internals() -> Optional[str]:
    """What the speed-ups rely on and this Optuna lacks, in words; None if nothing."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    owners = {"CachedStorage": CachedStorage, "RDBStorage": RDBStorage, "TrialModel": TrialModel,
              "Study": optuna.Study}  # fmt: skip
    for (owner, name), wanted in _SIGNATURES.items():
        function = getattr(owners[owner], name, None)
        if function is None:
            return f"{owner}.{name} is gone"
        if _parameters(function)[: len(wanted)] != wanted:
            return f"{owner}.{name} takes {_parameters(function)}, not {wanted}"
    info = CachedStudyInfo()
    lacking = [name for name in _STUDY_INFO_ATTRIBUTES if not hasattr(info, name)]
    return f"the cached study lacks {lacking}" if lacking else None


def speedups() -> Optional[str]:
    """None where SweepStorage and WindowedSampler may be used; else why not, said on one line (once
    per process) as the sweep falls back to Optuna's own storage and sampler."""
    return _fall_back(_why_not())


@functools.cache
def _why_not() -> Optional[str]:
    version = Version(optuna.__version__)
    if os.environ.get(PLAIN_ENV, "") not in ("", "0"):
        return f"{PLAIN_ENV} is set"
    if version not in TESTED:
        return f"Optuna {version} is outside the range they are tested on ({TESTED_RANGE})"
    missing = _missing_internals()
    return f"Optuna {version} changed an internal they use ({missing})" if missing else None


def storage_ready(storage: Any) -> Optional[str]:
    """Checked once on a new SweepStorage: the instance attributes it reads from Optuna's base class."""
    lacking = [name for name in _STORAGE_ATTRIBUTES if not hasattr(storage, name)]
    return _fall_back(f"the cached storage lacks {lacking}" if lacking else None)


@functools.cache
def _fall_back(reason: Optional[str]) -> Optional[str]:
    if reason is not None:
        log.warning("Optuna's own storage and TPE over every trial, not selfmerge's faster "
                    "ones: %s; %s", reason, COST)  # fmt: skip
    return reason


@functools.cache
def check_needed() -> None:
    """The private attributes no sweep can do without, checked once on a study of Optuna's own."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    objects = {"Study": study, "Trial": trial, "FrozenTrial": study.trials[0]}
    lacking = [f"{owner}.{name}" for owner, name in _NEEDED if not hasattr(objects[owner], name)]
    if lacking:
        raise SelfMergeError(f"Optuna {optuna.__version__} has no {', '.join(lacking)}, which selfmerge needs; "
                             f"install optuna{TESTED_RANGE}")  # fmt: skip


# -- the needed accessors ------------------------------------------------------------------------


def trial_id(trial: AnyTrial) -> int:
    return trial._trial_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def get_trials_of(study: optuna.Study, deepcopy: bool, states, use_cache: bool) -> list[FrozenTrial]:
    """``Study._get_trials``, which TPE reads the study through (the windowed sampler's view wraps it)."""
    return study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)


def set_system_attr(study: optuna.Study, trial: AnyTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id(trial), key, value)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """``attrs`` on a running trial in one transaction where the storage can (SweepStorage). Optuna's
    ``set_user_attr`` commits each one (~2 ms apiece on SQLite): a record of a dozen fields was a
    quarter of a trial's bookkeeping."""
    storage = trial.study._storage
    if not hasattr(storage, "set_trial_user_attrs"):  # Optuna's own storages, the journal
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    storage.set_trial_user_attrs(trial_id(trial), attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)


def read_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` as the storage holds it now (not the study's cached copy)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
