"""``interleave``: Goliath-120B's pattern, slices of one size overlapping by a fixed amount, their
models alternating (``model.sources``; one model: an even self-merge); the first and the last slice
each take a chosen model, as the embeddings and the head come from theirs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.constraints import PlanConstraints
from sweep.search.spaces.base import FixedSpace, checked_range


@dataclass(frozen=True)
class InterleaveSpaceConfig:
    slice_size: tuple[int, int] = (8, 16)  # Goliath: about 16 of 80 layers
    overlap: tuple[int, int] = (3, 8)  # layers each slice repeats of the one before (the backward jump)
    constraints: PlanConstraints = field(default_factory=PlanConstraints)


class InterleaveSpace(FixedSpace):
    """Slices ``[k * stride, k * stride + slice_size)`` with ``stride = slice_size - overlap``, and a last
    one ending at the last layer; slice k from ``sources[(first_source + k) % n]``, the last slice from
    ``sources[last_source]``. On 30 layers, size 10, overlap 4, a/b: ``a:0-10,b:6-16,a:12-22,b:18-28,a:20-30``."""

    ORDER = ("slice_size", "overlap", "first_source", "last_source")
    injective = False  # e.g. one slice: first and last source name the same slice
    picks_sources = True  # the space draws the sources itself (no source_i per slice on top)

    def __init__(self, shape: ModelShape, config: InterleaveSpaceConfig, sources: tuple[str, ...] = ()) -> None:
        super().__init__(shape, config.constraints)
        n = shape.n_layers
        self.sources = tuple(sources)
        last = max(len(self.sources) - 1, 0)
        self.ranges = {"slice_size": checked_range(config.slice_size, "slice_size", n),
                       "overlap": checked_range(config.overlap, "overlap", n),
                       "first_source": (0, last), "last_source": (0, last)}  # fmt: skip

    def plan_from_params(self, params: dict[str, int]) -> Optional[LayerPlan]:
        size, overlap, n = params["slice_size"], params["overlap"], self.n_base_layers
        stride = size - overlap
        if size < 1 or stride < 1 or size > n:
            return None
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] + size < n:
            starts.append(n - size)
        slices = tuple((start, start + size) for start in starts)
        if not self.sources:
            return LayerPlan(slices)
        names = [self.sources[(params["first_source"] + k) % len(self.sources)] for k in range(len(slices))]
        names[-1] = self.sources[params["last_source"]]
        return LayerPlan(slices, tuple(names))

    def derived(self, plan: LayerPlan) -> dict[str, int]:
        return {**super().derived(plan), "n_sources_used": len(plan.source_names)}
