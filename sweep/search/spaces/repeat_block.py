"""``repeat_block``: run the model once, then repeat one contiguous block of middle layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import FixedSpace, checked_range


@dataclass(frozen=True)
class RepeatBlockSpaceConfig:
    block_start: tuple[int, int] = (1, 1000)  # clipped to the model's depth
    block_size: tuple[int, int] = (2, 12)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class RepeatBlockSpace(FixedSpace):
    """Layers ``[b, b+m)`` appear twice: ``0-(b+m), b-n``. On 30 layers, b=10, m=6 -> ``0-16,10-30``."""

    ORDER = ("block_start", "block_size")

    def __init__(self, shape: ModelShape, config: RepeatBlockSpaceConfig) -> None:
        super().__init__(shape, config.constraints)
        n = shape.n_layers
        self.ranges = {
            "block_start": checked_range(config.block_start, "block_start", n - 1),
            "block_size": checked_range(config.block_size, "block_size", n),
        }

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        start, size = params["block_start"], params["block_size"]
        if size < 1 or start + size > self.n_base_layers or start < 1:
            return None
        return LayerPlan(((0, start + size), (start, self.n_base_layers)))
