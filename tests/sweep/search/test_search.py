"""Sweep-level search behaviour: dedup of identical plans, grid, enqueue, several objectives."""

import optuna
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.trial import TrialState

from merge_core import SelfMergeError
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.layer_plan import LayerPlan
from sweep.config import compose, load_config
from sweep.results.records import pareto_flags
from sweep.trials.runner import Sweep

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
def test_identical_plans_are_scored_once_and_an_exhausted_space_stops(tmp_path, wikitext_file, monkeypatch, caplog):
    scored = _count_evaluations(monkeypatch)
    sweep = _sweep(tmp_path, wikitext_file, "dedup", 9, *TINY_SPACE, "trial.isolate=false", "sweep.max_repeats_in_a_row=3")
    with caplog.at_level("INFO", logger="selfmerge"):
        study = sweep.run()
    assert "sweep stops: all 4 plans of space 'repeat_block' are scored" in caplog.text
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    plans = {t.user_attrs["plan"] for t in trials}
    hits = [t for t in trials if "cache_hit_of" in t.user_attrs]
    assert len(plans) == 4 and len(trials) - len(hits) == 4  # n_trials=9 asks for more plans than the space has
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
def test_repeats_do_not_count_and_an_unscored_plan_is_drawn(tmp_path, wikitext_file):
    space = ["space=uniform", "space.first_size=[8,12]", "space.jump=[3,4]", "space.n_middle=[0,0]"]
    overrides = [*space, "trial.isolate=false", "sweep.max_repeats_in_a_row=1", "sampler=tpe", "sampler.n_startup_trials=1"]
    study = _sweep(tmp_path, wikitext_file, "draw", 5, *overrides).run()
    distinct = [t for t in study.trials if t.state.is_finished() and "cache_hit_of" not in t.user_attrs]
    assert len(distinct) == 5 and len({t.user_attrs["plan"] for t in distinct}) == 5  # n_trials counts distinct plans
    assert any(t.user_attrs.get("drawn") == "uniform" for t in study.trials)  # TPE repeated itself here
    for trial in study.trials[1:]:  # after a repeat, the next trial is an unscored plan drawn uniformly
        if "cache_hit_of" in study.trials[trial.number - 1].user_attrs:
            assert trial.user_attrs.get("drawn") == "uniform" and "cache_hit_of" not in trial.user_attrs


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


@pytest.mark.slow
def test_a_sweep_searches_attenuated_repeats_and_reads_back_the_mergekit_recipe(tmp_path, wikitext_file):
    """space.scale.out: the same stack scored with and without its factor (enqueued, one as a mergekit
    recipe with mergekit's scale filters), then drawn; the factor is a recorded parameter and changes
    the score; a factor outside the choices is not in the space."""
    recipe = tmp_path / "recipe.yml"
    from merge_core.architectures import find

    scaled = LayerPlan.parse("0-13,10-30@out=0.5")
    recipe.write_text(plan_to_mergekit_yaml(scaled, "HuggingFaceTB/SmolLM2-135M-Instruct", arch=find("LlamaForCausalLM")))
    scale = [*TINY_SPACE, "space.scale.out=[0.5,1.0]", "trial.isolate=false"]
    study = _sweep(tmp_path, wikitext_file, "scaled", 4, *scale, f"sweep.enqueue=[\"0-13,10-30\",{recipe}]").run()
    first, second = study.trials[:2]
    assert (first.user_attrs["plan"], second.user_attrs["plan"]) == ("0-13,10-30", str(scaled))
    assert (first.params["scale_out"], second.params["scale_out"]) == (1, 0)
    assert first.values != second.values
    assert all(LayerPlan.parse(t.user_attrs["plan"]).scales.attn_out in (0.5, 1.0) for t in study.trials)
    with pytest.raises(SelfMergeError, match="is not in space 'repeat_block'"):
        _sweep(tmp_path, wikitext_file, "bad", 1, *scale, "sweep.enqueue=[\"0-13,10-30@out=0.25\"]")


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


@given(
    st.lists(st.tuples(st.sampled_from([1.0, 2.0, 2.5, 3.0]), st.sampled_from([18, 30, 36, 40]), st.floats(0, 1)),
             min_size=1, max_size=40),
    st.lists(st.sampled_from(["minimize", "maximize"]), min_size=3, max_size=3),
)  # fmt: skip
def test_pareto_flags_follow_the_definition_with_ties(points, directions):
    """The sort for two objectives (and the comparison for three) against the definition itself."""
    for width in (2, 3):
        keyed = [tuple(v if d == "minimize" else -v for v, d in zip(p[:width], directions)) for p in points]
        expected = [not any(all(o <= m for o, m in zip(other, mine)) and other != mine for other in keyed) for mine in keyed]
        assert pareto_flags([p[:width] for p in points], directions[:width]) == expected


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
def test_damage_is_recorded_and_can_be_an_objective(tmp_path, wikitext_file):
    study = _sweep(tmp_path, wikitext_file, "damage", 3, "sampler=nsga2", "eval.ppl.kld=true", "sweep.objectives=[ppl,kld]").run()
    board = pd.read_csv(tmp_path / "damage" / "leaderboard.csv")
    merged = board[board["state"] == "COMPLETE"]
    assert board.loc[board["state"] == "BASE", "kld"].item() == 0 and (merged["kld"] > 0).all()
    assert ((merged["top1_agreement"] > 0) & (merged["top1_agreement"] < 1)).all()
    assert [t.values[1] for t in study.trials if t.values] == [t.user_attrs["kld"] for t in study.trials if t.values]
    with pytest.raises(SelfMergeError, match="kld needs eval.ppl.kld=true"):
        _sweep(tmp_path, wikitext_file, "nodamage", 1, "sweep.objectives=[ppl,kld]")


