"""Several source models in one plan (a frankenmerge of fine-tunes of one base): which files a plan
reads, and whether they fit together. Sources must agree on everything that shapes a layer's
input and output and on the vocabulary; tensor types may differ (GGUF stores a type per tensor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from gguf import Keys

from merge_core.architectures import gguf_layer_names
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import GGUFHeader, read_gguf_header
from merge_core.hf_checkpoint import HFCheckpoint
from merge_core.layer_plan import LayerPlan

H = TypeVar("H")

# GGUF metadata that must be equal in every source ({arch} filled in); the vocabulary is compared as stored
GGUF_SHAPE_KEYS = (
    Keys.General.ARCHITECTURE, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.FEED_FORWARD_LENGTH, Keys.Attention.HEAD_COUNT,
    Keys.Attention.HEAD_COUNT_KV, Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH, Keys.LLM.VOCAB_SIZE,
    Keys.Tokenizer.MODEL, Keys.Tokenizer.LIST,
)  # fmt: skip
# config.json keys that must be equal in every HF source (their tokenizer.json too)
HF_SHAPE_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip


def _open_sources(source, plan: LayerPlan, open_one: Callable[[Any], H], check: Callable[[dict[str, H]], None],
                  base_source: str | None = None) -> dict[str, H]:  # fmt: skip
    """``source`` opened for ``plan``: {"": it} for a plan without names, else every source the plan
    names and ``base_source`` (model.base), checked to fit together (``check``)."""
    if not isinstance(source, Mapping):
        if plan.sources:
            raise SelfMergeError(
                f"plan {plan} takes slices from {', '.join(plan.source_names)}: give a file for each"
            )
        if base_source:
            raise SelfMergeError(f"base source {base_source!r} names a model, but one model was given")
        return {"": open_one(source)}
    if not plan.sources:
        raise SelfMergeError(f"plan {plan} names no source, but several models were given: name each slice's")
    check_named(plan, source, base_source)
    opened = {name: open_one(source[name]) for name in used_sources(plan, base_source)}
    check(opened)
    return opened


def used_sources(plan: LayerPlan, base_source: str | None = None) -> tuple[str, ...]:
    """The sources a merge reads: those the plan names, then ``base_source`` if it is another."""
    return tuple(dict.fromkeys(plan.source_names + ((base_source,) if base_source else ())))


def check_named(plan: LayerPlan, sources: Mapping[str, Any], base_source: str | None = None) -> None:
    """Every source the plan names, and ``base_source``, is among ``sources``."""
    missing = [name for name in used_sources(plan, base_source) if name not in sources]
    if missing:
        owner = f"plan {plan} names source" if missing[0] in plan.sources else "base source"
        raise SelfMergeError(f"{owner} {missing[0]!r}, which is not among {sorted(sources)}")


def check_slices(plan: LayerPlan, n_layers: Mapping[str, int]) -> None:
    """Every slice lies inside its source (``n_layers`` by source name, "" for a plan of one model)."""
    for i, ((start, end), name) in enumerate(zip(plan.slices, plan.source_of_slices("")), 1):
        if end > n_layers[name]:
            of = f" of source {name!r}" if name else ""
            raise SelfMergeError(f"slice {i} ({start}-{end}) ends past layer {n_layers[name]}{of}")


def gguf_sources(source: str | Path | Mapping[str, str | Path], plan: LayerPlan,
                 base_source: str | None = None) -> dict[str, GGUFHeader]:  # fmt: skip
    """The GGUF headers a plan reads, by source name ("" for a plan of one model), checked to fit
    together and to hold every slice. ``source``: one GGUF for a plan without names, else name -> file;
    ``base_source``: the source of every tensor outside the layers (model.base), else the ends' own."""
    headers = _open_sources(source, plan, read_gguf_header, check_gguf_compatible, base_source)
    check_slices(plan, {name: header.block_count for name, header in headers.items()})
    return headers


