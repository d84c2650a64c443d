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

from sweep.config import compose, load_config
from sweep.trials.runner import Sweep
from sweep.trials.trial_work import TrialWork

from conftest import REPO, fast_overrides, start_marked_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(results, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")


def _merged_trials(study, state=TrialState.COMPLETE):
    return study.get_trials(states=(state,))


def _finished(study):
    return {t.number: (t.user_attrs["plan"], t.state.name, t.values) for t in study.trials if t.state.is_finished()}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["merge", "eval", "between"])
def test_sweep_killed_at_any_point_resumes_without_losing_or_repeating(tmp_path, wikitext_file, phase):
    """SIGKILL the sweep (its own pid, as the OOM killer would) during a merge, during an
    evaluation, or between two trials; rerun: nothing finished is lost, nothing scored twice."""
    results, marks = tmp_path / "results", tmp_path / "marks"
    driver = [sys.executable, str(REPO / "tests" / "sweep_driver.py"), str(results), str(wikitext_file), "3", str(marks)]
    proc = subprocess.Popen(driver + ["3"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mark = marks / f"{phase}-1"  # trial 1's merge or evaluation, or the pause after trial 1
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    before = _study(results, "killed")
    running = [t.number for t in before.get_trials(states=(TrialState.RUNNING,))]
    assert "base" in before.user_attrs and (running == [] if phase == "between" else len(running) == 1)
    if phase == "eval":
        assert (results / "killed" / "models" / f"trial_{running[0]}.gguf").exists()

    rerun = subprocess.run(driver + ["0"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    after = _study(results, "killed")
    assert _finished(before).items() <= _finished(after).items()  # nothing finished was lost or changed
    assert after.user_attrs["base"] == before.user_attrs["base"]  # the base was not scored again
    for number in running:  # the killed trial: failed with its reason, retried once with its parameters
        killed = after.trials[number]
        assert killed.state == TrialState.FAIL and "died" in killed.system_attrs["fail_reason"]
        retries = [t for t in after.trials if t.system_attrs.get("failed_trial") == number]
        assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state.is_finished()
    done = [t for t in after.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "cache_hit_of" not in t.user_attrs]
    assert len(done) == 3  # sweep.n_trials counts distinct plans: repeats of scored plans do not
    evaluated = [t.user_attrs["plan"] for t in done]
    assert len(evaluated) == len(set(evaluated))  # no plan evaluated twice

    board = pd.read_csv(results / "killed" / "leaderboard.csv")
    assert set(board["trial"]) == {"base"} | {str(t.number) for t in after.trials if t.state.is_finished()}
    assert board.iloc[0]["state"] == "BASE" and board.iloc[0]["plan"] == "0-30" and board.iloc[0]["ppl_vs_base"] == 1.0
    ranked = board[(board["state"] == "COMPLETE") & board["cache_hit_of"].isna()]  # distinct plans, best first
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1)) and list(ranked["ppl"]) == sorted(ranked["ppl"])
    for number in running:
        assert json.loads((results / "killed" / "trials" / f"{number}.json").read_text())["state"] == "FAIL"


@pytest.mark.slow
def test_injected_failures_are_recorded_with_their_reasons_and_the_sweep_goes_on(tmp_path, wikitext_file):
    from faults import FaultyWork

    overrides = ["sweep.keep_top_k=1", "trial.timeout=30", "trial.max_memory=4GB"]
    config = load_config(compose(fast_overrides("faults", wikitext_file, 6, tmp_path) + overrides))
    study = Sweep(config, work_type=FaultyWork).run()

    errors = {t.number: t.user_attrs.get("error") for t in study.trials}
    assert errors[0] == "RuntimeError: injected merge failure"
    assert errors[1] == "timed out after 30 s (trial.timeout)"
    assert errors[2].startswith("child process died: SIGKILL")
    assert errors[3] == "ValueError: perplexity is nan"
    assert errors[4].startswith("out of memory (cap 4.0 GiB")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 5 + [TrialState.COMPLETE]
    board = pd.read_csv(tmp_path / "faults" / "leaderboard.csv")
    assert dict(zip(board.loc[board["state"] == "FAIL", "trial"].astype(int), board.loc[board["state"] == "FAIL", "error"])) == {
        n: e for n, e in errors.items() if n < 5
    }
    kept = sorted(p.name for p in (tmp_path / "faults" / "models").iterdir())
    assert kept == ["trial_5.gguf"]  # failed trials leave no file; keep_top_k=1 keeps the one merge


@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_trial_is_saved(tmp_path, wikitext_file):
    results, marks = tmp_path / "results", tmp_path / "marks"
    proc = start_marked_sweep(results, wikitext_file, 6, marks, pause=2, until="eval-1")
    proc.send_signal(signal.SIGINT)  # during trial 1's evaluation
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stops once the running trial is saved" in stderr
    study = _study(results, "killed")
    assert [t.number for t in study.trials] == [0, 1]  # trial 1 finished and saved; no trial 2 started
    assert all(t.state.is_finished() and t.state != TrialState.FAIL for t in study.trials)
    assert (results / "killed" / "trials" / "1.json").exists()


@pytest.mark.slow
def test_disk_budget_is_never_exceeded(tmp_path, wikitext_file, base_gguf):
    budget = int(2.6 * base_gguf.stat().st_size)  # room for two merged files, whatever their depth
    overrides = [f"sweep.disk_budget={budget}", "sweep.keep_top_k=5", "trial.isolate=false"]
    config = load_config(compose(fast_overrides("disk", wikitext_file, 5, tmp_path) + overrides))
    models = tmp_path / "disk" / "models"
    peak = []

    class Watched(TrialWork):
        def merge(self, plan, out):
            model = super().merge(plan, out)
            peak.append(sum(p.stat().st_size for p in models.glob("*.gguf*")))
            return model

    Sweep(config, work_type=Watched).run()
    assert len(peak) >= 3 and max(peak) <= budget
    assert len(list(models.glob("*.gguf"))) <= 2  # keep_top_k=5, but only two fit the budget
    small = load_config(compose(fast_overrides("disk2", wikitext_file, 1, tmp_path) + ["sweep.disk_budget=50MB"]))
    with pytest.raises(Exception, match=r"sweep.disk_budget=50MB is smaller than one merged file"):
        Sweep(small).run()


def test_a_sweep_from_before_a_new_setting_resumes_and_a_changed_setting_is_refused(tmp_path, wikitext_file):
    """A setting added since a sweep began (eval.ppl.kld) is read at its default, which scores as before."""
    from evals.schema import StudyKey
    from merge_core.errors import SelfMergeError

    overrides = fast_overrides("old", wikitext_file, 1, tmp_path) + ["eval.ppl.windows=1", "sweep.keep_top_k=0"]
    study = Sweep(load_config(compose(overrides))).run()
    scoring = study.user_attrs[StudyKey.SCORING]
    del scoring["eval"]["ppl"]["kld"]  # as a sweep written before eval.ppl.kld existed stored it
    study.set_user_attr(StudyKey.SCORING, scoring)
    resumed = Sweep(load_config(compose(overrides[:1] + ["sweep.n_trials=2"] + overrides[2:]))).run()
    assert len(_merged_trials(resumed)) >= 2
    with pytest.raises(SelfMergeError, match=r"cannot resume with other scoring \(eval.ppl.kld was False, now True\)"):
        Sweep(load_config(compose(overrides + ["eval.ppl.kld=true"]))).run()
