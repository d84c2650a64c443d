"""LayerPlan: the one value that says which base layers a self-merge stacks, in order.

A plan is a tuple of half-open slices ``[(start, end), ...]`` of the base model's layers.
Its canonical text form is ``0-16,8-30`` (ends exclusive, as in mergekit's ``layer_range``).
A frankenmerge of several fine-tunes of one base names each slice's source model:
``a:0-24,b:8-32`` (``sources``, one name per slice; a plan without names is the single base).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from merge_core.errors import SelfMergeError

_SLICE_RE = re.compile(r"^\s*(?:([A-Za-z_][\w.-]*)\s*:)?\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class LayerPlan:
    slices: tuple[tuple[int, int], ...]
    sources: tuple[str, ...] = ()  # the source model of each slice; () = every slice from the one base

    def __post_init__(self) -> None:
        slices = tuple((int(a), int(b)) for a, b in self.slices)
        object.__setattr__(self, "slices", slices)
        object.__setattr__(self, "sources", tuple(self.sources))
        if not slices:
            raise SelfMergeError("a layer plan needs at least one slice")
        for i, (start, end) in enumerate(slices, 1):
            if start < 0 or end <= start:
                raise SelfMergeError(f"slice {i} ({start}-{end}) is empty or negative: need 0 <= start < end")
        if self.sources and len(self.sources) != len(slices):
            raise SelfMergeError(
                f"plan has {len(slices)} slices but {len(self.sources)} source names: name every slice"
            )

    # --- text form -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> LayerPlan:
        """Parse ``0-16,8-30`` (whitespace tolerated)."""
        if not isinstance(text, str) or not text.strip():
            raise SelfMergeError(f"empty layer plan {text!r}: expected slices like 0-16,8-30")
        slices, sources = [], []
        for i, part in enumerate(text.split(","), 1):
            match = _SLICE_RE.match(part)
            if not match:
                raise SelfMergeError(f"slice {i} ({part.strip()!r}) of plan {text!r} is not START-END, e.g. 0-16,8-30 "
                                     "(or SOURCE:START-END for several models, e.g. a:0-24,b:8-32)")  # fmt: skip
            sources.append(match.group(1))
            slices.append((int(match.group(2)), int(match.group(3))))
        if any(sources) and not all(sources):
            raise SelfMergeError(f"plan {text!r} names the source of some slices only: name all of them or none")
        return cls(tuple(slices), tuple(sources) if all(sources) else ())

    @classmethod
    def identity(cls, n_layers: int) -> LayerPlan:
        """The base model itself: one slice over every layer."""
        return cls(((0, n_layers),))

    def __str__(self) -> str:
        names = [f"{name}:" for name in self.sources] or [""] * len(self.slices)
        return ",".join(f"{name}{a}-{b}" for name, (a, b) in zip(names, self.slices))

    def source_of_slices(self, default: str) -> tuple[str, ...]:
        """Each slice's source: its name, or ``default`` (the base) in a plan without names."""
        return self.sources or (default,) * len(self.slices)

    def end_sources(self, default: str, base_source: str | None = None) -> tuple[str, str]:
        """The models of the tensors outside the layers: (before them: embeddings, with the tokenizer,
        chat template and metadata; after them: final norm and output head). mergekit's passthrough
        takes them from the first and the last slice's model; ``base_source`` (model.base) names one
        model for both."""
        if base_source:
            return base_source, base_source
        sources = self.source_of_slices(default)
        return sources[0], sources[-1]

    @property
    def source_names(self) -> tuple[str, ...]:
        """The sources a plan names, in order of first use (empty for a single-base plan)."""
        return tuple(dict.fromkeys(self.sources))

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

    @property
    def layer_sources(self) -> tuple[tuple[str, int], ...]:
        """(source, layer) at each output position; the source is "" in a plan without names."""
        names = self.sources or ("",) * len(self.slices)
        return tuple((name, layer) for name, (start, end) in zip(names, self.slices) for layer in range(start, end))

    def repeat_counts(self) -> dict[int, int]:
        """How often each base layer appears in the output (layers not used are absent). With several
        sources a layer counts per source (a's layer 8 and b's are different weights): its most
        repeated copy."""
        counts: dict[int, int] = {}
        for (_, layer), count in Counter(self.layer_sources).items():
            counts[layer] = max(counts.get(layer, 0), count)
        return dict(sorted(counts.items()))

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
