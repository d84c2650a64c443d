"""The in-memory self-merge: a transformers model whose decoder layers ARE the base's layers.

No weight is copied: each position of the plan gets a shallow copy of its base layer (and of that
layer's attention module) that points at the same parameters, so a 48-layer plan of a 32-layer
model costs no extra memory. The shallow attention copy carries its own ``layer_idx``: the KV cache
is indexed by position, and two positions sharing one index would overwrite each other's cache.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from merge_core import architectures
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SelfMergeError(f"dtype {name!r} is not supported; choose one of {list(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfMergeError(f"device {name!r} was asked for but torch sees no CUDA device")
    return torch.device(name)


def load_causal_lm(source: str | Path, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer) from an HF folder, a GGUF file (dequantized) or a hub id (the usual cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = str(source)
    kwargs: dict = {}
    where = source
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise SelfMergeError(f"model file not found: {source}")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        raise SelfMergeError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from None
    architectures.of_config({"architectures": config.architectures, "model_type": config.model_type})
    if "gguf_file" in kwargs:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model.to(resolve_device(device)).eval().requires_grad_(False)
    return model, tokenizer


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters; its own child table, so swapping a child of
    the copy leaves the original alone."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def _layer_at(layer: nn.Module, position: int) -> nn.Module:
    clone = _shallow(layer)
    attention = _shallow(layer.self_attn)
    attention.layer_idx = position
    clone.self_attn = attention
    return clone


def merged_config(config, plan: LayerPlan):
    """A transformers config of the merge: the same rule as a merged config.json (architectures.py)."""
    merged, before = copy.deepcopy(config), config.to_dict()
    for key, value in architectures.merged_config(before, plan).items():
        if value != before[key]:
            setattr(merged, key, value)
    return merged


def merged_model(base: nn.Module, plan: LayerPlan) -> nn.Module:
    """The self-merge of a loaded ``*ForCausalLM`` as a model sharing the base's weights."""
    inner = base.model
    plan.validate(len(inner.layers))
    config = merged_config(base.config, plan)
    new_inner = _shallow(inner)
    new_inner.config = config
    new_inner.layers = nn.ModuleList(_layer_at(inner.layers[i], position) for position, i in enumerate(plan.layer_indices))
    merged = _shallow(base)
    merged.config = config
    merged.model = new_inner
    return merged

