"""Every plan a space yields honours every constraint, checked by a checker written here."""

from collections import Counter

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_core import LayerPlan, SelfMergeError
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces import SPACES, FreeSpace, FreeSpaceConfig, GrowingSpace, GrowingSpaceConfig, RepeatBlockSpace
from sweep.search.spaces import RepeatBlockSpaceConfig, UniformSpace, UniformSpaceConfig, build_space, sample_plans
from sweep.search.spaces import ScaleSpaceConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
SMOLLM2 = ModelShape(30, params_per_layer=3_540_096, params_outside_layers=28_312_128)


def independent_check(plan: LayerPlan, shape: ModelShape, c: PlanConstraints) -> None:
    """The rules restated from the issue, apart from sweep.search.constraints on purpose."""
    n = shape.n_layers
    slices = plan.slices
    assert slices[0][0] == 0 and slices[-1][1] == n
    layers = [layer for a, b in slices for layer in range(a, b)]
    assert all(0 <= layer < n for layer in layers)
    if c.last_min is not None:
        assert slices[-1][1] - slices[-1][0] >= c.last_min
    if c.max_repeats is not None:
        assert max(Counter(layers).values()) <= c.max_repeats
    for (a0, b0), (a1, _) in zip(slices, slices[1:]):
        if c.jump_min is not None:
            assert b0 - a1 >= c.jump_min
        if c.jump_max_fraction is not None:
            assert b0 - a1 <= c.jump_max_fraction * (b0 - a0)
    assert layers[: c.keep_first] == list(range(min(c.keep_first, n)))
    if c.keep_last:
        assert layers[-c.keep_last :] == list(range(n - c.keep_last, n))
    if c.min_layers is not None:
        assert len(layers) >= c.min_layers
    if c.max_layers is not None:
        assert len(layers) <= c.max_layers
    if c.max_params_ratio is not None:
        params = shape.params_outside_layers + len(layers) * shape.params_per_layer
        assert params <= c.max_params_ratio * (shape.params_outside_layers + n * shape.params_per_layer)


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
    max_params_ratio=st.one_of(st.none(), st.sampled_from([1.2, 1.5, 2.0])),
)


