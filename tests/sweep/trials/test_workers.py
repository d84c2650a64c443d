"""Several local workers of one sweep, each on its own GPUs (sweep/trials/workers.py), checked on the CPU
with fake GPU lists: which GPUs each worker gets, the errors that name the bad value, what each
worker's backend is asked to load, and a real two-worker sweep started by ``sweep.workers=2``."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import fast_overrides, run_cli
from merge_core.errors import SelfMergeError
from sweep.trials import runner, workers
from sweep.config import compose, load_config
from sweep.study.open import load_study

EIGHT = list(range(8))


@pytest.mark.parametrize(
    "gpus, per_worker, visible, groups",
    [
        ("all", 1, EIGHT, [(i,) for i in EIGHT]),
        ("all", 2, EIGHT, [(0, 1), (2, 3), (4, 5), (6, 7)]),
        ("all", 4, [0, 1, 2, 3], [(0, 1, 2, 3)]),
        (2, 1, EIGHT, [(0,), (1,)]),
        ([6, 2, 4], 1, EIGHT, [(6,), (2,), (4,)]),
        ([3, 1], 2, [0, 1, 2, 3], [(3, 1)]),
        (None, 1, EIGHT, []),
    ],
)
def test_gpus_are_split_into_one_group_per_worker(gpus, per_worker, visible, groups):
    assert workers.gpu_groups(gpus, per_worker, visible) == groups


@pytest.mark.parametrize(
    "gpus, per_worker, visible, message",
    [
        ("all", 1, [], "sweep.gpus=all but torch sees 0 GPUs"),
        (3, 1, [0, 1], "sweep.gpus=3 asks for 3 GPUs but torch sees 2 GPUs (0, 1)"),
        (0, 1, [0, 1], "sweep.gpus=0 asks for 0 GPUs"),
        ([0, 5], 1, [0, 1], "sweep.gpus=[0, 5]: GPU 5 is not visible; torch sees 2 GPUs (0, 1)"),
        ([1, 1], 1, [0, 1], "sweep.gpus=[1, 1] names a GPU twice"),
        ("all", 3, [0, 1, 2, 3], "sweep.gpus_per_worker=3 does not divide the 4 GPUs of sweep.gpus=all"),
        ("some", 1, [0], "sweep.gpus='some' is not a GPU choice"),
        ([0.5], 1, [0], "is not a GPU choice"),
    ],
)
def test_a_bad_gpu_choice_names_the_value(gpus, per_worker, visible, message):
    with pytest.raises(
        SelfMergeError,
        match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
    ):
        workers.gpu_groups(gpus, per_worker, visible)


def test_each_worker_takes_its_group_in_turn():
    groups = workers.gpu_groups("all", 2, EIGHT)
    assert [workers.gpus_of(i, groups) for i in range(6)] == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1), (2, 3)]
    assert workers.gpus_of(None, groups) == (0, 1)  # a single run takes the first group
    assert workers.gpus_of(3, []) is None  # GPUs not pinned: backend.device decides
    assert workers.n_workers(None, groups) == 4 and workers.n_workers(None, []) == 1
    assert workers.n_workers(8, groups) == 8  # two workers a GPU pair: 8 workers over 4 groups


def test_the_launcher_exits_with_the_first_failed_worker_s_status():
    assert workers.exit_status({0: 0, 1: 0}) == 0
    assert workers.exit_status({0: 0, 1: -signal.SIGKILL, 2: 2}) == 137  # as a shell reports a kill
    assert workers.exit_status({0: 2, 1: 0}) == 2


def _config(tmp_path, *overrides):
    return load_config(compose([f"sweep.results_dir={tmp_path}", *overrides]))


def test_worker_settings_are_checked_with_the_key_named(tmp_path):
    with pytest.raises(SelfMergeError, match="sweep.gpus=all pins workers to GPUs for backend=torch"):
        _config(tmp_path, "sweep.gpus=all")  # backend=llama_cpp: llama.cpp runs on the CPU here
    with pytest.raises(SelfMergeError, match="sweep.workers=0 is out of range"):
        _config(tmp_path, "sweep.workers=0")
    with pytest.raises(SelfMergeError, match="sweep.gpus_per_worker=0 is out of range"):
        _config(tmp_path, "backend=torch", "sweep.gpus=all", "sweep.gpus_per_worker=0")
    with pytest.raises(
        SelfMergeError, match=r"backend.device_map='everywhere' is unknown; choose one of \['auto'"
    ):
        _config(tmp_path, "backend=torch", "backend.device_map=everywhere")
    with pytest.raises(SelfMergeError, match="backend.device_map='auto' needs backend=torch"):
        _config(tmp_path, "+backend.device_map=auto")
    # worker i samples with seed + i, so workers started with one seed do not propose the same plans
    assert _config(tmp_path, "sweep.seed=7", "sweep.worker=3").sweep.sampler_seed == 10


def test_each_worker_loads_its_model_on_its_own_gpus(tmp_path, monkeypatch):
    """A sweep of worker 1 with sweep.gpus=all over 2 GPUs each, on a fake 4-GPU machine: the backend
    is asked for GPUs (2, 3) and the device map; a GPU that is not there is refused before loading."""
    asked = []

    class Loaded(Exception):
        pass

    def make_backend(model, config, work_dir, base_source=None, gpus=None):
        asked.append((gpus, config.device_map))
        raise Loaded

    monkeypatch.setattr(workers, "visible_gpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(runner, "make_backend", make_backend)
    overrides = ["backend=torch", "backend.device_map=auto", "sweep.gpus=all", "sweep.gpus_per_worker=2"]
    for worker in (0, 1, 2, None):
        with pytest.raises(Loaded):
            runner.Sweep(
                _config(tmp_path, *overrides, f"sweep.worker={'null' if worker is None else worker}")
            )
    assert asked == [((0, 1), "auto"), ((2, 3), "auto"), ((0, 1), "auto"), ((0, 1), "auto")]
    with pytest.raises(SelfMergeError, match="GPU 7 is not visible"):
        runner.Sweep(_config(tmp_path, "backend=torch", "sweep.gpus=[1,7]"))
    assert len(asked) == 4  # refused before any model was loaded


def test_sweep_workers_starts_local_workers_on_one_study(tmp_path, wikitext_file):
    """``sweep.workers=2``: two processes on one study with their own seeds, the leaderboard printed
    once when both are done; no GPU needed (backend=llama_cpp)."""
    overrides = fast_overrides("pair", wikitext_file, 6, tmp_path) + [
        "sweep.workers=2",
        "prune.max_ppl_ratio=null",
    ]
    out = run_cli("sweep", *overrides, cwd=tmp_path, check=True, timeout=900)
    assert "2 workers on sweep pair" in out.stderr
    assert out.stdout.count("leaderboard: ") == 1 and out.stdout.count("rank trial") == 1
    study = load_study(f"sqlite:///{tmp_path / 'pair' / 'study.db'}", "pair")
    done = [t for t in study.get_trials() if t.state.is_finished()]
    scored = [t for t in done if "cache_hit_of" not in t.user_attrs]
    assert len({t.user_attrs["plan"] for t in scored}) == len(scored) >= 6  # no plan scored twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both worked on it
    # both workers' trial records and the one leaderboard are in the sweep's folder
    assert len(list((tmp_path / "pair" / "trials").glob("*.json"))) == len(done)


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_retried_by_the_other(tmp_path, wikitext_file):
    """SIGKILL one of two workers inside a trial: the other goes on, fails the dead worker's trial once
    its heartbeat is stale and retries it with the same plan; the launcher prints the leaderboard and
    exits 137 (the killed worker's status, as a shell reports it)."""
    overrides = fast_overrides("kill", wikitext_file, 8, tmp_path) + [
        "sweep.workers=2", "prune.max_ppl_ratio=null", "storage.heartbeat_seconds=2"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "sweep.cli", "sweep", *overrides]
    launcher = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url, deadline, victim = f"sqlite:///{tmp_path / 'kill' / 'study.db'}", time.time() + 300, None
    while victim is None:
        assert time.time() < deadline and launcher.poll() is None, "no trial ever ran"
        time.sleep(0.5)
        try:
            running = load_study(url, "kill").get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except SelfMergeError:  # not created yet
            continue
        victim = next((t for t in running if "worker" in t.user_attrs and t.number >= 1), None)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-2000:]
    assert "was killed (signal 9)" in err and out.count("rank trial") == 1
    trials = {t.number: t for t in load_study(url, "kill").get_trials()}
    assert trials[victim.number].state == optuna.trial.TrialState.FAIL
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retries = [t for t in trials.values() if retried(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].user_attrs["plan"] == victim.user_attrs["plan"]
    assert retries[0].user_attrs["worker"] != victim.user_attrs["worker"]
