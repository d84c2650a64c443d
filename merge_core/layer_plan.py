"""LayerPlan: the one value that says which base layers a self-merge stacks, in order.

A plan is a tuple of half-open slices ``[(start, end), ...]`` of the base model's layers.
Its canonical text form is ``0-16,8-30`` (ends exclusive, as in mergekit's ``layer_range``).
A frankenmerge of several fine-tunes of one base names each slice's source model:
``a:0-24,b:8-32`` (``sources``, one name per slice; a plan without names is the single base).

An attenuated plan also says how strongly a repeated layer contributes: ``0-16,8-30@qk=0.7071,out=0.5``
(``Scales``). The factors act on every layer's second and later use, never on its first, so the base's
own pass through the stack stays the base's; see ``Scales`` for what each factor multiplies.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, fields

from merge_core.errors import SelfMergeError

_SLICE_RE = re.compile(r"^\s*(?:([A-Za-z_][\w.-]*)\s*:)?\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class Scales:
    """How strongly a repeated layer contributes: factors on a layer's second and later use.

    ``qk`` multiplies its queries and its keys (each; the attention logits by qk**2, a softer softmax);
    ``attn_out`` and ``mlp_out`` multiply what its attention and its MLP add to the residual stream.
    Which tensors carry each factor is the architecture table's answer (``Architecture.hf_scales``, ``gguf_scales``).
    Text form ``qk=0.7071,out=0.5``: ``out`` when both outputs share a factor, factors of 1 left out.
    """

    qk: float = 1.0
    attn_out: float = 1.0
    mlp_out: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise SelfMergeError(f"scale {f.name}={value!r} is not a positive number: factors are > 0, "
                                     "e.g. qk=0.7071")  # fmt: skip
            object.__setattr__(self, f.name, float(value))

    @classmethod
    def parse(cls, text: str) -> Scales:
        """``qk=0.7071,out=0.5`` (``out`` sets attn_out and mlp_out; unnamed factors stay 1)."""
        values: dict[str, float] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in SCALE_KEYS:
                raise SelfMergeError(f"scale {item.strip()!r} names no factor: use {', '.join(SCALE_KEYS)}, "
                                     "e.g. qk=0.7071,out=0.5")  # fmt: skip
            try:
                number = float(value)
            except ValueError:
                raise SelfMergeError(f"scale {key}={value.strip()!r} is not a number, e.g. {key}=0.5") from None
            for name in ("attn_out", "mlp_out") if key == "out" else (key,):
                if name in values:
                    raise SelfMergeError(f"scales {text!r} set {name} twice")
                values[name] = number
        return cls(**values)

    @property
    def is_identity(self) -> bool:
        return self == Scales()

    def __str__(self) -> str:
        items = {"qk": self.qk}
        if self.attn_out == self.mlp_out:
            items["out"] = self.attn_out
        else:
            items.update(attn_out=self.attn_out, mlp_out=self.mlp_out)
        return ",".join(f"{key}={value!r}" for key, value in items.items() if value != 1.0)


SCALE_KEYS = ("qk", "out", "attn_out", "mlp_out")  # the text form's names (out: both outputs)
NO_SCALES = Scales()


@dataclass(frozen=True)
class LayerPlan:
    slices: tuple[tuple[int, int], ...]
    sources: tuple[str, ...] = ()  # the source model of each slice; () = every slice from the one base
    scales: Scales = NO_SCALES  # the factors on each layer's second and later use

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
        if not self.scales.is_identity and self.max_repeats == 1:
            raise SelfMergeError(f"plan {str(self).partition('@')[0]} repeats no layer, so its scales "
                                 f"({self.scales}) would change nothing: they act on a layer's second use")  # fmt: skip

    # --- text form -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> LayerPlan:
        """Parse ``0-16,8-30`` or ``0-16,8-30@qk=0.7071,out=0.5`` (whitespace tolerated)."""
        if not isinstance(text, str) or not text.strip():
            raise SelfMergeError(f"empty layer plan {text!r}: expected slices like 0-16,8-30")
        layers, at, scales = text.partition("@")
        if at and not scales.strip():
            raise SelfMergeError(f"plan {text!r} ends at '@': give its scales, e.g. 0-16,8-30@qk=0.7071,out=0.5")
        slices, sources = [], []
        for i, part in enumerate(layers.split(","), 1):
            match = _SLICE_RE.match(part)
            if not match:
                raise SelfMergeError(f"slice {i} ({part.strip()!r}) of plan {text!r} is not START-END, e.g. 0-16,8-30 "
                                     "(or SOURCE:START-END for several models, e.g. a:0-24,b:8-32)")  # fmt: skip
            sources.append(match.group(1))
            slices.append((int(match.group(2)), int(match.group(3))))
        if any(sources) and not all(sources):
            raise SelfMergeError(f"plan {text!r} names the source of some slices only: name all of them or none")
        factors = Scales.parse(scales) if at else NO_SCALES
        return cls(tuple(slices), tuple(sources) if all(sources) else (), factors)

    @classmethod
    def identity(cls, n_layers: int) -> LayerPlan:
        """The base model itself: one slice over every layer."""
        return cls(((0, n_layers),))

    def __str__(self) -> str:
        names = [f"{name}:" for name in self.sources] or [""] * len(self.slices)
        text = ",".join(f"{name}{a}-{b}" for name, (a, b) in zip(names, self.slices))
        return f"{text}@{self.scales}" if not self.scales.is_identity else text

    def unscaled(self) -> LayerPlan:
        """The same stack without factors."""
        return LayerPlan(self.slices, self.sources)

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
    def layer_scales(self) -> tuple[Scales, ...]:
        """The factors at each output position: the plan's on a layer's second and later use, else none."""
        seen: set[tuple[str, int]] = set()
        out = []
        for key in self.layer_sources:
            out.append(self.scales if key in seen else NO_SCALES)
            seen.add(key)
        return tuple(out)

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
