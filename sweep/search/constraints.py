"""The practitioners' rules for a passthrough self-merge, as a checker independent of any space.

Each rule is a config value a user can change or switch off (null). ``violations`` says in words
what a plan breaks; an empty list means the plan is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape


@dataclass(frozen=True)
class PlanConstraints:
    last_min: Optional[int] = 6  # the last slice needs >= 6 layers or the model outputs gibberish
    max_repeats: Optional[int] = 2  # a layer used 3 times degrades quality
    jump_min: Optional[int] = 3  # backward jump > 2 ...
    jump_max_fraction: Optional[float] = 0.5  # ... and <= half of the preceding slice
    keep_first: int = 0  # the first K base layers appear unbroken at the start
    keep_last: int = 0  # the last K base layers appear unbroken at the end
    min_layers: Optional[int] = None
    max_layers: Optional[int] = None
    max_params_ratio: Optional[float] = None  # parameter budget: e.g. 1.5 = at most 1.5x the base

    def __post_init__(self) -> None:
        for name in ("last_min", "max_repeats", "min_layers", "max_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SelfMergeError(f"space.constraints.{name}={value} is out of range: must be >= 1 or null")
        for name in ("jump_min", "keep_first", "keep_last"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SelfMergeError(f"space.constraints.{name}={value} is out of range: must be >= 0")
        if self.jump_max_fraction is not None and not 0 < self.jump_max_fraction <= 1:
            raise SelfMergeError(f"space.constraints.jump_max_fraction={self.jump_max_fraction} is out of range: must be in (0, 1]")
        if self.max_params_ratio is not None and self.max_params_ratio <= 0:
            raise SelfMergeError(f"space.constraints.max_params_ratio={self.max_params_ratio} is out of range: must be > 0")
        if self.min_layers and self.max_layers and self.min_layers > self.max_layers:
            raise SelfMergeError(f"space.constraints.min_layers={self.min_layers} exceeds max_layers={self.max_layers}")

    def violations(self, plan: LayerPlan, shape: ModelShape) -> list[str]:
        n_base_layers = shape.n_layers
        problems = []
        (first_start, _), (last_start, last_end) = plan.slices[0], plan.slices[-1]
        if first_start != 0 or last_end != n_base_layers:
            problems.append(f"plan must start at layer 0 and end at layer {n_base_layers}")
        if any(end > n_base_layers for _, end in plan.slices):
            problems.append(f"a slice ends past layer {n_base_layers}")
        if self.last_min is not None and last_end - last_start < self.last_min:
            problems.append(f"last slice has {last_end - last_start} layers < {self.last_min}")
        if self.max_repeats is not None and plan.max_repeats > self.max_repeats:
            problems.append(f"a layer is used {plan.max_repeats} times > {self.max_repeats}")
        for i, jump in enumerate(plan.backward_jumps):
            preceding = plan.slice_sizes[i]
            if self.jump_min is not None and jump < self.jump_min:
                problems.append(f"backward jump {jump} before slice {i + 2} < {self.jump_min}")
            if self.jump_max_fraction is not None and jump > self.jump_max_fraction * preceding:
                problems.append(f"backward jump {jump} before slice {i + 2} > {self.jump_max_fraction} x {preceding}")
        indices = plan.layer_indices
        if self.keep_first and indices[: self.keep_first] != tuple(range(self.keep_first)):
            problems.append(f"the first {self.keep_first} layers are not kept unbroken at the start")
        if self.keep_last and indices[-self.keep_last :] != tuple(range(n_base_layers - self.keep_last, n_base_layers)):
            problems.append(f"the last {self.keep_last} layers are not kept unbroken at the end")
        if self.min_layers is not None and plan.n_layers < self.min_layers:
            problems.append(f"{plan.n_layers} output layers < min_layers {self.min_layers}")
        if self.max_layers is not None and plan.n_layers > self.max_layers:
            problems.append(f"{plan.n_layers} output layers > max_layers {self.max_layers}")
        if self.max_params_ratio is not None and shape.params_of(plan) > self.max_params_ratio * shape.n_params:
            problems.append(f"{shape.params_of(plan) / shape.n_params:.2f}x the base's parameters > {self.max_params_ratio}x")
        return problems
