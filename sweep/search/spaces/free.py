"""``free``: any number of slices, each with its own size and backward jump (define-by-run)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Optional

from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import Params, SearchSpace, checked_range
from sweep.search.spaces.uniform import chain_plan


@dataclass(frozen=True)
class FreeSpaceConfig:
    n_slices: tuple[int, int] = (2, 5)
    size: tuple[int, int] = (6, 16)  # every slice but the last, which runs to the end
    jump: tuple[int, int] = (3, 6)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class FreeSpace(SearchSpace):
    """Parameters, in order: ``n_slices`` k, then ``size_1, jump_2, size_2, ..., size_{k-1}, jump_k``;
    the last slice runs from ``end - jump_k`` to the end. On 30 layers, k=3, sizes 12, 10 and
    jumps 4, 5 -> ``0-12,8-18,13-30``. The default ranges keep the smallest slice no shorter than
    the longest jump, which keeps counting the space fast."""

    def __init__(self, shape: ModelShape, config: FreeSpaceConfig) -> None:
        super().__init__(shape, config.constraints)
        n = shape.n_layers
        self.n_slices = checked_range(config.n_slices, "n_slices", n)
        if self.n_slices[0] < 2:
            self.n_slices = (2, max(2, self.n_slices[1]))  # one slice is the base model, not a merge
        self.size = checked_range(config.size, "size", n)
        self.jump = checked_range(config.jump, "jump", n)

    def next_param(self, params: Params) -> Optional[tuple[str, int, int]]:
        if not params:
            return ("n_slices", *self.n_slices)
        k, drawn = params[0][1], len(params) - 1  # drawn: size_1, jump_2, size_2, ..., jump_k
        if drawn == 2 * (k - 1):
            return None
        if drawn % 2 == 0:
            return (f"size_{drawn // 2 + 1}", *self.size)
        return (f"jump_{drawn // 2 + 2}", *self.jump)

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        k = params["n_slices"]
        sizes = [params[f"size_{i}"] for i in range(1, k)]
        jumps = [params[f"jump_{i}"] for i in range(2, k + 1)]
        return chain_plan(sizes, jumps, self.n_base_layers)

    def state_key(self, params: Params) -> Hashable:
        """What the rest of the plan can depend on: slices left, where the chain ends, the last
        slice's size, the depth so far (if a depth rule is on), whether the first slice keeps
        ``keep_first``, and the repeat counts of the layers that later slices can still reach."""
        if len(params) <= 1:
            return params
        k, values = params[0][1], [v for _, v in params[1:]]
        sizes, jumps = values[0::2], values[1::2]
        pending = jumps[-1] if len(jumps) == len(sizes) else None
        counts, end, top = Counter(range(sizes[0])), sizes[0], sizes[0]
        for size, jump in zip(sizes[1:], jumps):
            start = end - jump
            if start < 0:
                return ("dead",)
            counts.update(range(start, start + size))
            end, top = start + size, max(top, start + size)
        c = self.constraints
        if self._broken(sizes, jumps, counts, top):
            return ("dead",)  # no completion can mend a rule the prefix already breaks
        # A later slice starts at most jump_max before the chain's end, and the end can move back
        # by at most (jump_max - size_min) per slice: layers below ``reach`` are never seen again.
        slices_left = k - len(sizes)
        reach = max(0, end - self.jump[1] - slices_left * max(0, self.jump[1] - self.size[0]))
        depth = sum(sizes) if (c.min_layers or c.max_layers or c.max_params_ratio) else None
        window = tuple(counts.get(layer, 0) for layer in range(reach, top)) if c.max_repeats else top
        return (k, len(params), end, sizes[-1], depth, pending, reach, window)

    def _broken(self, sizes: list[int], jumps: list[int], counts: Counter, top: int) -> bool:
        c = self.constraints
        for preceding, jump in zip(sizes, jumps):
            if c.jump_min is not None and jump < c.jump_min:
                return True
            if c.jump_max_fraction is not None and jump > c.jump_max_fraction * preceding:
                return True
        if c.max_repeats is not None and max(counts.values()) > c.max_repeats:
            return True
        return top > self.n_base_layers or sizes[0] < min(c.keep_first, self.n_base_layers)
