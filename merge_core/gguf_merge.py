"""Self-merge a GGUF: write the base's blocks in plan order, tensor bytes copied as they are.

Every metadata entry is copied byte for byte except ``<arch>.block_count`` and per-layer arrays
(numeric arrays of length block_count, which llama.cpp reads per layer), which follow the plan.
A plan over several models (``a:0-24,b:8-32``) takes each block from its slice's file, the metadata
and embeddings from the first slice's model and the output norm and head from the last one's.
A sliding-window pattern that llama.cpp would derive from the layer index (Gemma 3: every sixth
layer global) is written out as one flag per output layer, so each layer keeps its source's kind.
Tensor data is copied file-to-file by the kernel (``copy_file_range``), so memory stays flat
whatever the model size and quantized blocks are never dequantized. A plan with scales multiplies the
tensors the architecture table names at each repeat, one at a time, in their own type (``gguf_scale``).
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
from gguf import GGUFValueType, Keys

from merge_core.architectures import gguf_layer_names, of_gguf, plan_source_tensors, sliding_layers
from merge_core.byte_copy import copy_range, write_all, written_as_partial
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import (
    ARRAY,
    GGUF_MAGIC,
    SCALAR_FORMATS,
    GGUFHeader,
    MetadataEntry,
    TensorInfo,
    align_up,
)
from merge_core.gguf_scale import check_scalable, scale_tensor_bytes
from merge_core.layer_plan import LayerPlan
from merge_core.sources import gguf_sources


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _entry_with_value(entry: MetadataEntry, value) -> bytes:
    """Re-encode ``entry`` with a new value of the same GGUF type."""
    head = _gguf_string(entry.key) + struct.pack("<I", entry.value_type)
    if entry.value_type == ARRAY:
        array = np.asarray(value, dtype=entry.value.dtype)
        return head + struct.pack("<IQ", entry.item_type, len(array)) + array.tobytes()
    return head + struct.pack(SCALAR_FORMATS[entry.value_type], value)


def _bool_array(key: str, values) -> bytes:
    head = _gguf_string(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.BOOL, len(values))
    return head + np.asarray(values, dtype=np.uint8).tobytes()


def source_sliding_layers(header: GGUFHeader) -> list[bool] | None:
    """One flag per base layer when llama.cpp derives the sliding-window layers from the index: from
    the file's period, else the architecture's built-in one; None when the file lists them per layer
    (a per-layer array, re-indexed like any other) or uses no sliding window."""
    arch, name = of_gguf(header.architecture), header.architecture
    window = header.metadata.get(Keys.Attention.SLIDING_WINDOW.format(arch=name))
    pattern = header.metadata.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=name))
    if arch is None or not arch.swa_period or window is None or not window.value:
        return None
    if pattern is not None and pattern.value_type == ARRAY:
        return None
    return sliding_layers(header.block_count, int(pattern.value) if pattern is not None else arch.swa_period)


def merged_metadata(headers: Mapping[str, GGUFHeader], plan: LayerPlan,
                    base_source: str | None = None) -> list[bytes]:  # fmt: skip
    """The merge's metadata: the entries of the embeddings' model (``plan.end_sources``: its tokenizer
    and chat template go with its embeddings), ``block_count`` and per-layer arrays following the plan,
    each output layer's value from its own source. ``headers`` by source name ("" for one model)."""
    first = headers[plan.end_sources("", base_source)[0]]
    arch = first.architecture
    block_count_key = f"{arch}.block_count"
    pattern_key = Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)
    positions = plan.layer_sources
    sliding = {name: source_sliding_layers(headers[name]) for name in {name for name, _ in positions}}
    derived = all(flags is not None for flags in sliding.values())
    entries = []
    for key, entry in first.metadata.items():
        if key == block_count_key:
            entries.append(_entry_with_value(entry, plan.n_layers))
            if derived:  # placed beside block_count; a scalar period is replaced
                entries.append(_bool_array(pattern_key, [sliding[name][layer] for name, layer in positions]))
        elif key == pattern_key and derived:
            continue
        elif (
            entry.value_type == ARRAY
            and isinstance(entry.value, np.ndarray)
            and key.startswith(arch + ".")
            and len(entry.value) == first.block_count
            and all(key in h.metadata and len(h.metadata[key].value) == h.block_count for h in headers.values())
        ):
            values = [headers[name].metadata[key].value[layer] for name, layer in positions]
            entries.append(_entry_with_value(entry, values))
        else:
            entries.append(entry.raw)
    return entries


def merged_tensor_order(headers: Mapping[str, GGUFHeader], plan: LayerPlan,
                        base_source: str | None = None) -> list[tuple[str, str, TensorInfo]]:  # fmt: skip
    """(output name, source, tensor): outside the layers in place, the plan's blocks where blk.* began."""
    names = gguf_layer_names(next(iter(headers.values())).architecture)
    return plan_source_tensors({name: h.tensors for name, h in headers.items()}, plan, names, "", base_source)


