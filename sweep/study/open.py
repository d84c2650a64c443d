"""Open the Optuna study of a sweep, new or resumed (it must score as before), load it to read it, and
hold the lock beside a SQLite study that tells a lone worker its RUNNING trials are orphans."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator, Optional

import optuna

from evals.schema import StudyKey
from merge_core.errors import SelfMergeError
from sweep.config import SweepConfig
from sweep.study.storage import damaged_hint, is_journal, make_storage
from sweep.trials.scoring import with_new_defaults

def _differences(stored, wanted, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix.rstrip('.')} was {stored}, now {wanted}"]


def open_sweep_study(config: SweepConfig, sampler: optuna.samplers.BaseSampler,
                     pruner: Optional[optuna.pruners.BasePruner], fingerprint: dict,
                     n_base_layers: int) -> optuna.Study:  # fmt: skip
    """The sweep's study, new or resumed. A resumed one must score as this config does (``fingerprint``,
    sweep/trials/scoring.py) and optimise the same objectives; the error names what changed."""
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
