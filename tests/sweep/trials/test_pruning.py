"""Stopping trials early: successive halving on a bench objective's items (prune.min_items), on the bundled
model, and the settings it refuses."""

import json

import pandas as pd
import pytest

from evals.base import Stage
from evals.bench import BenchConfig, BenchEval
from evals.llama_cpp_model import LlamaCppModel
from evals.schema import Field
from merge_core.errors import SelfMergeError
from sweep.config import PruneConfig, compose, load_config
from sweep.study.open import load_study

from conftest import run_cli


def test_item_steps_grow_by_the_reduction_factor_below_the_budget():
    assert PruneConfig(min_items=25).item_steps(100) == (25, 50)
    assert PruneConfig(min_items=10, reduction_factor=3).item_steps(100) == (10, 30, 90)
    assert PruneConfig(min_items=100).item_steps(100) == ()
    assert PruneConfig().item_steps(100) == ()
    for bad, message in (({"min_items": -3}, "prune.min_items=-3 is out of range"),
                         ({"min_items": 5, "reduction_factor": 1},
                          "prune.reduction_factor=1 is out of range")):  # fmt: skip
        with pytest.raises(SelfMergeError, match=message):
            PruneConfig(**bad)
    refused = r"prune.min_items=25 .* set sweep.objectives to one of \['bench'\]"
    with pytest.raises(SelfMergeError, match=refused):
        load_config(compose(["eval=[ppl,bench]", "prune.min_items=25"]))  # objectives: ppl and bench


def test_a_bench_record_stops_after_a_step_with_the_items_scored_so_far(base_gguf):
    config = BenchConfig(tasks=("arc_easy", "piqa"), n_items=6)
    staged = BenchEval(config, LlamaCppModel, item_steps=(2, 4))
    asked: list[Stage] = []
    stopped = staged.record(base_gguf, None, stop_early=lambda stage: asked.append(stage) or stage.step == 4)
    assert [(s.field, s.step) for s in asked] == [(Field.BENCH, 2), (Field.BENCH, 4)]
    assert stopped[Field.PRUNED] is True and {t["n"] for t in stopped[Field.BENCH_TASKS].values()} == {4}
    assert asked[-1].value == stopped[Field.BENCH]  # what the pruner was told is what the record keeps
    whole = staged.record(base_gguf, None)  # never told to stop: every item, the same as unstaged
    plain = BenchEval(config, LlamaCppModel).record(base_gguf, None)
    assert Field.PRUNED not in whole and whole[Field.BENCH_TASKS] == plain[Field.BENCH_TASKS]
    by_id = {row["id"]: row for row in plain[Field.BENCH_ITEMS]}
    assert all(by_id[row["id"]] == row for row in stopped[Field.BENCH_ITEMS])  # the first items of each task


def test_successive_halving_stops_outranked_plans_and_keeps_their_partial_scores(base_gguf, tmp_path):
    """10 plans, 8 items per task, halving from 2: a plan goes on past a step only while it ranks in the
    best half of the plans that reached the step before it (Optuna's asynchronous rule)."""
    args = ["sweep", f"model.path={base_gguf}", "model=gguf", "eval=[bench]", "eval.bench.n_items=8",
            "prune.min_items=2", "sampler=random", "sweep.n_trials=10", "sweep.validate.top_k=0",
            "sweep.name=halving", "sweep.seed=1", f"sweep.results_dir={tmp_path}",
            "sweep.progress=false"]  # fmt: skip
    run = run_cli(*args, cwd=tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stdout + run.stderr, run.stderr
    study = load_study(f"sqlite:///{tmp_path / 'halving' / 'study.db'}", "halving")
    trials = [t for t in study.get_trials() if t.intermediate_values and Field.CACHE_HIT_OF not in t.user_attrs]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and any(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:
        done = {task["n"] for task in trial.user_attrs[Field.BENCH_TASKS].values()}
        last = max(trial.intermediate_values)
        assert done == ({last} if trial in pruned else {8}), trial.number
        if trial in pruned:  # what the pruner was told is the score the leaderboard shows
            assert trial.intermediate_values[last] == pytest.approx(trial.user_attrs[Field.BENCH], abs=1e-4)
    for trial in pruned:  # below the k-th best (k = half, at least 1) of the plans that reached its step first
        step = max(trial.intermediate_values)
        value = trial.intermediate_values[step]
        reached = [t for t in trials if t.number <= trial.number and step in t.intermediate_values]
        before = [t.intermediate_values[step] for t in reached]
        k = max(len(before) // 2, 1)
        assert value < sorted(before, reverse=True)[k - 1], trial.number
    board = pd.read_csv(tmp_path / "halving" / "leaderboard.csv")
    assert set(board["state"]) >= {"BASE", "COMPLETE", "PRUNED"}
    states = list(board["state"])
    assert states.index("PRUNED") > max(i for i, s in enumerate(states) if s == "COMPLETE")
    record = json.loads((tmp_path / "halving" / "trials" / f"{pruned[0].number}.json").read_text())
    assert record["state"] == "PRUNED" and record[Field.BENCH_N] == 2 * max(pruned[0].intermediate_values)


def test_bad_halving_settings_are_one_line_and_exit_2(base_gguf, tmp_path):
    for override, message in (("prune.min_items=-3", "prune.min_items=-3 is out of range: must be >= 1"),
                              ("prune.min_items=abc", "prune.min_items")):  # fmt: skip
        run = run_cli("sweep", "eval=[ppl,bench]", "sweep.objectives=[bench]", override,
                      f"sweep.results_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1 and message in lines[0], run.stdout + run.stderr
        assert lines[0].startswith("selfmerge: error:") and not list(tmp_path.iterdir())
