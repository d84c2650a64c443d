"""What a new user meets first: bad input refused on one line with nothing left behind, SIGTERM and
a full disk stopping cleanly, a damaged study rebuilt from its records, the leaderboard's columns."""

import json
import shutil
import signal
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from sweep.trials import model_store
from sweep.config import compose, load_config
from sweep.trials.runner import StopSweep, Sweep

from conftest import REPO, fast_overrides, run_cli, start_marked_sweep


def _distinct_done(study) -> int:
    """Distinct plans scored: what sweep.n_trials counts (not repeats, not the failed trial retried)."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "cache_hit_of" not in t.user_attrs for t in study.trials)


def _one_line_error(proc, fragment: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    assert proc.returncode == 2 and lines[-1].startswith("selfmerge: error:") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_refused_sweeps_leave_no_folder(tmp_path, wikitext_file):
    (tmp_path / "file.txt").write_text("not a folder")
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "num_hidden_layers": }')
    bad_yaml = tmp_path / "recipe.yml"
    bad_yaml.write_text("slices: [\n")
    results = tmp_path / "results"
    cases = {
        "yaml": ([f"sweep.enqueue=[{bad_yaml}]"], "mergekit recipe is not valid YAML: while parsing a flow node"),
        "hf_json": (["model=hf", f"model.path={bad_hf}"], f"{bad_hf}/config.json is not valid JSON: Expecting value at line 2"),
        "no_model": (["model.path=/no/such/model.gguf"], "model not found: /no/such/model.gguf"),
        "no_text": (["eval.ppl.text=/no/such/text.txt"], "perplexity text not found: /no/such/text.txt"),
        "tiny_budget": (["sweep.disk_budget=1KB"], "sweep.disk_budget=1KB is smaller than one merged file"),
    }
    for name, (overrides, fragment) in cases.items():
        base = [o for o in fast_overrides(name, wikitext_file, 2, results) if not o.startswith(tuple(f"{k.split('=')[0]}=" for k in overrides))]
        _one_line_error(run_cli("sweep", *base, *overrides, cwd=tmp_path), fragment)
        assert not (results / name).exists(), f"{name} left {sorted(p.name for p in (results / name).iterdir())}"
    unusable = run_cli("sweep", *fast_overrides("x", wikitext_file, 2, tmp_path / "file.txt"), cwd=tmp_path)
    _one_line_error(unusable, "cannot create the sweep folder")  # results_dir under a file, not a folder


@pytest.mark.slow
def test_sigterm_fails_the_running_trial_and_resumes_with_it(tmp_path, wikitext_file):
    results, marks = tmp_path / "results", tmp_path / "marks"
    proc = start_marked_sweep(results, wikitext_file, 4, marks, pause=2, until="eval-1")  # trial 1 merged, evaluating
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("selfmerge: error: stopped by SIGTERM: trial 1 (") and "is retried first" in last, stderr
    assert "Traceback" not in stderr
    folder = results / "killed"
    assert not (folder / "models" / "trial_1.gguf").exists() and not list((folder / "models").glob("*.partial"))
    assert json.loads((folder / "trials" / "1.json").read_text())["error"] == "stopped by SIGTERM"
    stopped_plan = json.loads((folder / "trials" / "1.json").read_text())["plan"]

    driver = [sys.executable, str(REPO / "tests" / "sweep_driver.py"), str(results), str(wikitext_file), "4", str(marks), "0"]
    rerun = subprocess.run(driver, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{folder / 'study.db'}")
    retry = study.trials[2]  # the next trial is the retry: same parameters, no error carried over
    assert retry.params == study.trials[1].params and retry.user_attrs["plan"] == stopped_plan
    assert retry.state == TrialState.COMPLETE and "error" not in retry.user_attrs
    assert _distinct_done(study) == 4


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_with_one_line_and_resumes(tmp_path, wikitext_file, monkeypatch):
    overrides = fast_overrides("full", wikitext_file, 4, tmp_path) + ["trial.isolate=false"]
    config = load_config(compose(overrides))
    real = shutil.disk_usage
    calls = []

    def filling_up(path):  # the disk fills up after two merges
        calls.append(path)
        usage = real(path)
        return usage._replace(free=5 * 2**20) if len(calls) > 2 else usage

    monkeypatch.setattr(model_store.shutil, "disk_usage", filling_up)
    with pytest.raises(StopSweep) as stopped:
        Sweep(config).run()
    folder = tmp_path / "full"
    message = stopped.value.message
    assert f"{folder / 'models'} is on a full disk: the next merge needs" in message and "5 MiB are free" in message
    assert "trial 2 (" in message and "rerun the same command to resume" in message
    assert not list((folder / "models").glob("*.partial"))
    monkeypatch.setattr(model_store.shutil, "disk_usage", real)  # space freed
    study = Sweep(config).run()
    assert study.trials[3].params == study.trials[2].params and study.trials[2].state == TrialState.FAIL
    assert _distinct_done(study) == 4


FILLING_UP = """
import shutil, sys
real, calls = shutil.disk_usage, []
def filling_up(path):  # the disk fills up after two merges
    calls.append(path)
    return real(path)._replace(free=5 * 2**20) if len(calls) > 2 else real(path)
