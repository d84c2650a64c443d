"""Self-merge a Hugging Face checkpoint into a new safetensors folder, as mergekit's passthrough does.

``model.layers.N.*`` follow the plan (a layer used twice is written twice, as its own tensor),
every other tensor is copied, ``config.json`` gets the new ``num_hidden_layers`` and its per-layer
lists (e.g. ``layer_types``) follow the plan, tokenizer files and chat template are copied, and
``mergekit_config.yml`` holds the equivalent recipe. Tensor bytes go file to file in the kernel,
never dequantized, cast or held in memory, so the output is byte-identical to mergekit's and peak
memory stays flat whatever the shard size. A plan with scales multiplies the tensors the architecture
table names at each repeat, one tensor at a time in its own dtype, as mergekit's ``tensor * scale``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from tqdm.auto import tqdm

from merge_core.architectures import Architecture, find, merged_config, plan_source_tensors
from merge_core.byte_copy import copy_range, write_all, written_as_partial
from merge_core.errors import SelfMergeError
from merge_core.hf_checkpoint import INDEX_FILE, SINGLE_FILE, HFCheckpoint, SafetensorsEntry
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import recipe_beside
from merge_core.sources import hf_sources

DEFAULT_SHARD_BYTES = 5 * 10**9  # mergekit's default --out-shard-size (5B)
SIDE_FILES = (  # copied as they are: tokenizer, chat template, generation defaults
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
Scaled = Mapping[str, tuple[float, float]]  # output tensor name -> (factor, norm offset)


def merged_tensors(checkpoints: Mapping[str, HFCheckpoint], plan: LayerPlan,
                   base_source: str | None = None) -> list[tuple[str, SafetensorsEntry]]:  # fmt: skip
    """(output name, source tensor): other tensors in place, the plan's layers where layers began, each
    from its slice's checkpoint (``checkpoints`` by source name, "" for a plan of one model)."""
    names = next(iter(checkpoints.values())).layer_names
    tensors = {name: list(checkpoint.tensors.values()) for name, checkpoint in checkpoints.items()}
    order = plan_source_tensors(tensors, plan, names, "", base_source)
    return [(out_name, tensor) for out_name, _, tensor in order]


def scaled_tensors(order: list[tuple[str, SafetensorsEntry]], plan: LayerPlan, arch: Architecture | None,
                   names) -> dict[str, tuple[float, float]]:  # fmt: skip
    """(factor, offset) of each output tensor a plan's scales multiply (``Architecture.hf_scaled``)."""
    if plan.scales.is_identity:
        return {}
    if arch is None:
        raise SelfMergeError(f"plan {plan} has scales, but this model's family is not in the architecture "
                             "table, which says which tensors they multiply")  # fmt: skip
    at = plan.layer_scales
    out = {}
    for name, _ in order:
        split = names.split(name)
        if split is not None and not at[split[0]].is_identity:
            factor, offset = arch.hf_scaled(split[1], at[split[0]])
            if factor != 1.0:
                out[name] = (factor, offset)
    return out


def _scaled_bytes(fd: int, source: SafetensorsEntry, factor: float, offset: float) -> bytes:
    """One tensor read, multiplied in its own dtype (mergekit's ``tensor * scale``); a norm stored less
    ``offset`` (Gemma's) scaled as ``(w + offset) * factor - offset`` in float32."""
    if source.dtype not in TORCH_DTYPES:
        raise SelfMergeError(f"tensor {source.name} is {source.dtype}: scales need {', '.join(TORCH_DTYPES)}")
    data = bytearray(os.pread(fd, source.n_bytes, source.offset))
    tensor = torch.frombuffer(data, dtype=TORCH_DTYPES[source.dtype]) if data else torch.empty(0)
    if offset:
        scaled = ((tensor.float() + offset) * factor - offset).to(tensor.dtype)
    else:
        scaled = tensor * factor
    return scaled.contiguous().view(torch.uint8).numpy().tobytes()


