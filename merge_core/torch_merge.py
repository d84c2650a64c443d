"""The in-memory self-merge: a transformers model whose decoder layers ARE the base's layers.

No weight is copied: each position of the plan gets a shallow copy of its base layer (and of that
layer's attention module) that points at the same parameters, so a 48-layer plan of a 32-layer
model costs no extra memory. The shallow attention copy carries its own ``layer_idx``: the KV cache
is indexed by position, and two positions sharing one index would overwrite each other's cache.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from merge_core import architectures
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import LOAD_IN, ModelShape
from merge_core.sources import check_named, check_slices

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


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    return f"{n:.1f} {unit}"


def check_fits(source: str | Path, dtype: str, load_in: str, device: torch.device) -> None:
    """Refuse a base too large for the device before loading it, with the numbers."""
    need, free = ModelShape.of(source).loaded_bytes(torch_dtype(dtype).itemsize, load_in), _free_bytes(device)
    if need > 0.95 * free:
        how = dtype if load_in == "none" else f"{load_in} ({dtype} outside the layers)"
        hint = "; backend.load_in=nf4 takes about a quarter of bf16" if load_in != "nf4" else ""
        raise SelfMergeError(
            f"the base {source} needs {_size(need)} in {how} but {device} has {_size(free)} free{hint}"
        )


def _quantization_config(load_in: str, dtype: str):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SelfMergeError(f"backend.load_in={load_in} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if load_in == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype)
    )


def load_causal_lm(source: str | Path, dtype: str = "float32", device: str = "auto", load_in: str = "none"):
    """(model, tokenizer) from an HF folder, a GGUF file (dequantized) or a hub id (the usual cache);
    ``load_in`` int8|nf4 quantizes the layers' linear weights while loading (an HF model only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if load_in not in LOAD_IN:
        raise SelfMergeError(f"backend.load_in={load_in!r} is unknown; choose one of {list(LOAD_IN)}")
    source = str(source)
    kwargs: dict = {}
    where = source
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise SelfMergeError(f"model file not found: {source}")
        if load_in != "none":
            raise SelfMergeError(
                f"backend.load_in={load_in} needs a Hugging Face model; {path.name} is a GGUF, which "
                "transformers dequantizes: score it with backend=llama_cpp, or give its HF original"
            )
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        raise SelfMergeError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from None
    architectures.of_config({"architectures": config.architectures, "model_type": config.model_type})
    target = resolve_device(device)
    if Path(where).exists():  # a hub id's files are fetched by from_pretrained; its size is checked by it
        check_fits(source if "gguf_file" in kwargs else where, dtype, load_in, target)
    if "gguf_file" in kwargs:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if load_in != "none":  # bitsandbytes places weights as it quantizes them; the model is not moved after
        kwargs.update(quantization_config=_quantization_config(load_in, dtype), device_map={"": target})
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    if load_in == "none":
        model.to(target)
    model.eval().requires_grad_(False)
    return model, tokenizer


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters; its own child table, so swapping a child of
    the copy leaves the original alone."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone.__dict__.pop("_compiled_call", None)  # transformers' compiled forward of the original, bound to it
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


def merged_model(base: nn.Module | Mapping[str, nn.Module], plan: LayerPlan,
                 base_source: str | None = None) -> nn.Module:  # fmt: skip
    """The merge of a loaded ``*ForCausalLM`` (or, for a plan whose slices name their models, of a name
    -> model map of fine-tunes of one base) as a model sharing their weights. Embeddings and config come
    from the first slice's model, the final norm and an untied head from the last one's; all of them
    from ``base_source`` (model.base) if given."""
    models = base if isinstance(base, Mapping) else {"": base}
    check_named(plan, models, base_source)
    check_slices(plan, {name: len(models[name].model.layers) for name in set(plan.source_of_slices(""))})
    first, last = (models[name] for name in plan.end_sources("", base_source))
    config = merged_config(first.config, plan)
    new_inner = _shallow(first.model)
    new_inner.config = config
    new_inner.layers = nn.ModuleList(
        _layer_at(models[name or ""].model.layers[layer], position) for position, (name, layer) in enumerate(plan.layer_sources)
    )  # fmt: skip
    new_inner.norm = last.model.norm
    merged = _shallow(first)
    merged.config = config
    merged.model = new_inner
    if not getattr(first.config, "tie_word_embeddings", False):  # a tied head is the first model's embeddings
        merged.lm_head = last.lm_head
    return merged
