"""Plans a sweep scores first: ``sweep.enqueue`` (plan strings or mergekit YAML files) and, with
``space.prior=importance``, the cheapest plans by the base's layer importance (sweep/search/prior.py)."""

from __future__ import annotations

from pathlib import Path

import optuna

from evals.schema import Field, StudyKey
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import read_mergekit_yaml
from merge_core.model_shape import ModelShape
from sweep.config import SweepConfig
from sweep.search.spaces import SearchSpace


def plan_to_enqueue(entry: str, space: SearchSpace, shape: ModelShape, space_kind: str) -> tuple[LayerPlan, dict]:
    """A plan from text or a mergekit YAML, checked against the model, the rules and the space."""
    plan = read_mergekit_yaml(entry)[0] if entry.endswith((".yml", ".yaml")) else LayerPlan.parse(entry)
    plan.validate(shape.n_layers)
    problems = space.constraints.violations(plan, shape)
    if problems:
        raise SelfMergeError(f"sweep.enqueue: plan {plan} breaks the space's rules: {'; '.join(problems)}")
    params = space.params_for(plan)
    if params is None:
        raise SelfMergeError(f"sweep.enqueue: plan {plan} is not in space '{space_kind}' "
                             "(space=free holds any chain of slices)")  # fmt: skip
    return plan, params


def enqueue(study: optuna.Study, plans: list[tuple[LayerPlan, dict]], config: SweepConfig, space: SearchSpace,
            directory: Path) -> None:  # fmt: skip
    """Each once: Optuna skips a plan already enqueued; the prior's plans are added once per study."""
    for plan, params in plans:
        study.enqueue_trial(params, user_attrs={Field.ENQUEUED: str(plan)}, skip_if_exists=True)
    if config.space_prior != "importance" or study.user_attrs.get(StudyKey.PRIOR_ENQUEUED):
        return
    from sweep.search.prior import importance_for, prior_plans

    ppl = config.eval.get(Field.PPL)
    text, n_ctx = (ppl.text, ppl.n_ctx) if ppl else ("stdlib-docstrings", 512)
    importance = importance_for(directory, config.model.path, text, n_ctx)
    n = config.sampler.n_startup_trials or 5
    for rank, (plan, params) in enumerate(prior_plans(space, importance, n), 1):
        attrs = {Field.PRIOR_RANK: rank, Field.PRIOR_COST: importance.plan_cost(plan)}
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
    study.set_user_attr(StudyKey.PRIOR_ENQUEUED, True)