def scaled_factors(headers: Mapping[str, GGUFHeader], plan: LayerPlan,
                   order: list[tuple[str, str, TensorInfo]]) -> dict[str, float]:  # fmt: skip
    """Output tensor name -> factor, for the tensors a plan's scales multiply (GGUF stores a norm's
    whole weight, Gemma's +1 included, so a factor on a norm is a plain product here)."""
    if plan.scales.is_identity:
        return {}
    gguf_arch = next(iter(headers.values())).architecture
    arch = of_gguf(gguf_arch)
    if arch is None:
        raise SelfMergeError(f"plan {plan} has scales, but GGUF architecture {gguf_arch} is not in the "
                             "architecture table, which says which tensors they multiply")  # fmt: skip
    names, at, factors = gguf_layer_names(gguf_arch), plan.layer_scales, {}
    for name, _, tensor in order:
        split = names.split(name)
        factor = arch.gguf_scales.factor(split[1], at[split[0]]) if split else 1.0
        if factor != 1.0:
            check_scalable(tensor.name, tensor.ggml_type)
            factors[name] = factor
    return factors


def merged_size_bound(header: GGUFHeader, plan: LayerPlan) -> int:
    """An upper bound of the merged file's size, before writing it (for disk budgets)."""
    order = merged_tensor_order({"": header}, plan)
    data = sum(align_up(source.n_bytes, header.alignment) for _, _, source in order)
    extra_tensors = max(0, len(order) - len(header.tensors))
    return header.data_start + 256 * extra_tensors + 8 * plan.n_layers * len(header.metadata) + header.alignment + data


def merge_gguf(source: str | Path | Mapping[str, str | Path], plan: LayerPlan, out_path: str | Path,
               base_source: str | None = None) -> Path:  # fmt: skip
    """Write the merge of ``source`` (a GGUF; or, for a plan whose slices name their models, a map of
    name -> GGUF) following ``plan`` to ``out_path``; return the path. ``base_source`` (model.base)
    names the source of every tensor and entry outside the layers; else the plan's ends give them.

    The file is written next to its destination under a temporary name and renamed at the end,
    so a crash never leaves a half-written model under the final name.
    """
    headers = gguf_sources(source, plan, base_source)
    out_path = Path(out_path)
    for header in headers.values():
        if out_path.resolve() == header.path.resolve():
            raise SelfMergeError(f"output {out_path} would overwrite the base model")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    order = merged_tensor_order(headers, plan, base_source)
    factors = scaled_factors(headers, plan, order)
    metadata = merged_metadata(headers, plan, base_source)
    alignment = headers[plan.end_sources("", base_source)[0]].alignment

    out = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(order), len(metadata)))
    for raw in metadata:
        out += raw
    offset = 0
    for name, _, tensor in order:
        out += _gguf_string(name) + struct.pack("<I", len(tensor.dims)) + struct.pack(f"<{len(tensor.dims)}Q", *tensor.dims)
        out += struct.pack("<IQ", tensor.ggml_type, offset)
        offset = align_up(offset + tensor.n_bytes, alignment)
    out += b"\0" * (align_up(len(out), alignment) - len(out))

    with written_as_partial(out_path) as partial, open(partial, "wb") as dst, contextlib.ExitStack() as files:
        src_fds = {name: files.enter_context(open(h.path, "rb")).fileno() for name, h in headers.items()}
        dst_fd = dst.fileno()
        write_all(dst_fd, out)
        for name, src_offset, n_bytes, padding, scaled in _copy_runs(order, alignment, factors):
            if scaled is None:
                copy_range(src_fds[name], dst_fd, headers[name].data_start + src_offset, n_bytes)
            else:
                data = os.pread(src_fds[name], n_bytes, headers[name].data_start + src_offset)
                write_all(dst_fd, scale_tensor_bytes(scaled[0].name, scaled[0].ggml_type, data, scaled[1]))
            write_all(dst_fd, b"\0" * padding)
    return out_path


def _copy_runs(order: list[tuple[str, str, TensorInfo]], alignment: int,
               factors: Mapping[str, float] | None = None) -> list[tuple]:  # fmt: skip
    """(source, offset, bytes, zero padding after, None) per run of tensors that lie back to back in one
    source as in the output: a block's tensors, consecutive blocks of a slice. One kernel copy per
    run instead of one per tensor; the source's own alignment padding is copied inside a run. A tensor
    in ``factors`` is a run of its own, its last item (tensor, factor): it is read and multiplied."""
    runs: list[list] = []
    for out_name, name, tensor in order:
        scaled = (tensor, factors[out_name]) if factors and out_name in factors else None
        run = runs[-1] if runs else None
        adjacent = run is not None and run[0] == name and run[1] + run[2] + run[3] == tensor.offset
        if adjacent and scaled is None and run[4] is None:
            run[2] += run[3] + tensor.n_bytes
        else:
            run = [name, tensor.offset, tensor.n_bytes, 0, scaled]
            runs.append(run)
        run[3] = align_up(tensor.n_bytes, alignment) - tensor.n_bytes
    return [tuple(run) for run in runs]
