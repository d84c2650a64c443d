"""The machinery every search space shares: parameters -> a LayerPlan valid by construction.

A space names its integer parameters one after another (``next_param``, define-by-run: the next
name may depend on earlier values) with a *static* range each, and turns a full set into a plan
(``plan_from_params``). Static ranges keep the search space fixed, which every Optuna sampler
needs (CMA-ES, grid, multivariate TPE). Validity comes from a repair step: after each draw, the
value moves to the nearest value from which a valid plan can still be completed. Those values
come from a memoised depth-first search over the small discrete space, so a sampler never
proposes a plan that is then thrown away.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Iterator, Optional

import optuna

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints

Params = tuple[tuple[str, int], ...]


def checked_range(values, name: str, ceiling: Optional[int] = None) -> tuple[int, int]:
    """A config range [low, high]; ``high`` is clipped to ``ceiling`` (e.g. the model's depth)."""
    low, high = (int(v) for v in values)
    if low > high:
        raise SelfMergeError(f"space.{name}=[{low}, {high}] is empty: low must be <= high")
    if low < 0:
        raise SelfMergeError(f"space.{name}=[{low}, {high}] is out of range: values must be >= 0")
    return low, high if ceiling is None else max(low, min(high, ceiling))


class SearchSpace:
    #: distinct parameter sets always give distinct plans (then plans are counted without listing them)
    injective = True

    def __init__(self, shape: ModelShape, constraints: PlanConstraints) -> None:
        self.shape = shape
        self.n_base_layers = shape.n_layers
        self.constraints = constraints
        self._memo: dict[Hashable, int] = {}

    # -- to define in a space ---------------------------------------------------------------
    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        """(name, low, high) of the parameter drawn after ``params``, or None when complete."""
        raise NotImplementedError

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        """The plan these parameters describe, or None if they describe no plan."""
        raise NotImplementedError

    def state_key(self, params: Params) -> Hashable:
        """Prefixes with equal keys have the same valid completions (memo key of the search).
        The default, the prefix itself, is always right; spaces with many parameters override it."""
        return params

    def derived(self, plan: LayerPlan) -> dict[str, int]:
        """Figures worth recording beside the parameters."""
        return {"last_size": plan.slice_sizes[-1], "n_slices": len(plan.slices)}

    # -- validity ---------------------------------------------------------------------------
    def valid_plan(self, params: Params) -> Optional[LayerPlan]:
        try:
            plan = self.plan_from_params(dict(params))
        except SelfMergeError:
            return None
        if plan is None or self.constraints.violations(plan, self.shape):
            return None
        return plan

    def _count(self, params: Params) -> int:
        """Number of valid parameter sets that complete ``params``, memoised by its state."""
        key = self.state_key(params)
        if key not in self._memo:
            self._memo[key] = self._count_uncached(params)
        return self._memo[key]

    def _count_uncached(self, params: Params) -> int:
        spec = self.next_param(params)
        if spec is None:
            return int(self.valid_plan(params) is not None)
        name, low, high = spec
        return sum(self._count(params + ((name, v),)) for v in range(low, high + 1))

    def feasible_values(self, params: Params) -> list[int]:
        name, low, high = self.next_param(params)
        return [v for v in range(low, high + 1) if self._count(params + ((name, v),))]

    # -- sampling ---------------------------------------------------------------------------
    def suggest(self, trial: optuna.trial.BaseTrial) -> LayerPlan:
        """Draw each parameter from its static range, repaired to the nearest completable value."""
        params: Params = ()
        repaired = {}
        while (spec := self.next_param(params)) is not None:
            name, low, high = spec
            values = self.feasible_values(params)
            if not values:
                raise SelfMergeError(self.empty_message())
            drawn = trial.suggest_int(name, low, high)
            value = min(values, key=lambda v: (abs(v - drawn), v))
            if value != drawn:
                repaired[name] = value
            params += ((name, value),)
        if repaired:
            trial.set_user_attr("repaired_params", repaired)
        return self.valid_plan(params)

    # -- enumeration ------------------------------------------------------------------------
    def count_param_sets(self) -> int:
        return self._count(())

    def iter_params(self, params: Params = ()) -> Iterator[tuple[Params, LayerPlan]]:
        """Every valid parameter set with its plan, in order."""
        spec = self.next_param(params)
        if spec is None:
            plan = self.valid_plan(params)
            if plan is not None:
                yield params, plan
            return
        for value in self.feasible_values(params):
            yield from self.iter_params(params + ((spec[0], value),))

    def enumerate_plans(self, limit: int = 1_000_000) -> tuple[dict[str, Params], bool]:
        """Distinct valid plans (canonical text -> first parameters giving it), and whether complete."""
        plans: dict[str, Params] = {}
        for params, plan in self.iter_params():
            plans.setdefault(str(plan), params)
            if len(plans) >= limit:
                return plans, False
        return plans, True

    def count_plans(self, limit: int = 1_000_000) -> tuple[int, bool]:
        """(number of distinct valid plans, exact?). Injective spaces count without listing; others
        list up to ``limit`` plans and otherwise give the parameter-set count as an upper bound."""
        if self.injective:
            return self.count_param_sets(), True
        plans, complete = self.enumerate_plans(limit)
        return (len(plans), True) if complete else (self.count_param_sets(), False)

    def params_for(self, plan: LayerPlan, limit: int = 1_000_000) -> Optional[dict[str, int]]:
        """Parameters that give ``plan`` in this space, if the space holds it."""
        for params, candidate in self.iter_params():
            if candidate == plan:
                return dict(params)
            limit -= 1
            if limit <= 0:
                return None
        return None

    def check_not_empty(self) -> None:
        if not self._count(()):
            raise SelfMergeError(self.empty_message())

    def empty_message(self) -> str:
        return f"the search space has no valid plan for a {self.n_base_layers}-layer model under these constraints: {self.constraints}"


class FixedSpace(SearchSpace):
    """A space whose parameters are always the same, drawn in ``ORDER`` from ``self.ranges``."""

    ORDER: tuple[str, ...] = ()
    ranges: dict[str, tuple[int, int]]

    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        if len(params) == len(self.ORDER):
            return None
        name = self.ORDER[len(params)]
        return (name, *self.ranges[name])
