"""How big a model is, per layer and outside the layers: enough to price a plan in parameters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merge_core.architectures import LayerNames, gguf_layer_names
from merge_core.gguf_file import GGUFHeader
from merge_core.layer_plan import LayerPlan

# backend.load_in (torch): the decoder layers' linear weights quantized in memory by bitsandbytes, as
# RYS scanned a 72B on 24 GB GPUs. Bytes per weight: int8 one (plus a scale per row); nf4 half a byte
# plus one fp32 absmax per block of 64; none: the dtype's. Everything else stays in the dtype.
LOAD_IN = {"none": None, "int8": 1.0, "nf4": 0.5 + 4 / 64}


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    params_per_layer: int = 1
    params_outside_layers: int = 0  # embeddings, final norm, output head

    @classmethod
    def from_tensors(cls, n_layers: int, tensors, names: LayerNames) -> ModelShape:
        """From (name, shape) pairs: those ``names`` calls layer tensors belong to the layers."""
        in_layers = outside = 0
        for name, shape in tensors:
            n = int(np.prod(shape, dtype=np.int64))
            if names.split(name) is not None:
                in_layers += n
            else:
                outside += n
        return cls(n_layers, in_layers // max(n_layers, 1), outside)

    @classmethod
    def from_gguf_header(cls, header: GGUFHeader) -> ModelShape:
        tensors = ((t.name, t.dims) for t in header.tensors)
        return cls.from_tensors(header.block_count, tensors, gguf_layer_names(header.architecture))

    @classmethod
    def from_hf_checkpoint(cls, checkpoint) -> ModelShape:
        tensors = ((e.name, e.shape) for e in checkpoint.tensors.values())
        return cls.from_tensors(checkpoint.n_layers, tensors, checkpoint.layer_names)

    @classmethod
    def of(cls, source) -> ModelShape:
        """The shape of a GGUF file or an HF folder, from headers only."""
        from pathlib import Path

        from merge_core.gguf_file import read_gguf_header
        from merge_core.hf_checkpoint import HFCheckpoint

        source = Path(source)
        if source.is_dir():
            return cls.from_hf_checkpoint(HFCheckpoint.open(source))
        return cls.from_gguf_header(read_gguf_header(source))

    @property
    def n_params(self) -> int:
        return self.params_outside_layers + self.n_layers * self.params_per_layer

    def loaded_bytes(self, itemsize: int, load_in: str = "none") -> int:
        """Bytes of the weights once loaded in a dtype of ``itemsize`` bytes, layers as ``load_in`` says."""
        per_weight = LOAD_IN[load_in] or itemsize
        return int(self.n_layers * self.params_per_layer * per_weight + self.params_outside_layers * itemsize)

    def params_of(self, plan: LayerPlan) -> int:
        return self.params_outside_layers + plan.n_layers * self.params_per_layer
