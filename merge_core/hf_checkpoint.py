"""A Hugging Face checkpoint folder, read without loading a weight: ``config.json``, and for each
tensor the file that holds it (``model.safetensors``, or the shards named by
``model.safetensors.index.json``), its dtype, shape and byte range from the safetensors header."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from merge_core import architectures
from merge_core.architectures import Architecture, LayerNames
from merge_core.errors import SelfMergeError, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str  # safetensors' own names: BF16, F16, F32, ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # of the first byte, from the start of the file
    n_bytes: int


def read_safetensors_header(path: Path) -> list[SafetensorsEntry]:
    """The tensors of one .safetensors file, in the order their bytes lie in it."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise SelfMergeError(f"{path} is not a readable safetensors file: {err}") from None
    header.pop("__metadata__", None)
    data_start = 8 + size
    entries = [
        SafetensorsEntry(name, info["dtype"], tuple(info["shape"]), path, data_start + info["data_offsets"][0],
                         info["data_offsets"][1] - info["data_offsets"][0])  # fmt: skip
        for name, info in header.items()
    ]
    return sorted(entries, key=lambda e: e.offset)


@dataclass(frozen=True)
class HFCheckpoint:
    folder: Path
    config: dict
    tensors: dict[str, SafetensorsEntry]  # by name, shard by shard in file order

    @classmethod
    def open(cls, folder: str | Path) -> HFCheckpoint:
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise SelfMergeError(f"{folder} is not a Hugging Face model folder: config.json is missing")
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise SelfMergeError(f"{config_path} is not a model config: it holds a JSON {type(config).__name__}, not an object")
        if (folder / INDEX_FILE).is_file():
            weight_map = read_json(folder / INDEX_FILE).get("weight_map", {})
            files = list(dict.fromkeys(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {found}: save it with safetensors)" if found else ""
            raise SelfMergeError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        tensors: dict[str, SafetensorsEntry] = {}
        for name in files:
            if not (folder / name).is_file():
                raise SelfMergeError(f"{folder}/{INDEX_FILE} names shard {name}, which is missing")
            for entry in read_safetensors_header(folder / name):
                tensors[entry.name] = entry
        checkpoint = cls(folder, config, tensors)
        checkpoint.layer_tensors()  # checks the layers are all there
        return checkpoint

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["(none in config.json)"])[0]

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def check_supported(self) -> Architecture:
        """The table's entry of a supported model; a clear error for any other."""
        return architectures.of_config(self.config)

    @property
    def layer_names(self) -> LayerNames:
        return architectures.hf_layer_names(self.config)

    def layer_tensors(self) -> dict[int, list[SafetensorsEntry]]:
        """Each layer's tensors (``model.layers.N.*``), in file order."""
        layers: dict[int, list[SafetensorsEntry]] = {}
        for entry in self.tensors.values():
            split = self.layer_names.split(entry.name)
            if split is not None:
                layers.setdefault(split[0], []).append(entry)
        if not layers or "num_hidden_layers" not in self.config:  # not a Llama-style decoder stack
            refusal = architectures.unsupported(self.architecture)
            raise SelfMergeError(f"{self.folder} has no {self.layer_names.prefix}N tensors: {refusal}")
        missing = sorted(set(range(self.n_layers)) - set(layers))
        if missing:
            raise SelfMergeError(f"{self.folder}: config.json says {self.n_layers} layers but no tensors for layers {missing[:8]}")
        return layers

    @property
    def n_bytes(self) -> int:
        return sum(e.n_bytes for e in self.tensors.values())
