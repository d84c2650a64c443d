"""SweepStorage: Optuna's cached RDB storage with fewer sorts and commits must hand out what Optuna's
own would, to this worker and to another one reading the same file."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from sweep.study import optuna_private
from sweep.study.optuna_private import set_user_attrs
from sweep.study.storage import SweepStorage, make_storage

pytestmark = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage:UserWarning"
)  # ask/tell without optimize


@pytest.fixture(autouse=True)
def speedups_on(monkeypatch):
    """These are SweepStorage's own tests: on whatever SELFMERGE_PLAIN_OPTUNA says (CI runs the study's
    tests once more with it set, for the rest of them)."""
    monkeypatch.delenv(optuna_private.PLAIN_ENV, raising=False)
    optuna_private._why_not.cache_clear()
    yield
    optuna_private._why_not.cache_clear()


def _study(url: str, name: str = "s") -> optuna.Study:
    storage = make_storage(url, 60)
    assert isinstance(storage, SweepStorage)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def _commits(study: optuna.Study) -> list[int]:
    from sqlalchemy import event

    count = [0]
    event.listen(
        study._storage._backend.engine, "commit", lambda connection: count.__setitem__(0, count[0] + 1)
    )
    return count


def test_trials_come_in_order_and_by_state_as_optuna_gives_them(tmp_path):
    """Two workers interleave trials of every state; each sees what Optuna's own storage sees."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    mine, other = _study(url), _study(url)
    plain = optuna.load_study(study_name="s", storage=url)  # Optuna's _CachedStorage over the same file
    for i in range(12):
        study = (mine, other)[i % 3 == 0]
        trial = study.ask()
        trial.suggest_int("x", 0, 9)
        if i % 4 == 1:
            continue  # left running
        study.tell(trial, float(i) if i % 5 else None, state=None if i % 5 else TrialState.FAIL)
    mine.enqueue_trial({"x": 3})
    for study in (mine, other):  # a worker's next read or write brings its running trials' parameters
        study.get_trials(deepcopy=False)
    time.sleep(SweepStorage.FRESH_SECONDS)  # and the other worker's next read after this sees them
    for states in (None, (TrialState.RUNNING,), (TrialState.WAITING,), (TrialState.COMPLETE,),
                   (TrialState.RUNNING, TrialState.WAITING), (TrialState.FAIL, TrialState.RUNNING)):  # fmt: skip
        want = [(t.number, t.state, t.params) for t in plain.get_trials(deepcopy=False, states=states)]
        for study in (mine, other):
            got = study.get_trials(deepcopy=False, states=states)
            assert [(t.number, t.state, t.params) for t in got] == want, states
    assert [t.number for t in mine.get_trials(states=(TrialState.WAITING,))] == [12]


def test_parameters_go_with_the_next_write_in_one_commit(tmp_path):
    """A trial's parameters and its plan: one commit, seen whole by another worker; a trial that ends
    without any attribute written still has its parameters."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, other = _study(url), _study(url)
    commits = _commits(study)
    trial = study.ask()
    params = {name: trial.suggest_int(name, 0, 20) for name in ("a", "b", "c", "d")}
    before = commits[0]
    set_user_attrs(trial, {"plan": "0-10,5-20", "n_layers": 25})
    assert commits[0] - before == 1
    time.sleep(SweepStorage.FRESH_SECONDS)
    (seen,) = other.get_trials(deepcopy=False)
    assert seen.params == params and seen.user_attrs == {"plan": "0-10,5-20", "n_layers": 25}
    set_user_attrs(trial, {"n_layers": 26, "ppl": 11.5})  # rewritten and added in one statement
    time.sleep(SweepStorage.FRESH_SECONDS)
    assert other.get_trials(deepcopy=False)[0].user_attrs == {
        "plan": "0-10,5-20",
        "n_layers": 26,
        "ppl": 11.5,
    }
    study.tell(trial, 1.0)

    bare = study.ask()
    x = bare.suggest_int("x", 0, 5)
    study.tell(bare, 2.0)
    assert optuna.load_study(study_name="s", storage=url).trials[1].params == {"x": x}


def test_a_worker_sees_another_s_writes_at_most_fresh_seconds_late_and_at_once_after_its_own(tmp_path):
    """Reads within FRESH_SECONDS of the last, with no write of this worker between, are not sent again;
    a write of its own (as the twin check writes its plan before it reads) makes the next read fresh."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    mine, other = _study(url), _study(url)
    mine.enqueue_trial({"x": 1})
    assert len(other.get_trials(deepcopy=False)) == 1
    mine.enqueue_trial({"x": 2})
    assert len(other.get_trials(deepcopy=False)) == 1  # read just now: not sent again
    time.sleep(SweepStorage.FRESH_SECONDS)
    assert len(other.get_trials(deepcopy=False)) == 2
    mine.enqueue_trial({"x": 3})
    trial = other.ask()  # takes a waiting trial: a write, so the read after it is sent
    assert trial.number == 0 and len(other.get_trials(deepcopy=False)) == 3
    waiting = [
        t.system_attrs["fixed_params"]["x"]
        for t in mine.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    ]
    assert waiting == [2, 3]  # mine wrote last: its read is fresh and trial 0 is taken


def test_a_parameter_of_another_kind_is_refused_and_nothing_is_written(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(url)
    first = study.ask()
    first.suggest_int("a", 0, 5)
    study.tell(first, 1.0)
    trial = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        study._storage.set_trial_param(
            trial._trial_id, "a", 0.5, optuna.distributions.FloatDistribution(0, 1)
        )
    study._storage.set_trial_param(trial._trial_id, "b", 2, IntDistribution(0, 5))
    set_user_attrs(trial, {"plan": "p"})
    assert optuna.load_study(study_name="s", storage=url).trials[1].params == {"b": 2}
