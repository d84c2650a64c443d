"""LayerPlan: the one value that says which base layers a self-merge stacks, in order.

A plan is a tuple of half-open slices ``[(start, end), ...]`` of the base model's layers.
Its canonical text form is ``0-16,8-30`` (ends exclusive, as in mergekit's ``layer_range``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from merge_core.errors import SelfMergeError

_SLICE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class LayerPlan:
    slices: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        slices = tuple((int(a), int(b)) for a, b in self.slices)
        object.__setattr__(self, "slices", slices)
        if not slices:
            raise SelfMergeError("a layer plan needs at least one slice")
        for i, (start, end) in enumerate(slices, 1):
            if start < 0 or end <= start:
                raise SelfMergeError(f"slice {i} ({start}-{end}) is empty or negative: need 0 <= start < end")

    # --- text form -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> LayerPlan:
        """Parse ``0-16,8-30`` (whitespace tolerated)."""
        if not isinstance(text, str) or not text.strip():
            raise SelfMergeError(f"empty layer plan {text!r}: expected slices like 0-16,8-30")
        slices = []
        for i, part in enumerate(text.split(","), 1):
            match = _SLICE_RE.match(part)
            if not match:
                raise SelfMergeError(f"slice {i} ({part.strip()!r}) of plan {text!r} is not START-END, e.g. 0-16,8-30")
            slices.append((int(match.group(1)), int(match.group(2))))
        return cls(tuple(slices))

    @classmethod
    def identity(cls, n_layers: int) -> LayerPlan:
        """The base model itself: one slice over every layer."""
        return cls(((0, n_layers),))

    def __str__(self) -> str:
        return ",".join(f"{a}-{b}" for a, b in self.slices)

    # --- derived figures -----------------------------------------------------------------
    @property
    def layer_indices(self) -> tuple[int, ...]:
        """Base layer at each output position."""
        return tuple(layer for start, end in self.slices for layer in range(start, end))

    @property
    def n_layers(self) -> int:
        return sum(end - start for start, end in self.slices)

    @property
    def slice_sizes(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.slices)

    @property
    def backward_jumps(self) -> tuple[int, ...]:
        """How far each slice starts before the previous one ended (negative: layers skipped)."""
        return tuple(prev_end - start for (_, prev_end), (start, _) in zip(self.slices, self.slices[1:]))

    def repeat_counts(self) -> dict[int, int]:
        """How often each base layer appears in the output (layers not used are absent)."""
        return dict(sorted(Counter(self.layer_indices).items()))

    @property
    def max_repeats(self) -> int:
        return max(self.repeat_counts().values())

    def is_identity(self, n_base_layers: int) -> bool:
        return self.layer_indices == tuple(range(n_base_layers))

    # --- validation ----------------------------------------------------------------------
    def validate(self, n_base_layers: int) -> LayerPlan:
        """Check every slice lies inside a model of ``n_base_layers`` layers; return self."""
        for i, (start, end) in enumerate(self.slices, 1):
            if end > n_base_layers:
                raise SelfMergeError(f"slice {i} ({start}-{end}) ends past layer {n_base_layers}")
        return self