shutil.disk_usage = filling_up
from sweep.cli import main
sys.exit(main())
"""


def test_a_full_disk_is_one_error_line_in_the_whole_output(tmp_path, wikitext_file):
    """What the user sees of a full disk: the sweep's own lines, then one ``selfmerge: error:`` line;
    no traceback and no Optuna warning about the trial the stop failed."""
    command = [sys.executable, "-c", FILLING_UP, "sweep", *fast_overrides("full", wikitext_file, 4, tmp_path)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "failed with parameters" not in output and "StopSweep" not in output
    assert [line for line in lines if "full disk" in line or "error" in line.lower()] == [lines[-1]], output
    assert lines[-1].startswith(f"selfmerge: error: {tmp_path / 'full' / 'models'} is on a full disk")
    assert "trial 2 (" in lines[-1] and "is retried first" in lines[-1]


@pytest.mark.slow
def test_damaged_study_is_one_line_and_rebuilt_from_its_records(tmp_path, wikitext_file):
    overrides = fast_overrides("dmg", wikitext_file, 4, tmp_path) + ["sampler=tpe", "sampler.n_startup_trials=2"]
    run_cli("sweep", *overrides, cwd=tmp_path, check=True)
    folder = tmp_path / "dmg"
    before = pd.read_csv(folder / "leaderboard.csv")
    assert not any(column.startswith(("eqbench", "lm_eval")) for column in before.columns)  # only the evals it ran
    raw = pd.read_csv(folder / "leaderboard.csv", dtype=str)
    for column in ("rank", "n_layers", "cache_hit_of"):  # integers written as integers, 3 not 3.0
        assert not raw[column].dropna().str.contains(".", regex=False).any(), raw[column]
    with open(folder / "study.db", "r+b") as db:  # bytes overwritten inside the file
        db.seek(4096)
        db.write(b"\xff" * 8192)
    for command in (["leaderboard", str(folder)], ["report", str(folder)], ["reproduce", str(folder), "--best", "--out", str(tmp_path / "x")]):
        _one_line_error(run_cli(*command, cwd=tmp_path), f"`selfmerge rebuild {folder}` makes the study again")
    rebuilt = run_cli("rebuild", str(folder), cwd=tmp_path, check=True)
    assert "4 trials (0 without a record)" in rebuilt.stdout and (folder / "study.db.damaged").exists()
    study = optuna.load_study(study_name="dmg", storage=f"sqlite:///{folder / 'study.db'}")  # Optuna's own loader
    assert {"objectives", "scoring", "base"} <= set(study.user_attrs)  # what optuna-dashboard shows
    assert all({"plan", "n_layers", "ppl"} <= set(t.user_attrs) for t in study.trials if t.state == TrialState.COMPLETE)
    run_cli("leaderboard", str(folder), cwd=tmp_path, check=True)
    rerun = run_cli("sweep", *overrides[:1], "sweep.n_trials=5", *overrides[2:], cwd=tmp_path, check=True)
    assert "base model" not in rerun.stderr  # resumed: the base is not scored again
    after = pd.read_csv(folder / "leaderboard.csv")
    kept = after[after["trial"].isin(before["trial"])].set_index("trial")[["plan", "ppl", "rank"]]
    assert len(after) == len(before) + 1
    pd.testing.assert_series_equal(kept["ppl"].sort_index(), before.set_index("trial")["ppl"].sort_index(), check_names=False)


def test_a_stop_before_the_plan_is_drawn_says_so_and_retries_nothing(tmp_path):
    """SIGTERM while the sampler draws: the trial has no plan, so there is nothing to retry (it said
    ``trial 11895 (None) is retried first``)."""
    from types import SimpleNamespace

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    study.tell(study.ask(), state=TrialState.FAIL)
    stop = StopSweep("stopped by SIGTERM", status=143)
    stop.trial_number = 0
    Sweep._after_stop(SimpleNamespace(directory=tmp_path), study, stop)
    assert stop.message == ("stopped by SIGTERM: trial 0 had not drawn its plan yet; finished trials are saved, "
                            "rerun the same command to resume")  # fmt: skip
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # no retry enqueued
    assert json.loads((tmp_path / "trials" / "0.json").read_text())["state"] == "FAIL"
