"""``uniform``: first slice, equal middle slices, the last slice to the end, one backward jump."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import FixedSpace, checked_range


@dataclass(frozen=True)
class UniformSpaceConfig:
    first_size: tuple[int, int] = (4, 20)
    middle_size: tuple[int, int] = (6, 16)
    jump: tuple[int, int] = (3, 8)
    n_middle: tuple[int, int] = (0, 4)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class UniformSpace(FixedSpace):
    """First slice F, then ``n_middle`` slices of size S, then the last slice to the end; each
    slice starts J layers before the previous one ended. The last slice's size follows:
    ``L = n_base - F + J - n_middle * (S - J)``; the output has ``n_base + (n_middle + 1) * J`` layers.

    On 30 layers: F=10, J=4, S=10, n_middle=2 -> ``0-10,6-16,12-22,18-30``.
    """

    ORDER = ("first_size", "jump", "middle_size", "n_middle")
    injective = False  # with n_middle=0 the middle size does not matter

    def __init__(self, shape: ModelShape, config: UniformSpaceConfig) -> None:
        super().__init__(shape, config.constraints)
        ceiling = {"first_size": shape.n_layers - 1, "middle_size": shape.n_layers, "jump": shape.n_layers, "n_middle": shape.n_layers}
        self.ranges = {name: checked_range(getattr(config, name), name, ceiling[name]) for name in self.ORDER}

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        first, jump, middle, n_middle = (params[name] for name in self.ORDER)
        sizes = [first] + [middle] * n_middle
        return chain_plan(sizes, [jump] * (n_middle + 1), self.n_base_layers)


def chain_plan(sizes: list[int], jumps: list[int], n_base: int) -> Optional[LayerPlan]:
    """Slices of ``sizes``, each after the first starting ``jumps[i-1]`` layers before the previous
    end, then a last slice from ``end - jumps[-1]`` to ``n_base``. None if that is no plan."""
    if not sizes or any(size < 1 for size in sizes):
        return None
    slices, end = [(0, sizes[0])], sizes[0]
    for size, jump in zip(sizes[1:], jumps):
        start = end - jump
        if start < 0:
            return None
        slices.append((start, start + size))
        end = start + size
    last_start = end - jumps[len(sizes) - 1]
    if not 0 <= last_start < n_base or max(e for _, e in slices) > n_base:
        return None
    slices.append((last_start, n_base))
    return LayerPlan(tuple(slices))