def hf_sources(source: str | Path | Mapping[str, str | Path], plan: LayerPlan,
               base_source: str | None = None) -> dict[str, HFCheckpoint]:  # fmt: skip
    """The same for Hugging Face folders: configs and safetensors headers, no weight loaded."""
    checkpoints = _open_sources(source, plan, HFCheckpoint.open, check_hf_compatible, base_source)
    check_slices(plan, {name: checkpoint.n_layers for name, checkpoint in checkpoints.items()})
    return checkpoints


def check_hf_compatible(checkpoints: Mapping[str, HFCheckpoint]) -> None:
    """Refuse folders that differ in a key of ``HF_SHAPE_KEYS``, their tokenizer.json, or a layer
    tensor's shape, naming what differs."""
    (first, reference), *others = checkpoints.items()
    for name, checkpoint in others:
        for key in HF_SHAPE_KEYS:
            if reference.config.get(key) != checkpoint.config.get(key):
                raise SelfMergeError(f"sources {first!r} and {name!r} differ in config.json {key}: "
                                     f"{reference.config.get(key)!r} vs {checkpoint.config.get(key)!r}")  # fmt: skip
        tokenizers = [c.folder / "tokenizer.json" for c in (reference, checkpoint)]
        contents = [path.read_bytes() if path.is_file() else None for path in tokenizers]
        if contents[0] != contents[1]:
            raise SelfMergeError(
                f"sources {first!r} and {name!r} differ in tokenizer.json: not the same vocabulary"
            )
        _same_layer_shapes(first, name, *(
            {split[1]: e.shape for e in c.tensors.values() if (split := c.layer_names.split(e.name)) and split[0] == 0}
            for c in (reference, checkpoint)
        ))  # fmt: skip


def _same_layer_shapes(first: str, name: str, mine: dict, theirs: dict) -> None:
    for suffix in sorted(set(mine) | set(theirs)):
        if mine.get(suffix) != theirs.get(suffix):
            raise SelfMergeError(f"sources {first!r} and {name!r} differ in layer tensor {suffix}: "
                                 f"{mine.get(suffix)} vs {theirs.get(suffix)}")  # fmt: skip


def check_gguf_compatible(headers: Mapping[str, GGUFHeader]) -> None:
    """Refuse GGUFs that differ in a key of ``GGUF_SHAPE_KEYS`` or in a layer tensor's shape, naming
    the key and both values."""
    (first, reference), *others = headers.items()
    arch = reference.architecture
    for name, header in others:
        for template in GGUF_SHAPE_KEYS:
            key = template.format(arch=arch)
            mine, theirs = reference.metadata.get(key), header.metadata.get(key)
            if (mine.raw if mine else None) != (theirs.raw if theirs else None):
                if mine is not None and theirs is not None and mine.value is None:  # a list of strings
                    raise SelfMergeError(
                        f"sources {first!r} and {name!r} differ in {key}: not the same vocabulary"
                    )
                show = [repr(entry.value) if entry is not None else "(absent)" for entry in (mine, theirs)]
                raise SelfMergeError(
                    f"sources {first!r} and {name!r} differ in {key}: {show[0]} vs {show[1]}"
                )
        names = gguf_layer_names(arch)
        _same_layer_shapes(first, name, *(
            {split[1]: t.dims for t in h.tensors if (split := names.split(t.name)) and split[0] == 0}
            for h in (reference, header)
        ))  # fmt: skip


def check_sources(paths: Mapping[str, Path]) -> None:
    """Several source models (GGUF files, or HF folders) checked to fit together from their headers,
    before anything loads: a sweep refuses them at the start, not at its first trial."""
    if len(paths) < 2:
        return
    if all(Path(path).is_dir() for path in paths.values()):
        check_hf_compatible({name: HFCheckpoint.open(path) for name, path in paths.items()})
    elif any(Path(path).is_dir() for path in paths.values()):
        raise SelfMergeError(f"model.sources mixes GGUF files and HF folders ({dict(paths)}): give one kind")
    else:
        check_gguf_compatible({name: read_gguf_header(path) for name, path in paths.items()})
