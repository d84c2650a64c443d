"""Search spaces: Optuna parameters -> a LayerPlan that honours every constraint, by construction.

A space names its integer parameters one after another (``next_param``) and turns a full set
into a plan (``plan_from_params``). Before each draw the space narrows the parameter's range to
the values from which at least one valid plan can still be completed, found by a memoised depth
first search over the (small) discrete space. So every draw leads to a valid plan: nothing is
sampled and thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional

import optuna

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from sweep.constraints import PlanConstraints

Params = tuple[tuple[str, int], ...]


class SearchSpace:
    """Base class: subclasses define ``next_param`` and ``plan_from_params``."""

    def __init__(self, n_base_layers: int, constraints: PlanConstraints) -> None:
        self.n_base_layers = n_base_layers
        self.constraints = constraints
        self._feasible = lru_cache(maxsize=None)(self._feasible_uncached)
        self._completable = lru_cache(maxsize=None)(self._completable_uncached)

    # -- to define in a space ---------------------------------------------------------------
    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        """(name, low, high) of the parameter drawn after ``params``, or None when complete."""
        raise NotImplementedError

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        """The plan these parameters describe, or None if they describe no plan at all."""
        raise NotImplementedError

    def derived(self, plan: LayerPlan) -> dict[str, int]:
        """Figures worth recording beside the parameters (e.g. the resulting last slice size)."""
        return {"last_size": plan.slice_sizes[-1]}

    # -- shared machinery -----------------------------------------------------------------
    def _valid(self, params: Params) -> Optional[LayerPlan]:
        try:
            plan = self.plan_from_params(dict(params))
        except SelfMergeError:
            return None
        if plan is None or self.constraints.violations(plan, self.n_base_layers):
            return None
        return plan

    def _completable_uncached(self, params: Params) -> bool:
        spec = self.next_param(params)
        if spec is None:
            return self._valid(params) is not None
        return bool(self._feasible(params))

    def _feasible_uncached(self, params: Params) -> tuple[int, ...]:
        name, low, high = self.next_param(params)
        return tuple(v for v in range(low, high + 1) if self._completable(params + ((name, v),)))

    def suggest(self, trial: optuna.trial.BaseTrial) -> LayerPlan:
        """Draw parameters from ``trial`` in ranges that always complete to a valid plan."""
        params: Params = ()
        while (spec := self.next_param(params)) is not None:
            name = spec[0]
            values = self._feasible(params)
            if not values:
                raise SelfMergeError(self._empty_message())
            value = trial.suggest_int(name, values[0], values[-1])
            if value not in values:  # a gap inside the range: take the nearest value that completes
                value = min(values, key=lambda v: (abs(v - value), v))
            params += ((name, value),)
        return self._valid(params)

    def iter_params(self, params: Params = ()) -> Iterator[tuple[Params, LayerPlan]]:
        """Every valid parameter set with its plan (several sets may give one plan)."""
        if self.next_param(params) is None:
            plan = self._valid(params)
            if plan is not None:
                yield params, plan
            return
        name = self.next_param(params)[0]
        for value in self._feasible(params):
            yield from self.iter_params(params + ((name, value),))

    def enumerate_plans(self, limit: int = 1_000_000) -> tuple[list[LayerPlan], bool]:
        """Distinct valid plans in enumeration order, and whether the list is complete (<= limit)."""
        seen: dict[str, LayerPlan] = {}
        for _, plan in self.iter_params():
            seen.setdefault(str(plan), plan)
            if len(seen) > limit:
                return list(seen.values())[:limit], False
        return list(seen.values()), True

    def check_not_empty(self) -> None:
        if not self._completable(()):
            raise SelfMergeError(self._empty_message())

    def _empty_message(self) -> str:
        return f"the search space has no valid plan for a {self.n_base_layers}-layer model under these constraints: {self.constraints}"


def _range(values, name: str) -> tuple[int, int]:
    low, high = (int(v) for v in values)
    if low > high:
        raise SelfMergeError(f"space.{name}=[{low}, {high}] is empty: low must be <= high")
    if low < 0:
        raise SelfMergeError(f"space.{name}=[{low}, {high}] is out of range: values must be >= 0")
    return low, high


@dataclass(frozen=True)
class UniformSpaceConfig:
    first_size: tuple[int, int] = (4, 20)
    middle_size: tuple[int, int] = (6, 16)
    jump: tuple[int, int] = (3, 8)
    n_middle: tuple[int, int] = (0, 4)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class UniformSpace(SearchSpace):
    """First slice F, then ``n_middle`` equal slices of size S, then the last slice to the end;
    every slice starts J layers before the previous one ended. The last slice's size follows:
    ``L = n_base - F + J - n_middle * (S - J)``, and the output has ``n_base + (n_middle + 1) * J`` layers.

    Example on 30 layers: F=10, J=4, S=10, n_middle=2 -> ``0-10,6-16,12-22,18-30``.
    """

    ORDER = ("first_size", "jump", "middle_size", "n_middle")

    def __init__(self, n_base_layers: int, config: UniformSpaceConfig) -> None:
        super().__init__(n_base_layers, config.constraints)
        self.ranges = {name: _range(getattr(config, name), name) for name in self.ORDER}
        if self.ranges["first_size"][0] < 1 or self.ranges["middle_size"][0] < 1:
            raise SelfMergeError("space.first_size and space.middle_size must be >= 1")

    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        if len(params) == len(self.ORDER):
            return None
        name = self.ORDER[len(params)]
        return (name, *self.ranges[name])

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        first, jump, middle, n_middle = (params[name] for name in self.ORDER)
        if first >= self.n_base_layers:
            return None
        slices, end = [(0, first)], first
        for _ in range(n_middle):
            start = end - jump
            if start < 0:
                return None
            slices.append((start, start + middle))
            end = start + middle
        last_start = end - jump
        if not 0 <= last_start < self.n_base_layers or end > self.n_base_layers:
            return None
        slices.append((last_start, self.n_base_layers))
        return LayerPlan(tuple(slices))


SPACES = {"uniform": (UniformSpace, UniformSpaceConfig)}


def build_space(kind: str, n_base_layers: int, config) -> SearchSpace:
    if kind not in SPACES:
        raise SelfMergeError(f"unknown space {kind!r}; choose one of {sorted(SPACES)}")
    space_cls, _ = SPACES[kind]
    space = space_cls(n_base_layers, config)
    space.check_not_empty()
    return space


def sample_plans(space: SearchSpace, n: int, seed: int = 0) -> list[LayerPlan]:
    """``n`` plans drawn uniformly by Optuna's RandomSampler through the same ``suggest`` path."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return plans
