"""Every plan the space yields honours every constraint, checked by a checker of its own here."""

from collections import Counter

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_core import SelfMergeError
from sweep.constraints import PlanConstraints
from sweep.space import UniformSpace, UniformSpaceConfig, build_space, sample_plans

optuna.logging.set_verbosity(optuna.logging.WARNING)


def independent_check(plan, n_base, c: PlanConstraints) -> None:
    """Written apart from sweep.constraints on purpose: the rules, restated from the issue."""
    slices = plan.slices
    assert slices[0][0] == 0 and slices[-1][1] == n_base
    layers = [layer for a, b in slices for layer in range(a, b)]
    assert all(0 <= layer < n_base for layer in layers)
    if c.last_min is not None:
        assert slices[-1][1] - slices[-1][0] >= c.last_min
    if c.max_repeats is not None:
        assert max(Counter(layers).values()) <= c.max_repeats
    for (a0, b0), (a1, _) in zip(slices, slices[1:]):
        jump = b0 - a1
        if c.jump_min is not None:
            assert jump >= c.jump_min
        if c.jump_max_fraction is not None:
            assert jump <= c.jump_max_fraction * (b0 - a0)
    assert layers[: c.keep_first] == list(range(c.keep_first))
    if c.keep_last:
        assert layers[-c.keep_last :] == list(range(n_base - c.keep_last, n_base))
    if c.min_layers is not None:
        assert len(layers) >= c.min_layers
    if c.max_layers is not None:
        assert len(layers) <= c.max_layers


constraint_settings = st.builds(
    PlanConstraints,
    last_min=st.one_of(st.none(), st.integers(1, 10)),
    max_repeats=st.one_of(st.none(), st.integers(1, 3)),
    jump_min=st.one_of(st.none(), st.integers(0, 5)),
    jump_max_fraction=st.one_of(st.none(), st.sampled_from([0.3, 0.5, 0.75, 1.0])),
    keep_first=st.integers(0, 8),
    keep_last=st.integers(0, 8),
    min_layers=st.one_of(st.none(), st.integers(28, 36)),
    max_layers=st.one_of(st.none(), st.integers(36, 60)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(constraints=constraint_settings, n_base=st.sampled_from([24, 30, 32]), seed=st.integers(0, 1000))
def test_every_sampled_plan_is_valid(constraints, n_base, seed):
    try:
        space = build_space("uniform", n_base, UniformSpaceConfig(constraints=constraints))
    except SelfMergeError as err:
        assert "no valid plan" in str(err)
        return
    for plan in sample_plans(space, 40, seed=seed):
        independent_check(plan, n_base, constraints)


def test_thousand_plans_from_tpe_and_random_are_all_valid():
    constraints = PlanConstraints(keep_first=4, keep_last=6, max_layers=48)
    space = build_space("uniform", 30, UniformSpaceConfig(constraints=constraints))
    for sampler in (optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1, n_startup_trials=5, multivariate=True, group=True)):
        study = optuna.create_study(sampler=sampler)

        def objective(trial):
            plan = space.suggest(trial)
            independent_check(plan, 30, constraints)
            return plan.n_layers + sum(plan.slice_sizes[:1])  # any landscape

        study.optimize(objective, n_trials=500)


def test_enumeration_matches_brute_force():
    space = UniformSpace(30, UniformSpaceConfig())
    plans, complete = space.enumerate_plans()
    assert complete
    brute = set()
    for first in range(4, 21):
        for jump in range(3, 9):
            for middle in range(6, 17):
                for n_middle in range(5):
                    plan = space.plan_from_params({"first_size": first, "jump": jump, "middle_size": middle, "n_middle": n_middle})
                    if plan is not None and not space.constraints.violations(plan, 30):
                        brute.add(str(plan))
    assert {str(p) for p in plans} == brute
    assert "0-10,6-16,12-22,18-30" in brute and "0-16,8-30" in brute


def test_four_slice_example_of_the_docstring():
    space = UniformSpace(30, UniformSpaceConfig())
    plan = space.plan_from_params({"first_size": 10, "jump": 4, "middle_size": 10, "n_middle": 2})
    assert str(plan) == "0-10,6-16,12-22,18-30" and space.derived(plan) == {"last_size": 12}


def test_empty_space_and_bad_ranges_are_clear_errors():
    with pytest.raises(SelfMergeError, match="no valid plan for a 30-layer model"):
        build_space("uniform", 30, UniformSpaceConfig(constraints=PlanConstraints(last_min=40)))
    with pytest.raises(SelfMergeError, match=r"space.jump=\[9, 3\] is empty"):
        UniformSpace(30, UniformSpaceConfig(jump=(9, 3)))
    with pytest.raises(SelfMergeError, match="unknown space 'spiral'"):
        build_space("spiral", 30, UniformSpaceConfig())
    with pytest.raises(SelfMergeError, match="last_min=0 is out of range"):
        PlanConstraints(last_min=0)
