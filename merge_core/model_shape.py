"""How big a model is, per layer and outside the layers: enough to price a plan in parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from merge_core.gguf_file import GGUFHeader
from merge_core.layer_plan import LayerPlan

_BLOCK_RE = re.compile(r"^blk\.\d+\.")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    params_per_layer: int = 1
    params_outside_layers: int = 0  # embeddings, final norm, output head

    @classmethod
    def from_gguf_header(cls, header: GGUFHeader) -> ModelShape:
        in_blocks = outside = 0
        for tensor in header.tensors:
            n = int(np.prod(tensor.dims, dtype=np.int64))
            if _BLOCK_RE.match(tensor.name):
                in_blocks += n
            else:
                outside += n
        return cls(header.block_count, in_blocks // max(header.block_count, 1), outside)

    @property
    def n_params(self) -> int:
        return self.params_outside_layers + self.n_layers * self.params_per_layer

    def params_of(self, plan: LayerPlan) -> int:
        return self.params_outside_layers + plan.n_layers * self.params_per_layer
