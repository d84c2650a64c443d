"""Make a sweep's study again from its records when the storage is damaged or lost.

Every sweep writes ``results/<sweep>/study.json`` (name, directions, the study's attributes:
objectives, scoring, the base's record) and ``trials/N.json`` (one per finished trial: state,
values, parameters and their distributions, pruning value, attributes). From those the study comes
back trial for trial, numbers included, so ``cache_hit_of`` still points at the right trial and a
resumed sweep goes on as if nothing happened. A damaged SQLite file is moved aside, never deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import optuna
from optuna.distributions import json_to_distribution
from optuna.trial import TrialState

from evals.schema import Field
from merge_core.errors import SelfMergeError, read_json
from sweep.results.records import STUDY_RECORD
from sweep.study.storage import make_storage

RECORD_KEYS = {"trial", "state", "values", "params", "distributions", "intermediate_values", Field.FAIL_REASON,
               "started", "finished"}  # fmt: skip - a record's own keys; the rest are the trial's user attributes
MISSING = "no record of this trial survived (rebuilt study)"


def _trial(record: dict) -> optuna.trial.FrozenTrial:
    state = TrialState[record["state"]]
    if not state.is_finished():  # written while running: its worker died
        state = TrialState.FAIL
    if record["params"] and not record.get("distributions"):
        raise SelfMergeError(f"trials/{record['trial']}.json has no parameter distributions (written by an older "
                             "selfmerge): this sweep cannot be rebuilt from its records")  # fmt: skip
    distributions = {name: json_to_distribution(json.dumps(d)) for name, d in (record.get("distributions") or {}).items()}
    reason = record.get(Field.FAIL_REASON)
    return optuna.trial.create_trial(
        state=state,
        values=record["values"] if state == TrialState.COMPLETE else None,
        params=record["params"],
        distributions=distributions,
        user_attrs={k: v for k, v in record.items() if k not in RECORD_KEYS},
        system_attrs={Field.FAIL_REASON: reason} if reason else {},
        intermediate_values={int(step): value for step, value in (record.get("intermediate_values") or {}).items()},
    )


def _set_aside(url: str) -> Optional[Path]:
    """A SQLite file in the way is renamed ``<file>.damaged[.N]``; other storages are the user's to clear."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url[len("sqlite:///") :])
    if not path.exists():
        return None
    aside, n = path.with_name(path.name + ".damaged"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.damaged.{n}"), n + 1
    path.rename(aside)
    for suffix in ("-wal", "-shm"):  # its write-ahead log belongs to it, never to the new file
        log_file = path.with_name(path.name + suffix)
        if log_file.exists():
            log_file.rename(aside.with_name(aside.name + suffix))
    return aside


def rebuild_study(directory: Path, url: Optional[str] = None) -> tuple[optuna.Study, Optional[Path]]:
    """The study of ``directory`` made again in ``url`` (default: its study.db); returns it and where a
    damaged SQLite file was moved."""
    if not (directory / STUDY_RECORD).is_file():
        raise SelfMergeError(f"{directory} has no {STUDY_RECORD}: it is not a sweep folder, or its sweep was "
                             "written by a selfmerge older than the rebuild command")  # fmt: skip
    meta = read_json(directory / STUDY_RECORD)
    records = sorted((read_json(path) for path in (directory / "trials").glob("*.json")), key=lambda r: r["trial"])
    trials = [_trial(record) for record in records]  # all checked before anything is moved or written
    url = url or f"sqlite:///{directory / 'study.db'}"
    aside = _set_aside(url)
    try:
        study = optuna.create_study(study_name=meta["study_name"], storage=make_storage(url, 60),
                                    directions=meta["directions"])  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        raise SelfMergeError(f"{url} already holds a study named {meta['study_name']!r}: rebuild into another "
                             "--storage, or delete that study first") from None  # fmt: skip
    for key, value in meta["user_attrs"].items():
        study.set_user_attr(key, value)
    for record, trial in zip(records, trials):
        while len(study.trials) < record["trial"]:  # a trial that left no record keeps its number
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, system_attrs={Field.FAIL_REASON: MISSING}))
        study.add_trial(trial)
    return study, aside
