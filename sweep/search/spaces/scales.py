"""Attenuated repeats as searched parameters (``space.scale.qk``, ``space.scale.out``): after the space's
own parameters, a plan that repeats a layer draws ``scale_qk`` and ``scale_out``, each an index into its
sorted choices (an ordered integer, so TPE and CMA-ES see a scale, and plans stay countable). A plan
that repeats nothing draws none: its factors would change nothing. Off by default (both null), which
leaves every space exactly as it was."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Optional

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan, Scales
from sweep.search.spaces.base import Params, SearchSpace

# parameter -> the factor of Scales it sets (out: both outputs)
PARAMS = {"scale_qk": "qk", "scale_out": "out"}


@dataclass(frozen=True)
class ScaleSpaceConfig:
    qk: Any = None  # null (off), a list of factors [0.5, 0.7071, 1.0], or {low, high, step}
    out: Any = None

    def choices(self) -> dict[str, tuple[float, ...]]:
        """Each factor's sorted choices, by Scales' text name; only those switched on."""
        return {
            key: _choices(getattr(self, key), key) for key in ("qk", "out") if getattr(self, key) is not None
        }


def _choices(value, key: str) -> tuple[float, ...]:
    name = f"space.scale.{key}"
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "step"}
        if unknown or not {"low", "high", "step"} <= set(value):
            raise SelfMergeError(f"{name}={value} is a range {{low, high, step}}; got keys {sorted(value)}")
        low, high, step = (_factor(value[k], name) for k in ("low", "high", "step"))
        if high < low:
            raise SelfMergeError(f"{name}={value} is empty: low must be <= high")
        values = [round(low + i * step, 10) for i in range(int(math.floor((high - low) / step + 1e-9)) + 1)]
    elif isinstance(value, (list, tuple)) and value:
        values = [_factor(v, name) for v in value]
    else:
        raise SelfMergeError(f"{name}={value!r} is neither a list of factors nor {{low, high, step}}, "
                             "e.g. [0.5, 0.7071, 1.0]")  # fmt: skip
    if len(set(values)) != len(values):
        raise SelfMergeError(f"{name}={value} repeats a factor")
    return tuple(sorted(values))


def _factor(value, name: str) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise SelfMergeError(f"{name} holds {value!r}, not a positive number: factors are > 0, e.g. 0.7071")
    return float(value)


class ScaledSpace(SearchSpace):
    """``inner`` draws the layers; then a plan that repeats a layer draws one index per switched-on
    factor. Distinct indices give distinct plans, so the space is injective if ``inner`` is."""

    def __init__(self, inner: SearchSpace, choices: dict[str, tuple[float, ...]]) -> None:
        super().__init__(inner.shape, inner.constraints)
        self.inner, self.choices = inner, choices
        self.injective = inner.injective

    @staticmethod
    def _split(params: Params) -> tuple[Params, Params]:
        return tuple(p for p in params if p[0] not in PARAMS), tuple(p for p in params if p[0] in PARAMS)

    def _drawn(self) -> list[str]:
        return [name for name, key in PARAMS.items() if key in self.choices]

    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        inner, drawn = self._split(params)
        spec = self.inner.next_param(inner)
        if spec is not None:
            return spec
        plan = self.inner.valid_plan(inner)
        if plan is None or plan.max_repeats == 1 or len(drawn) == len(self._drawn()):
            return None
        name = self._drawn()[len(drawn)]
        return name, 0, len(self.choices[PARAMS[name]]) - 1

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        return self.valid_plan(tuple(params.items()))

    def valid_plan(self, params: Params) -> Optional[LayerPlan]:
        inner, drawn = self._split(params)
        plan = self.inner.valid_plan(inner)
        if plan is None or plan.max_repeats == 1:
            return None if drawn else plan
        if len(drawn) != len(self._drawn()):
            return None
        factors = {PARAMS[name]: self.choices[PARAMS[name]][index] for name, index in drawn}
        out = factors.get("out", 1.0)
        return LayerPlan(plan.slices, plan.sources, Scales(factors.get("qk", 1.0), out, out))

    def _count(self, params: Params) -> int:
        """While the layers are drawn: the inner space's count, which is nonzero exactly when a scaled
        plan completes the prefix (every inner plan has one), all ``suggest`` asks of it; then the
        factors' own draws. The total is ``count_param_sets``'s."""
        inner, _ = self._split(params)
        if self.inner.next_param(inner) is not None:
            return self.inner._count(inner)
        return super()._count(params)

    def count_param_sets(self) -> int:
        """Plans that repeat nothing once, the others once per combination of factors; those that
        repeat nothing are the inner space's under max_repeats=1."""
        single = copy.copy(self.inner)
        single.constraints, single._memo = dataclasses.replace(self.inner.constraints, max_repeats=1), {}
        n_single, n_all = single.count_param_sets(), self.inner.count_param_sets()
        return n_single + (n_all - n_single) * math.prod(len(c) for c in self.choices.values())

    def state_key(self, params: Params) -> Hashable:
        return params  # reached only once the layers are drawn (``_count``): the few factor prefixes

    def check_not_empty(self) -> None:
        self.inner.check_not_empty()

    def derived(self, plan: LayerPlan) -> dict[str, int]:
        return self.inner.derived(plan)

    def empty_message(self) -> str:
        return self.inner.empty_message()


def with_scales(space: SearchSpace, config: Optional[ScaleSpaceConfig]) -> SearchSpace:
    """``space`` itself when no factor is searched, else wrapped."""
    choices = config.choices() if config is not None else {}
    return ScaledSpace(space, choices) if choices else space