def shards(order: list[tuple[str, SafetensorsEntry]], shard_bytes: int) -> list[list[tuple[str, SafetensorsEntry]]]:
    """Tensors grouped greedily into files of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    groups: list[list[tuple[str, SafetensorsEntry]]] = [[]]
    size = 0
    for item in order:
        if groups[-1] and size + item[1].n_bytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[1].n_bytes
    return groups


def write_safetensors(path: Path, tensors: list[tuple[str, SafetensorsEntry]], progress=None,
                      scaled: Scaled | None = None) -> None:  # fmt: skip
    """One safetensors file: JSON header (padded to 8 bytes, as the format wants), then the bytes;
    those ``scaled`` names multiplied (``_scaled_bytes``), every other tensor copied in the kernel."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, source in tensors:
        header[name] = {"dtype": source.dtype, "shape": list(source.shape), "data_offsets": [offset, offset + source.n_bytes]}
        offset += source.n_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as dst:
        write_all(dst.fileno(), len(text).to_bytes(8, "little") + text)
        sources: dict[Path, int] = {}
        try:
            for name, source in tensors:
                if source.file not in sources:
                    sources[source.file] = os.open(source.file, os.O_RDONLY)
                if scaled and name in scaled:
                    write_all(dst.fileno(), _scaled_bytes(sources[source.file], source, *scaled[name]))
                else:
                    copy_range(sources[source.file], dst.fileno(), source.offset, source.n_bytes)
                if progress is not None:
                    progress.update(source.n_bytes)
        finally:
            for fd in sources.values():
                os.close(fd)


def merge_safetensors(source: str | Path | Mapping[str, str | Path], plan: LayerPlan, out_dir: str | Path,
                      shard_bytes: int = DEFAULT_SHARD_BYTES, model_name: str | Mapping[str, str] | None = None,
                      progress: bool = False, base_source: str | None = None) -> Path:  # fmt: skip
    """Write the merge of the HF folder ``source`` (or, for a plan whose slices name their models, of
    a name -> folder map) to the new folder ``out_dir``; return it. ``base_source`` (model.base) names
    the source of every tensor outside the layers, and of config, tokenizer and chat template.

    Written under ``<out_dir>.partial`` and renamed at the end: a crash never leaves a half model
    under the final name. ``model_name`` is the model (or name -> model) the mergekit recipe names
    (default: the folders). Else config, tokenizer and chat template come with the first slice's model.
    """
    checkpoints = hf_sources(source, plan, base_source)
    if shard_bytes <= 0:
        raise SelfMergeError(f"out shard size {shard_bytes} is out of range: must be > 0 bytes")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SelfMergeError(f"{out_dir} already exists: remove it or choose another output folder")
    if model_name is None:
        folders = {name: str(checkpoint.folder) for name, checkpoint in checkpoints.items()}
        model_name = folders[""] if "" in folders else folders
    with written_as_partial(out_dir, folder=True) as partial:
        _write_folder(checkpoints, plan, partial, shard_bytes, model_name, progress, base_source)
    return out_dir


def _write_folder(checkpoints: Mapping[str, HFCheckpoint], plan: LayerPlan, partial: Path, shard_bytes: int,
                  model_name: str | Mapping[str, str], progress: bool,
                  base_source: str | None) -> None:  # fmt: skip
    order = merged_tensors(checkpoints, plan, base_source)
    first = checkpoints[plan.end_sources("", base_source)[0]]
    arch = find((first.config.get("architectures") or [None])[0], first.config.get("model_type"))
    scaled = scaled_tensors(order, plan, arch, first.layer_names)
    groups = shards(order, shard_bytes)
    names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    total = sum(source.n_bytes for group in groups for _, source in group)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"merge {plan}", disable=not progress, leave=False) as bar:
        for name, group in zip(names, groups):
            write_safetensors(partial / name, group, bar, scaled)
    if len(groups) > 1:
        weight_map = {tensor: name for name, group in zip(names, groups) for tensor, _ in group}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(merged_config(first.config, plan), indent=2) + "\n")
    for name in SIDE_FILES:
        if (first.folder / name).is_file():
            shutil.copy2(first.folder / name, partial / name)
    dtypes = {entry.dtype for _, entry in order}
    dtype = MERGEKIT_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None  # mixed: mergekit must not cast
    (partial / "mergekit_config.yml").write_text(recipe_beside(plan, model_name, dtype, base_source, arch))
