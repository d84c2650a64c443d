"""Any search space over several source models (``model.sources``, fine-tunes of one base): after the
space's own parameters, ``source_i`` picks slice i's model, an index into the source names. The
space's rules hold unchanged on the layers, except that a layer repeats per source (``max_repeats``
counts a's layer 8 and b's apart: different weights); the sampler learns which model each slice takes."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Optional

from merge_core.layer_plan import LayerPlan
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import Params, SearchSpace

SOURCE = "source_"  # source_0, source_1, ...: one per slice, drawn after the space's own parameters


class SourcedSpace(SearchSpace):
    """``inner`` draws the layers under ``constraints`` with max_repeats raised to allow a layer from
    every source (build_space does it); each full plan is checked against ``constraints`` per source."""

    def __init__(self, inner: SearchSpace, names: tuple[str, ...], constraints: PlanConstraints) -> None:
        super().__init__(inner.shape, constraints)
        self.inner, self.names = inner, tuple(names)
        self.injective = inner.injective

    @staticmethod
    def _split(params: Params) -> tuple[Params, Params]:
        return (tuple(p for p in params if not p[0].startswith(SOURCE)),
                tuple(p for p in params if p[0].startswith(SOURCE)))  # fmt: skip

    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        inner, chosen = self._split(params)
        spec = self.inner.next_param(inner)
        if spec is not None:
            return spec
        plan = self.inner.valid_plan(inner)
        if plan is None or len(chosen) >= len(plan.slices):
            return None
        return f"{SOURCE}{len(chosen)}", 0, len(self.names) - 1

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        plan = self.inner.plan_from_params({k: v for k, v in params.items() if not k.startswith(SOURCE)})
        if plan is None or any(f"{SOURCE}{i}" not in params for i in range(len(plan.slices))):
            return None  # an inner set the space drops before its sources are drawn
        return LayerPlan(
            plan.slices, tuple(self.names[params[f"{SOURCE}{i}"]] for i in range(len(plan.slices)))
        )

    def valid_plan(self, params: Params) -> Optional[LayerPlan]:
        inner, chosen = self._split(params)
        plan = self.inner.valid_plan(inner)
        if plan is None or len(chosen) != len(plan.slices):
            return None
        named = LayerPlan(plan.slices, tuple(self.names[value] for _, value in chosen))
        return None if self._too_many_repeats(named) else named

    def _too_many_repeats(self, plan: LayerPlan) -> bool:
        return self.constraints.max_repeats is not None and plan.max_repeats > self.constraints.max_repeats

    def state_key(self, params: Params) -> Hashable:
        inner, chosen = self._split(params)
        if self.inner.next_param(inner) is not None:  # equal inner keys: the same plans, so as many sources
            return "layers", self.inner.state_key(inner)
        return "sources", inner, tuple(value for _, value in chosen)

    def _count_uncached(self, params: Params) -> int:
        inner, chosen = self._split(params)
        if self.inner.next_param(inner) is not None:
            return super()._count_uncached(params)
        plan = self.inner.valid_plan(inner)
        if plan is None:
            return 0
        if not self._too_many_repeats(plan):  # within max_repeats as one model: every choice of models is
            return len(self.names) ** (len(plan.slices) - len(chosen))
        return super()._count_uncached(params)  # some layer needs two models: count the choices one by one

    def derived(self, plan: LayerPlan) -> dict[str, int]:
        return {**self.inner.derived(plan), "n_sources_used": len(plan.source_names)}

    def empty_message(self) -> str:
        return self.inner.empty_message()