@pytest.mark.parametrize("kind", sorted(SPACES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(constraints=constraint_settings, n_base=st.sampled_from([24, 30, 32]), seed=st.integers(0, 10_000))
def test_a_thousand_sampled_plans_per_space_are_all_valid(kind, constraints, n_base, seed):
    shape = ModelShape(n_base, 1000, 3000)
    config = SPACES[kind][1](constraints=constraints)
    if kind == "free":  # keep the free space small enough to search in a test
        config = FreeSpaceConfig(n_slices=(2, 4), constraints=constraints)
    try:
        space = build_space(kind, shape, config)
    except SelfMergeError as err:
        assert "no valid plan" in str(err)
        if kind != "free":  # the free space's static product is too large to walk here
            assert space_is_empty_by_brute_force(SPACES[kind][0](shape, config))
        return
    for plan in sample_plans(space, 25, seed=seed):
        independent_check(plan, shape, constraints)


def space_is_empty_by_brute_force(space) -> bool:
    return not any(True for _ in brute_force_params(space))


def brute_force_params(space):
    """Every parameter set of the static ranges whose plan the checker accepts (no search tricks)."""

    def walk(params):
        spec = space.next_param(params)
        if spec is None:
            plan = space.plan_from_params(dict(params))
            if plan is not None and not space.constraints.violations(plan, space.shape):
                yield params, plan
            return
        name, low, high = spec
        for value in range(low, high + 1):
            yield from walk(params + ((name, value),))

    return walk(())


@pytest.mark.parametrize(
    "space",
    [
        UniformSpace(ModelShape(18), UniformSpaceConfig(first_size=(4, 10), middle_size=(6, 10), n_middle=(0, 3))),
        GrowingSpace(ModelShape(24), GrowingSpaceConfig()),
        RepeatBlockSpace(ModelShape(24), RepeatBlockSpaceConfig(block_size=(1, 10))),
        FreeSpace(ModelShape(20), FreeSpaceConfig(n_slices=(2, 4), size=(4, 10), jump=(2, 6))),
        FreeSpace(ModelShape(16), FreeSpaceConfig(n_slices=(2, 4), constraints=PlanConstraints(max_layers=24, keep_first=5))),
    ],
    ids=["uniform", "growing", "repeat_block", "free", "free-with-depth-rules"],
)
def test_counting_matches_brute_force(space):
    brute = list(brute_force_params(space))
    assert space.count_param_sets() == len(brute)
    plans, complete = space.enumerate_plans()
    assert complete and set(plans) == {str(plan) for _, plan in brute}
    count, exact = space.count_plans()
    assert exact and count == len(plans)


def test_space_examples_of_the_docs():
    assert str(UniformSpace(SMOLLM2, UniformSpaceConfig()).plan_from_params({"first_size": 10, "jump": 4, "middle_size": 10, "n_middle": 2})) == "0-10,6-16,12-22,18-30"
    assert str(GrowingSpace(SMOLLM2, GrowingSpaceConfig()).plan_from_params({"start_size": 6, "growth": 2, "jump": 3})) == "0-6,3-11,8-18,15-27,24-30"
    assert str(RepeatBlockSpace(SMOLLM2, RepeatBlockSpaceConfig()).plan_from_params({"block_start": 10, "block_size": 6})) == "0-16,10-30"
    free = FreeSpace(SMOLLM2, FreeSpaceConfig())
    assert str(free.plan_from_params({"n_slices": 3, "size_1": 12, "jump_2": 4, "size_2": 10, "jump_3": 5})) == "0-12,8-18,13-30"


def test_default_space_sizes_on_smollm2():
    counts = {kind: build_space(kind, SMOLLM2, SPACES[kind][1]()).count_plans() for kind in SPACES}
    assert counts.pop("uniform") == (711, True) and counts.pop("interleave") == (8, True)  # one size, one overlap
    assert all(exact and 50 <= count <= 1_000_000 for count, exact in counts.values()), counts


def test_spaces_over_two_sources():
    """Each space draws a model per slice (9,616 plans of the default space over two), except
    interleave, which alternates them and picks the first and the last slice's model."""
    uniform = build_space("uniform", SMOLLM2, UniformSpaceConfig(), ("a", "b"))
    assert uniform.count_plans() == (9616, True)
    plans = sample_plans(uniform, 30, seed=0)
    assert all(len(p.sources) == len(p.slices) and set(p.sources) <= {"a", "b"} for p in plans)
    assert any(len(p.source_names) == 2 for p in plans) and any(len(p.source_names) == 1 for p in plans)
    interleave = build_space("interleave", SMOLLM2, SPACES["interleave"][1](), ("a", "b"))
    assert interleave.count_plans() == (32, True)
    params = {"slice_size": 10, "overlap": 4, "first_source": 1, "last_source": 0}
    assert str(interleave.plan_from_params(params)) == "b:0-10,a:6-16,b:12-22,a:18-28,a:20-30"
    assert all(p.sources[:-1] == tuple("ab" * 9)[p.sources[0] == "b" :][: len(p.slices) - 1]
               for p in sample_plans(interleave, 20, seed=1))  # fmt: skip


def test_over_several_sources_a_layer_repeats_per_source():
    """max_repeats=1: no plan of one model (every jump overlaps), but over a/b each overlap can take its
    layers from the other model. Counted as brute force over the rule restated here, and sampled."""
    config = UniformSpaceConfig(first_size=(4, 10), middle_size=(6, 10), n_middle=(0, 2),
                                constraints=PlanConstraints(max_repeats=1))  # fmt: skip
    with pytest.raises(SelfMergeError, match="no valid plan"):
        build_space("uniform", ModelShape(18), config)
    two = build_space("uniform", ModelShape(18), config, ("a", "b"))

    def once_per_source(plan):
        return plan is not None and max(Counter(plan.layer_sources).values()) == 1

    brute = [params for params, plan in brute_force_params(two) if once_per_source(plan)]
    assert two.count_param_sets() == len(brute) > 0
    plans = sample_plans(two, 40, seed=2)
    assert all(once_per_source(p) and all(x != y for x, y in zip(p.sources, p.sources[1:])) for p in plans)


def test_tpe_cmaes_random_and_nsga2_only_ever_see_valid_plans():
    constraints = PlanConstraints(keep_first=4, keep_last=6, max_params_ratio=1.5)
    space = build_space("uniform", SMOLLM2, UniformSpaceConfig(constraints=constraints))
    samplers = [
        optuna.samplers.RandomSampler(seed=1),
        optuna.samplers.TPESampler(seed=1, n_startup_trials=5, multivariate=True, group=True),
        optuna.samplers.CmaEsSampler(seed=1, n_startup_trials=5),
        optuna.samplers.NSGAIISampler(seed=1),
    ]
    for sampler in samplers:
        study = optuna.create_study(sampler=sampler)

        def objective(trial):
            plan = space.suggest(trial)
            independent_check(plan, SMOLLM2, constraints)
            return abs(plan.n_layers - 40) + plan.slice_sizes[0] / 10  # any landscape

        study.optimize(objective, n_trials=250)


def test_repaired_values_are_recorded():
    space = build_space("uniform", SMOLLM2, UniformSpaceConfig())
    study = optuna.create_study()
    study.enqueue_trial({"first_size": 4, "jump": 8, "middle_size": 6, "n_middle": 4})  # jump 8 > first_size/2
    trial = study.ask()
    plan = space.suggest(trial)
    assert plan.backward_jumps[0] == 3 and trial.user_attrs["repaired_params"]["jump"] == 3


def test_params_for_inverts_plan_from_params():
    space = build_space("free", SMOLLM2, FreeSpaceConfig())
    plan = LayerPlan.parse("0-12,8-18,13-30")
    params = space.params_for(plan)
    assert space.plan_from_params(params) == plan
    assert build_space("repeat_block", SMOLLM2, RepeatBlockSpaceConfig()).params_for(plan) is None


def test_empty_space_and_bad_ranges_are_clear_errors():
    with pytest.raises(SelfMergeError, match="no valid plan for a 30-layer model"):
        build_space("uniform", SMOLLM2, UniformSpaceConfig(constraints=PlanConstraints(last_min=40)))
    with pytest.raises(SelfMergeError, match=r"space.jump=\[9, 3\] is empty"):
        UniformSpace(SMOLLM2, UniformSpaceConfig(jump=(9, 3)))
    with pytest.raises(SelfMergeError, match="unknown space 'spiral'"):
        build_space("spiral", SMOLLM2, UniformSpaceConfig())
    with pytest.raises(SelfMergeError, match="last_min=0 is out of range"):
        PlanConstraints(last_min=0)
    with pytest.raises(SelfMergeError, match="max_params_ratio=0 is out of range"):
        PlanConstraints(max_params_ratio=0)


def test_scaled_spaces_draw_factors_for_repeating_plans_only():
    """space.scale: counted as brute force; every sampled plan's factors are among the choices, and a plan
    that repeats no layer (a free space may jump 0) draws none. Off, the space is today's, unwrapped."""
    free = FreeSpaceConfig(n_slices=(1, 3), size=(4, 10), jump=(0, 4), constraints=PlanConstraints(jump_min=0))
    plain = build_space("free", ModelShape(16), free)
    scale = ScaleSpaceConfig(qk=[1.0, 0.5], out={"low": 0.25, "high": 0.75, "step": 0.25})
    scaled = build_space("free", ModelShape(16), free, scale=scale)
    assert type(build_space("free", ModelShape(16), free, scale=ScaleSpaceConfig())) is type(plain)
    brute = list(brute_force_params(scaled))
    plans = {str(plan): plan for _, plan in brute}
    repeating = [plan for _, plan in brute_force_params(plain) if plan.max_repeats > 1]
    assert 0 < len(repeating) < plain.count_param_sets()
    assert scaled.count_plans() == (len(brute), True) == (plain.count_param_sets() + 5 * len(repeating), True)
    for plan in plans.values():
        assert (plan.max_repeats > 1) == (not plan.scales.is_identity)
        if plan.max_repeats > 1:
            assert plan.scales.qk in (0.5, 1.0) and plan.scales.attn_out == plan.scales.mlp_out in (0.25, 0.5, 0.75)
    sampled = sample_plans(scaled, 40, seed=0)
    assert all(str(plan) in plans for plan in sampled)
    assert {p.scales.attn_out for p in sampled if p.max_repeats > 1} == {0.25, 0.5, 0.75}
    target = next(p for p in plans.values() if p.scales.qk == 0.5)
    assert scaled.plan_from_params(scaled.params_for(target)) == target


@pytest.mark.parametrize(
    "scale, message",
    [({"qk": [0.5, 0]}, "space.scale.qk holds 0, not a positive number"),
     ({"out": [0.5, 0.5]}, "space.scale.out=.* repeats a factor"),
     ({"out": {"low": 0.5, "high": 1}}, r"space.scale.out=.* is a range \{low, high, step\}"),
     ({"qk": "half"}, "space.scale.qk='half' is neither a list of factors")],
)  # fmt: skip
def test_bad_scale_choices_name_the_setting(scale, message):
    with pytest.raises(SelfMergeError, match=message):
        ScaleSpaceConfig(**scale).choices()
