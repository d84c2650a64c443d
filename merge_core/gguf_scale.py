"""Multiply a GGUF tensor by a factor without dequantizing it.

A float tensor (F32, F16, BF16) is multiplied value by value, in float32 and rounded back to its type.
A quantized block is ``x = d * q`` (plus ``m`` or ``- dmin * m`` in the types with an offset), its
fp16 ``d`` (and ``m`` / ``dmin``) multiplying every value of the block, so ``s * x`` is the same
quants with those fp16 fields times ``s``: only their rounding to fp16 differs from the exact product
(none for a power of two). The table gives each type's block size and where its fp16 fields lie, from
ggml's block structs (``ggml-common.h``); a type outside it is refused, naming it.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from merge_core.errors import SelfMergeError

Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# ggml type -> byte offsets, inside one block, of the fp16 fields that multiply the whole block
BLOCK_SCALES = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),  # d first (and m)
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q6_K: (208,),  # d (and dmin) after the quants and sub-scales
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),  # d, dmin first
}  # fmt: skip
SCALABLE = tuple(t.name for t in (*FLOAT_TYPES, *BLOCK_SCALES))


def check_scalable(name: str, ggml_type: int) -> None:
    """A one-line refusal for a tensor whose type has no plain factor to multiply."""
    if ggml_type not in FLOAT_TYPES and ggml_type not in BLOCK_SCALES:
        raise SelfMergeError(
            f"tensor {name} is {Q(ggml_type).name}, whose blocks have no plain fp16 factor: a plan with scales "
            f"needs {', '.join(SCALABLE)} there (quantize the merge from an HF folder: selfmerge merge --quant)"
        )


def scale_tensor_bytes(name: str, ggml_type: int, data: bytes, factor: float) -> bytes:
    """The bytes of tensor ``name`` (``ggml_type``) with every value multiplied by ``factor``."""
    check_scalable(name, ggml_type)
    if ggml_type in FLOAT_TYPES:
        tensor = torch.frombuffer(bytearray(data), dtype=FLOAT_TYPES[ggml_type])
        return (tensor.float() * factor).to(tensor.dtype).view(torch.uint8).numpy().tobytes()
    block_bytes = GGML_QUANT_SIZES[Q(ggml_type)][1]
    blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, block_bytes).copy()
    for offset in BLOCK_SCALES[ggml_type]:
        field = blocks[:, offset : offset + 2].copy().view(np.float16)
        scaled = (field.astype(np.float32) * np.float32(factor)).astype(np.float16)
        if not np.isfinite(scaled).all():
            raise SelfMergeError(f"tensor {name} times {factor} overflows its fp16 block scales")
        blocks[:, offset : offset + 2] = scaled.view(np.uint8)
    return blocks.tobytes()