@pytest.mark.slow
def test_cmaes_sweep_runs(tmp_path, wikitext_file):
    study = _sweep(tmp_path, wikitext_file, "cma", 4, "sampler=cmaes", "sampler.n_startup_trials=2").run()
    assert sum(t.state.is_finished() and "cache_hit_of" not in t.user_attrs for t in study.trials) == 4


def test_windowed_tpe_sees_the_best_and_the_latest_trials():
    from optuna.distributions import IntDistribution

    from sweep.search.windowed import WindowedSampler

    study = optuna.create_study()
    values = [((7 * n) % 1000) / 10 for n in range(2500)]
    study.add_trials([optuna.trial.create_trial(value=v, params={"x": int(v)}, distributions={"x": IntDistribution(0, 100)})
                      for v in values])  # fmt: skip
    sampler = WindowedSampler(optuna.samplers.TPESampler(seed=0, multivariate=True, group=True), size=300, minimize=True)
    seen = sampler._view(study, study.trials[-1])._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    numbers = {t.number for t in seen}
    best = sorted(range(2500), key=lambda n: (values[n], n))[:300]
    assert len(seen) <= 600 and set(range(2200, 2500)) <= numbers and set(best) <= numbers
    study.sampler = sampler
    reads = []
    study_get_trials = study._get_trials
    study._get_trials = lambda *a, **k: reads.append(k.get("states")) or study_get_trials(*a, **k)
    trial = study.ask()
    assert 0 <= trial.suggest_int("x", 0, 100) <= 100  # TPE samples through the window
    assert 0 <= trial.suggest_int("y", 0, 9) <= 9
    assert len(reads) == len(set(map(str, reads))) <= 3  # each query read once for the whole ask
    # the grouped search space is shown each trial once, and comes out as if shown the whole window
    window = sampler._view(study, trial)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert sampler._in_search_space == {t.number for t in window}
    assert numbers - sampler._in_search_space <= {2200}  # the running trial pushed the oldest out of the latest
    whole = optuna.samplers.TPESampler(multivariate=True, group=True).infer_relative_search_space(
        WindowedSampler(None, 300, True)._view(study, trial), trial)  # fmt: skip
    assert sampler.infer_relative_search_space(study, study.ask()) == whole == {"x": IntDistribution(0, 100)}


def test_a_trial_that_finishes_after_later_ones_still_joins_the_best():
    """Another worker's trial may run while later ones finish: the window looks at it again until it
    finishes (it used to skip past it for good, so a best plan found that way was out of TPE's view)."""
    from optuna.distributions import IntDistribution

    from sweep.search.windowed import _Window

    study, x = optuna.create_study(), {"x": IntDistribution(0, 100)}
    bad = lambda n: [optuna.trial.create_trial(value=50.0 + i, params={"x": i}, distributions=x) for i in range(n)]  # noqa: E731
    study.add_trials(bad(10))
    slow = study.ask()  # trial 10, running while 10 more finish
    study.add_trials(bad(10))
    window = _Window(3, minimize=True)
    first = window.select(study.get_trials(deepcopy=False))
    assert slow.number in {t.number for t in first}  # running: kept for the constant liar
    study.tell(slow, 1.0)  # the best of all, once it finishes
    study.add_trials(bad(5))
    chosen = {t.number for t in window.select(study.get_trials(deepcopy=False))}
    assert slow.number in chosen and chosen >= {23, 24, 25}
    assert len(chosen) <= 6


def test_a_record_is_written_in_one_commit(tmp_path):
    import sqlalchemy

    from sweep.study.optuna_private import set_user_attrs
    from sweep.study.storage import make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", 60)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    commits = []
    sqlalchemy.event.listen(storage._backend.engine, "commit", lambda connection: commits.append(1))
    record = {"plan": "0-16,8-30", "n_layers": 38, "ppl": 12.5, "eval_seconds": 3.2, "pruned": False}
    set_user_attrs(trial, record)
    assert len(commits) == 1 and trial.user_attrs == record
    set_user_attrs(trial, {"ppl": 12.25})  # an attribute written again is replaced
    study.tell(trial, 12.25)
    stored = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}").trials[0]
    assert stored.user_attrs == {**record, "ppl": 12.25}
    with pytest.raises(RuntimeError, match="finished"):  # Optuna's own guard holds: a finished trial is not changed
        set_user_attrs(trial, {"ppl": 1.0})


def test_study_index_counts_distinct_plans_and_learns_incrementally():
    from sweep.study.index import StudyIndex

    study = optuna.create_study()
    make = optuna.trial.create_trial
    study.add_trial(make(value=12.0, user_attrs={"plan": "0-16,8-30", "ppl": 12.0}))
    study.add_trial(make(value=12.0, user_attrs={"plan": "0-16,8-30", "ppl": 12.0, "cache_hit_of": 0}))
    study.add_trial(make(state=TrialState.FAIL, user_attrs={"plan": "0-20,10-30"}))
    index = StudyIndex(("ppl", "minimize"))
    index.refresh(study)
    assert (index.n_done, index.n_cache_hits, index.n_failed, index.best) == (2, 1, 1, 12.0)
    assert index.scored == {"0-16,8-30": 0}
    study.add_trial(make(state=TrialState.WAITING, system_attrs={"failed_trial": 2, "retry_history": [2]}))
    study.add_trial(make(value=11.0, user_attrs={"plan": "0-12,6-30", "ppl": 11.0}))
    index.refresh(study)  # the retry cancels its failure's count; the new plan counts
    assert (index.n_done, index.best, index.waiting) == (2, 11.0, True)
    assert index.scored == {"0-16,8-30": 0, "0-12,6-30": 4}
