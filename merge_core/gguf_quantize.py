"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize`` in llama-cpp-python).

Two ways to get a quantized self-merge (``quant_mode``):
- ``reuse``: quantize the base once, then each plan re-indexes its quantized blocks (gguf_merge).
  Fast, and exact for the types that quantize every layer the same way.
- ``requantize``: merge the F16 base, then quantize each plan. Needed where llama.cpp picks a
  tensor's type from its layer's position in the stack (the k-quant mixes such as Q4_K_M give
  some layers' attn_v/ffn_down more bits): a re-indexed block keeps the type its base position got.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path

from merge_core.byte_copy import written_as_partial
from merge_core.errors import SelfMergeError

QUANT_MODES = ("reuse", "requantize")


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name (Q8_0, Q4_K_M, ...)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name[len(prefix) :]: getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(prefix)}


def check_quant_type(name: str) -> str:
    types = quant_types()
    if name.upper() not in types:
        raise SelfMergeError(f"quantization type {name!r} is unknown to llama.cpp; choose one of {sorted(types)}")
    return name.upper()


def quantize_gguf(in_path: str | Path, out_path: str | Path, quant: str, threads: int | None = None,
                  allow_requantize: bool = False) -> Path:  # fmt: skip
    """Write ``in_path`` (F16/BF16/F32; an already quantized file with ``allow_requantize``, at a loss)
    quantized to ``quant`` at ``out_path`` (via ``.partial``)."""
    import llama_cpp

    quant = check_quant_type(quant)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    with written_as_partial(out_path) as partial:
        with _stderr_captured() as log:
            status = llama_cpp.llama_model_quantize(str(in_path).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            tail = " | ".join(log[-3:])
            raise SelfMergeError(f"llama.cpp could not quantize {in_path} to {quant} (status {status}): {tail}")
    return out_path


@contextlib.contextmanager
def _stderr_captured():
    """llama.cpp logs a line per tensor on fd 2; keep it out of the terminal, for the error message."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode(errors="replace").strip().splitlines())
