"""Sweeps on the bundled model: resume after SIGKILL, failures recorded, nothing lost."""

import json
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from evals.perplexity import PerplexityResult
from sweep.config import compose, load_config
from sweep.runner import Sweep

from conftest import REPO, fast_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(results, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")


def _merged_trials(study, state=TrialState.COMPLETE):
    return study.get_trials(states=(state,))


@pytest.mark.slow
def test_sweep_killed_mid_trial_resumes_without_losing_or_repeating(tmp_path, wikitext_file):
    results = tmp_path / "results"
    command = [sys.executable, "-m", "sweep.cli", "sweep", *fast_overrides("resume", wikitext_file, 3, results)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_record = results / "resume" / "trials" / "0.json"
    deadline = time.monotonic() + 300
    while not first_record.exists():  # kill once trial 0 is saved and trial 1 is under way
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    before = _study(results, "resume")
    finished_before = {t.number: (t.user_attrs["plan"], t.value) for t in before.get_trials(states=(TrialState.COMPLETE,))}
    running = [t.number for t in before.get_trials(states=(TrialState.RUNNING,))]
    assert 0 in finished_before and "base" in before.user_attrs
    assert running, "the sweep was killed between trials; the test wants it mid-trial"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr

    after = _study(results, "resume")
    finished_after = {t.number: (t.user_attrs["plan"], t.value) for t in after.get_trials(states=(TrialState.COMPLETE,))}
    assert finished_before.items() <= finished_after.items()  # nothing finished was lost or changed
    killed = after.trials[running[0]]
    assert killed.state == TrialState.FAIL and "died" in killed.system_attrs["fail_reason"]
    retries = [t for t in after.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert len(_merged_trials(after)) == 3
    assert after.user_attrs["base"] == before.user_attrs["base"]  # the base was not scored again
    evaluated = [t.user_attrs["plan"] for t in _merged_trials(after) if "cache_hit_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))

    board = pd.read_csv(results / "resume" / "leaderboard.csv")
    assert set(board["trial"]) == {"base"} | {str(t.number) for t in after.trials if t.state.is_finished()}
    base_row = board.iloc[0]
    assert base_row["state"] == "BASE" and base_row["plan"] == "0-30" and base_row["ppl_vs_base"] == 1.0
    ranked = board[board["state"] == "COMPLETE"]
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1)) and list(ranked["ppl"]) == sorted(ranked["ppl"])
    assert json.loads((results / "resume" / "trials" / f"{killed.number}.json").read_text())["state"] == "FAIL"


@pytest.mark.slow
def test_failed_merges_and_nan_scores_are_recorded_and_the_sweep_goes_on(tmp_path, wikitext_file, monkeypatch):
    import sweep.runner as runner

    config = load_config(compose(fast_overrides("faults", wikitext_file, 4, tmp_path) + ["sweep.keep_top_k=1"]))
    calls = {"merge": 0}
    real_merge = runner.merge_gguf

    def flaky_merge(base, plan, out):
        calls["merge"] += 1
        if calls["merge"] == 1:
            raise RuntimeError("injected merge failure")
        return real_merge(base, plan, out)

    import sweep.scoring as scoring

    real_call = scoring.PerplexityEval.__call__

    def nan_once(self, path, progress=False):
        result = real_call(self, path, progress)
        if path.name == "trial_2.gguf":
            return PerplexityResult(float("nan"), result.n_windows, result.n_ctx, result.n_tokens_scored, result.n_tokens_evaluated, result.seconds)
        return result

    monkeypatch.setattr(runner, "merge_gguf", flaky_merge)
    monkeypatch.setattr(scoring.PerplexityEval, "__call__", nan_once)
    study = Sweep(config).run()

    failed = _merged_trials(study, TrialState.FAIL)
    assert {t.user_attrs["error"] for t in failed} == {"RuntimeError: injected merge failure", "ValueError: perplexity is nan"}
    assert len(_merged_trials(study)) == 2  # the other two trials ran to the end
    board = pd.read_csv(tmp_path / "faults" / "leaderboard.csv")
    assert set(board.loc[board["state"] == "FAIL", "error"]) == {t.user_attrs["error"] for t in failed}
    kept = sorted(p.name for p in (tmp_path / "faults" / "models").iterdir())
    best = min(_merged_trials(study), key=lambda t: t.values[0])
    assert kept == [f"trial_{best.number}.gguf"]  # keep_top_k=1: only the best merged file is left
