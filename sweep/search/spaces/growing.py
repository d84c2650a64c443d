"""``growing``: slices that grow along the depth (4,5,6,7,...), since layer importance rises
toward the output; one backward jump; the last slice runs to the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import FixedSpace, checked_range
from sweep.search.spaces.uniform import chain_plan


@dataclass(frozen=True)
class GrowingSpaceConfig:
    start_size: tuple[int, int] = (4, 12)
    growth: tuple[int, int] = (0, 4)  # layers added to each next slice
    jump: tuple[int, int] = (3, 8)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class GrowingSpace(FixedSpace):
    """Slice i has ``start_size + i * growth`` layers; slices are added while the next one still
    ends before the last layer, then the last slice runs from ``end - jump`` to the end.

    On 30 layers: start 6, growth 2, jump 3 -> ``0-6,3-11,8-18,15-30`` (6, 8, 10, then 15).
    """

    ORDER = ("start_size", "growth", "jump")
    injective = False  # a growth too large to place a second slice gives the same two-slice plan

    def __init__(self, shape: ModelShape, config: GrowingSpaceConfig) -> None:
        super().__init__(shape, config.constraints)
        n = shape.n_layers
        self.ranges = {name: checked_range(getattr(config, name), name, n) for name in self.ORDER}

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        size, growth, jump = (params[name] for name in self.ORDER)
        if size < 1 or size + growth <= jump:  # each slice must move forward
            return None
        sizes, end = [size], size
        while end - jump + size + growth * len(sizes) < self.n_base_layers:
            next_size = size + growth * len(sizes)
            sizes.append(next_size)
            end = end - jump + next_size
        return chain_plan(sizes, [jump] * len(sizes), self.n_base_layers)
