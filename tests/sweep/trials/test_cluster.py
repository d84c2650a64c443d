"""The cluster path: a sweep through hydra-submitit-launcher (the plugin and config layer that
``hydra/launcher=slurm`` uses) with submitit's local executor, ``hydra/launcher=slurm_local``: each job a
process that submitit starts, watches and collects. Two jobs share one study; one is killed in a trial."""

import os
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from merge_core.errors import SelfMergeError
from sweep.study.open import load_study
from sweep.study.retries import retried_number

from conftest import fast_overrides

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")


def _multirun(tmp_path, wikitext_file, n_trials: int, *extra: str) -> subprocess.Popen:
    overrides = [o for o in fast_overrides("job", wikitext_file, n_trials, tmp_path) if not o.startswith("sweep.name")]
    command = [sys.executable, "-m", "sweep.cli", "sweep", "-m", "hydra/launcher=slurm_local", "sweep.seed=0,1",
               "sweep.name=job", "prune.max_ppl_ratio=null", *overrides, *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _job_logs(tmp_path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "job" / "submitit").glob("*/*_log.*"))


@pytest.mark.slow
def test_two_submitit_jobs_share_one_study(tmp_path, wikitext_file):
    proc = _multirun(tmp_path, wikitext_file, 6)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    trials = load_study(f"sqlite:///{tmp_path / 'job' / 'study.db'}", "job").get_trials()
    scored = [t for t in trials if t.state.is_finished() and "cache_hit_of" not in t.user_attrs]
    assert len({t.user_attrs["plan"] for t in scored}) == len(scored) >= 6  # no plan scored twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both jobs worked on it
    logs = _job_logs(tmp_path)
    assert logs.count("base model SmolLM2") == 1 and "is being scored by worker" in logs  # the base once
    assert len(list((tmp_path / "job" / "submitit").glob("*/*_result.pkl"))) == 2  # submitit collected both


@pytest.mark.slow
def test_a_killed_submitit_job_s_trial_is_retried_by_the_other(tmp_path, wikitext_file):
    """SIGKILL one job inside a trial: the other fails that trial once its heartbeat is stale and retries
    its plan; the multirun ends with one error line naming the job that did not finish."""
    proc = _multirun(tmp_path, wikitext_file, 8, "storage.heartbeat_seconds=2")
    url, deadline, victim = f"sqlite:///{tmp_path / 'job' / 'study.db'}", time.time() + 300, None
    while victim is None:
        assert time.time() < deadline and proc.poll() is None, "no trial ever ran"
        time.sleep(0.5)
        try:
            running = load_study(url, "job").get_trials(states=(TrialState.RUNNING,))
        except SelfMergeError:  # not created yet
            continue
        victim = next((t for t in running if "plan" in t.user_attrs), None)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    lines = [line for line in err.splitlines() if line.strip() and "[HYDRA]" not in line]
    assert proc.returncode == 1 and "Traceback" not in err + _job_logs(tmp_path), err[-3000:]
    assert lines[-1].startswith("selfmerge: error: a job of this multirun did not finish (Job ") and len(lines) == 1
    trials = {t.number: t for t in load_study(url, "job").get_trials()}
    assert trials[victim.number].state == TrialState.FAIL
    [retry] = [t for t in trials.values() if retried_number(t) == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["plan"] == victim.user_attrs["plan"]
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
