"""Sweep-level search behaviour: dedup of identical plans, grid, enqueue, several objectives."""

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from merge_core import SelfMergeError
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.layer_plan import LayerPlan
from sweep.config import compose, load_config
from sweep.records import pareto_flags
from sweep.runner import Sweep

from conftest import fast_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)
# repeat_block with 2 x 2 parameter values: 4 plans, so a few trials must repeat plans
TINY_SPACE = ["space=repeat_block", "space.block_start=[10,11]", "space.block_size=[3,4]"]


def _sweep(tmp_path, text, name, n_trials, *extra):
    overrides = fast_overrides(name, text, n_trials, tmp_path) + ["eval.ppl.windows=1", *extra]
    return Sweep(load_config(compose(overrides)))


def _count_evaluations(monkeypatch):
    from evals.ppl_eval import PerplexityEval

    scored = []
    real = PerplexityEval.staged

    def counting(self, path, *args, **kwargs):
        scored.append(path.name)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(PerplexityEval, "staged", counting)
    return scored


@pytest.mark.slow
def test_identical_plans_are_scored_once(tmp_path, wikitext_file, monkeypatch):
    scored = _count_evaluations(monkeypatch)
    study = _sweep(tmp_path, wikitext_file, "dedup", 9, *TINY_SPACE, "trial.isolate=false").run()
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    plans = {t.user_attrs["plan"] for t in trials}
    hits = [t for t in trials if "cache_hit_of" in t.user_attrs]
    assert len(trials) == 9 and len(plans) <= 4 and len(hits) == 9 - len(plans)
    assert len(scored) == 1 + len(plans)  # the base, then each distinct plan once
    for hit in hits:
        first = study.trials[hit.user_attrs["cache_hit_of"]]
        assert hit.values == first.values and hit.user_attrs["plan"] == first.user_attrs["plan"]
        assert hit.user_attrs["eval_seconds"] == 0.0
    board = pd.read_csv(tmp_path / "dedup" / "leaderboard.csv").set_index("trial")
    for hit in hits:  # a plan proposed again shares its first trial's rank
        assert board.loc[str(hit.number), "rank"] == board.loc[str(hit.user_attrs["cache_hit_of"]), "rank"]
    assert sorted(board.loc[board["cache_hit_of"].isna() & (board["state"] == "COMPLETE"), "rank"]) == list(range(1, len(plans) + 1))


@pytest.mark.slow
def test_grid_scores_every_plan_once_then_stops(tmp_path, wikitext_file):
    study = _sweep(tmp_path, wikitext_file, "grid", 50, *TINY_SPACE, "sampler=grid").run()
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.user_attrs["plan"] for t in trials) == ["0-13,10-30", "0-14,10-30", "0-14,11-30", "0-15,11-30"]
    again = _sweep(tmp_path, wikitext_file, "grid2", 50, *TINY_SPACE, "sampler=grid", "sweep.seed=7").run()
    order = [t.user_attrs["plan"] for t in trials]
    assert sorted(order) == sorted(t.user_attrs["plan"] for t in again.trials)
    assert order != [t.user_attrs["plan"] for t in again.trials] or len(order) < 3  # the seed shuffles the order


@pytest.mark.slow
def test_enqueued_plans_are_scored_first(tmp_path, wikitext_file):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(plan_to_mergekit_yaml(LayerPlan.parse("0-20,15-30"), "HuggingFaceTB/SmolLM2-135M-Instruct"))
    study = _sweep(tmp_path, wikitext_file, "seeded", 3, f"sweep.enqueue=[\"0-16,8-30\",{recipe}]").run()
    assert [t.user_attrs["plan"] for t in study.trials[:2]] == ["0-16,8-30", "0-20,15-30"]
    assert study.trials[0].user_attrs["enqueued"] == "0-16,8-30"
    assert len(study.trials) == 3  # resuming does not enqueue them again
    again = _sweep(tmp_path, wikitext_file, "seeded", 4, f"sweep.enqueue=[\"0-16,8-30\",{recipe}]").run()
    assert [t.user_attrs["plan"] for t in again.trials].count("0-16,8-30") == 1


def test_enqueued_plans_outside_the_rules_or_space_are_refused(tmp_path, wikitext_file):
    with pytest.raises(SelfMergeError, match=r"plan 0-16,8-26 breaks the space's rules: plan must start at layer 0 and end at layer 30"):
        _sweep(tmp_path, wikitext_file, "bad", 1, "sweep.enqueue=[\"0-16,8-26\"]")
    with pytest.raises(SelfMergeError, match="is not in space 'repeat_block'"):
        _sweep(tmp_path, wikitext_file, "bad", 1, "space=repeat_block", "sweep.enqueue=[\"0-10,6-16,12-22,18-30\"]")
    with pytest.raises(SelfMergeError, match=r"slice 2 \(8-34\) ends past layer 30"):
        _sweep(tmp_path, wikitext_file, "bad", 1, "sweep.enqueue=[\"0-16,8-34\"]")


def test_pareto_flags():
    points = [(10.0, 30), (11.0, 40), (12.0, 35), (9.0, 50), (9.0, 50)]
    assert pareto_flags(points, ["minimize", "minimize"]) == [True, False, False, True, True]
    assert pareto_flags(points, ["minimize", "maximize"]) == [False, False, False, True, True]


@pytest.mark.slow
def test_two_objectives_with_nsga2_mark_the_pareto_front(tmp_path, wikitext_file):
    study = _sweep(tmp_path, wikitext_file, "pareto", 6, "sampler=nsga2", "sweep.objectives=[ppl,n_layers]").run()
    assert len(study.directions) == 2
    board = pd.read_csv(tmp_path / "pareto" / "leaderboard.csv")
    merged = board[board["state"] == "COMPLETE"]
    front = {(r.ppl, r.n_layers) for r in merged.itertuples() if r.pareto}
    for r in merged.itertuples():
        dominated = any(p <= r.ppl and n <= r.n_layers and (p, n) != (r.ppl, r.n_layers) for p, n in front)
        assert r.pareto == (not dominated)
    with pytest.raises(SelfMergeError, match="optimises"):
        _sweep(tmp_path, wikitext_file, "pareto", 7, "sampler=nsga2").run()


@pytest.mark.slow
def test_cmaes_sweep_runs(tmp_path, wikitext_file):
    study = _sweep(tmp_path, wikitext_file, "cma", 4, "sampler=cmaes", "sampler.n_startup_trials=2").run()
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
