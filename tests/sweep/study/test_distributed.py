"""Several workers on one study, through Optuna's storages: a real PostgreSQL server on loopback,
a journal file, and the default SQLite file. A cheap objective stands in for the model
(tests/faults.py: CheapWork), so the point is the coordination: every trial recorded once, no plan
evaluated twice, a killed worker's trial retried, one leaderboard."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pandas as pd
import pytest

from conftest import REPO, fast_overrides, run_cli
from pg_server import PostgresServer, find_bin_dir
from sweep.study.open import load_study

DRIVER = REPO / "tests" / "worker_driver.py"
N_TRIALS = 12


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the distributed tests on PostgreSQL, but no pg_ctl/initdb was found (.ci/run installs it)")
        pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb) on this machine: apt install postgresql to run these tests")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["postgresql", "journal", "sqlite"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    if request.param == "journal":
        return f"journal:{tmp_path / 'shared' / 'journal.log'}"
    return f"sqlite:///{tmp_path / 'shared' / 'study.db'}"


def _workers(url, results, name, evaluations, n, delay=0.3, first=0, hang=False):
    """Start workers ``first``..``first+n-1``; all draw plans with one seed, so they meet on the same plans."""
    evaluations.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(first, first + n):
        args = [sys.executable, str(DRIVER), url, str(results / f"worker{i}"), name, str(N_TRIALS), str(evaluations), "0", str(delay)]
        procs.append(subprocess.Popen(args + (["hang"] if hang else []), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)  # the first creates the study and scores the base; the others join
    return procs


def _wait(procs, timeout=240):
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]


def test_three_workers_share_one_study(storage_url, tmp_path):
    evaluations = tmp_path / "evaluations"
    # 1 s an evaluation: one worker alone needs 12 s for the study, longer than the others take to start
    _wait(_workers(storage_url, tmp_path, "shared", evaluations, 3, delay=1.0))
    study = load_study(storage_url, "shared")
    trials = study.get_trials()
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= N_TRIALS
    assert all(t.state.is_finished() for t in trials)
    evaluated = Counter(marker.name.split("@")[0] for marker in evaluations.iterdir())
    assert evaluated and max(evaluated.values()) == 1, evaluated  # each plan scored by one worker only
    scored = {t.user_attrs["plan"] for t in trials if "cache_hit_of" not in t.user_attrs}
    assert scored == set(evaluated)
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # they shared it (a late third may find the study done)
    assert any(t.user_attrs.get("claim") == "wait" or "cache_hit_of" in t.user_attrs for t in trials)  # and met on plans
    # each worker wrote the leaderboard into its own folder; the last to finish saw every trial
    boards = [pd.read_csv(tmp_path / f"worker{i}" / "shared" / "leaderboard.csv") for i in range(3)]
    last = max(boards, key=len)
    assert sorted(last["trial"][last["trial"] != "base"].astype(int)) == sorted(t.number for t in trials)


def test_a_killed_worker_s_trial_is_retried_by_another(storage_url, tmp_path):
    evaluations = tmp_path / "evaluations"
    victim = _workers(storage_url, tmp_path, "killed", evaluations, 1, hang=True)[0]
    deadline = time.time() + 120
    while not list(evaluations.glob("hang@*")):  # the victim is inside its first trial
        assert time.time() < deadline and victim.poll() is None, "the victim never started a trial"
        time.sleep(0.2)
    victim_trial = int(next(evaluations.glob("hang@*")).name.split("@")[1])
    others = _workers(storage_url, tmp_path, "killed", evaluations, 2, first=1)
    victim.send_signal(signal.SIGKILL)
    _wait([victim, *others])
    trials = {t.number: t for t in load_study(storage_url, "killed").get_trials()}
    assert trials[victim_trial].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim_trial]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].user_attrs["plan"] == trials[victim_trial].user_attrs["plan"]
    assert all(t.state.is_finished() for t in trials.values())


def test_joblib_launcher_runs_three_local_workers_on_one_sweep(tmp_path, wikitext_file):
    """The documented way to start N workers on one machine: Hydra's joblib launcher, one job per seed."""
    overrides = fast_overrides("pool", wikitext_file, 6, tmp_path) + ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "sweep.seed=0,1,2"]
    run_cli("sweep", *overrides, cwd=tmp_path, check=True, timeout=600)
    study = load_study(f"sqlite:///{tmp_path / 'pool' / 'study.db'}", "pool")
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    assert len(finished) >= 6
    assert len({t.user_attrs["worker"] for t in finished}) >= 2  # the jobs ran side by side
    board = run_cli("leaderboard", str(tmp_path / "pool"), cwd=tmp_path, check=True)
    assert "base" in board.stdout


@pytest.mark.slow
def test_eight_workers_on_one_sqlite_file_never_run_one_trial_twice(tmp_path):
    """SQLite under the most load one host gives it: 8 workers whose evaluations take no time, all
    popping the same enqueued plans. Without BEGIN IMMEDIATE (sweep/study/open.py) two workers could both
    take one WAITING trial, and the second died on telling a finished trial (2 of 8 workers here)."""
    url, evaluations = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "evaluations"
    evaluations.mkdir()
    procs = [subprocess.Popen([sys.executable, str(DRIVER), url, str(tmp_path / f"worker{i}"), "busy", "150",
                               str(evaluations), str(i), "0"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for i in range(8)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    trials = load_study(url, "busy").get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 8
    evaluated = Counter(marker.name.split("@")[0] for marker in evaluations.iterdir())
    assert max(evaluated.values()) == 1, evaluated.most_common(3)  # no plan evaluated twice
    assert sum("cache_hit_of" not in t.user_attrs for t in trials) == sum(evaluated.values())
