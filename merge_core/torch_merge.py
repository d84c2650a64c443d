"""The in-memory self-merge: a transformers model whose decoder layers ARE the base's layers.

No weight is copied: each position of the plan gets a shallow copy of its base layer (and of that
layer's attention module) that points at the same parameters, so a 48-layer plan of a 32-layer
model costs no extra memory. The shallow attention copy carries its own ``layer_idx``: the KV cache
is indexed by position, and two positions sharing one index would overwrite each other's cache.

A base spread over several GPUs (``device_map``, accelerate's dispatch) keeps its layers where they
are: each position of a plan runs on its base layer's GPU, accelerate's hook moving the hidden
states there, and the copy gets a hook of its own so that the copy's attention (and layer index) runs.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from merge_core import architectures
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import NO_SCALES, LayerPlan, Scales
from merge_core.model_shape import LOAD_IN, ModelShape
from merge_core.sources import check_named, check_slices

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements over GPUs
# of each GPU's free memory, what a spread base may not take: activations, the logits of a batch of
# windows and generation's KV cache (which takes half of what is free after loading, evals/torch_model.py)
GPU_RESERVE = 0.15


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


def check_fits(source: str | Path, dtype: str, load_in: str, device: torch.device,
               free: Optional[int] = None, where: str = "") -> None:  # fmt: skip
    """Refuse a base too large for the device (or for ``free`` bytes over several GPUs, ``where``)
    before loading it, with the numbers."""
    need = ModelShape.of(source).loaded_bytes(torch_dtype(dtype).itemsize, load_in)
    free = _free_bytes(device) if free is None else free
    if need > 0.95 * free:
        how = dtype if load_in == "none" else f"{load_in} ({dtype} outside the layers)"
        hints = ["backend.load_in=nf4 takes about a quarter of bf16"] if load_in != "nf4" else []
        hints += [] if where else ["backend.device_map=auto spreads it over several GPUs"]
        have = f"{where} have" if where else f"{device} has"
        raise SelfMergeError(
            f"the base {source} needs {_size(need)} in {how} but {have} {_size(free)} free"
            + "".join(f"; {hint}" for hint in hints)
        )


def check_device_map(device_map: str) -> None:
    """One of accelerate's placements (DEVICE_MAPS), else an error naming backend.device_map."""
    if device_map not in DEVICE_MAPS:
        raise SelfMergeError(f"backend.device_map={device_map!r} is unknown; choose one of {list(DEVICE_MAPS)}")


def max_memory(gpus: Sequence[int], free: Mapping[int, int]) -> dict[int, int]:
    """What a base spread over ``gpus`` may take of each (accelerate's ``max_memory``): its free bytes
    less ``GPU_RESERVE``, GPUs outside ``gpus`` left alone (another worker's)."""
    return {gpu: int(free[gpu] * (1 - GPU_RESERVE)) for gpu in gpus}


def check_on_gpus(device_map: Mapping[str, object], gpus: Sequence[int]) -> None:
    """A base placed by accelerate must lie on the worker's GPUs only: a layer offloaded to the CPU
    or disk runs ~100x slower, which a sweep must not find out after a night."""
    away = sorted({str(d) for d in device_map.values() if _gpu_index(d) not in gpus})
    if away:
        names = [name for name, d in device_map.items() if str(d) in away]
        raise SelfMergeError(
            f"the base does not fit GPUs {', '.join(map(str, gpus))}: accelerate put {len(names)} modules "
            f"on {', '.join(away)} (first {names[0]}); give the worker more GPUs (sweep.gpus_per_worker) "
            "or quantize its layers (backend.load_in=nf4)"
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


def load_causal_lm(source: str | Path, dtype: str = "float32", device: str = "auto", load_in: str = "none",
                   device_map: Optional[str] = None, gpus: Optional[Sequence[int]] = None):  # fmt: skip
    """(model, tokenizer) from an HF folder, a GGUF file (dequantized) or a hub id (the usual cache);
    ``load_in`` int8|nf4 quantizes the layers' linear weights while loading (an HF model only).
    ``gpus`` pins the model to these GPUs (a worker's, sweep/trials/workers.py): the first of them, or all of
    them with ``device_map`` (one of DEVICE_MAPS: accelerate places the layers, each on one GPU)."""
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
    target = resolve_device(device if not gpus else f"cuda:{gpus[0]}")
    if target.type == "cuda" and gpus:  # what asks for "cuda" without an index lands on this worker's GPU too
        torch.cuda.set_device(target)
    free = _free_on_gpus(device_map, gpus, target)  # {} unless device_map spreads the base
    if Path(where).exists():  # a hub id's files are fetched by from_pretrained; its size is checked by it
        fits = (sum(free.values()), f"GPUs {', '.join(map(str, free))}") if free else ()
        check_fits(source if "gguf_file" in kwargs else where, dtype, load_in, target, *fits)
    if "gguf_file" in kwargs:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if load_in != "none":  # bitsandbytes places weights as it quantizes them; the model is not moved after
        kwargs.update(quantization_config=_quantization_config(load_in, dtype), device_map={"": target})
    if free:  # accelerate places each layer on one of the GPUs and hooks it to move its inputs there
        kwargs.update(device_map=device_map, max_memory=max_memory(list(free), free))
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    if "gguf_file" in kwargs:
        follow_gguf_bos(tokenizer, path)
    if free:
        check_on_gpus(getattr(model, "hf_device_map", None) or {"": target.index}, list(free))
    elif load_in == "none":
        model.to(target)
    model.eval().requires_grad_(False)
    return model, tokenizer


def follow_gguf_bos(tokenizer, path: Path) -> None:
    """A GGUF says whether a BOS starts each text (``tokenizer.ggml.add_bos_token``), and llama.cpp follows
    it; transformers 5.17's tokenizer from Gemma 3's GGUF adds none (5.25's does), and Gemma without its
    BOS loses 0.09 of PIQA accuracy (paired, 150 items: README "Gemma 3"). The file's word is taken:
    ``add_bos_token`` set on the tokenizer, which ``TorchModel.bos_for_windows`` reads."""
    from merge_core.gguf_file import read_gguf_header

    entry = read_gguf_header(path).metadata.get("tokenizer.ggml.add_bos_token")
    if entry is not None and tokenizer.bos_token_id is not None:
        tokenizer.add_bos_token = bool(entry.value)


def _gpu_index(device) -> Optional[int]:
    """A GPU as accelerate's device maps name it (0, "cuda:0", a torch.device), else None."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str) and device.startswith("cuda"):
        device = torch.device(device)
    return device.index or 0 if isinstance(device, torch.device) and device.type == "cuda" else None


def _free_on_gpus(device_map: Optional[str], gpus: Optional[Sequence[int]], target: torch.device) -> dict[int, int]:
    """Free bytes of each GPU ``device_map`` spreads the base over (``gpus``, default every visible one);
    {} without a device_map."""
    if not device_map:
        return {}
    check_device_map(device_map)
    if target.type != "cuda":
        raise SelfMergeError(
            f"backend.device_map={device_map} spreads the model over GPUs, but the device is {target}"
        )
    return {gpu: _free_bytes(torch.device("cuda", gpu)) for gpu in gpus or range(torch.cuda.device_count())}


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters; its own child table, so swapping a child of
    the copy leaves the original alone."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone.__dict__.pop("_compiled_call", None)  # transformers' compiled forward of the original, bound to it
    if "_hf_hook" in module.__dict__:  # accelerate's forward is bound to the original: bind one to the copy
        _hook_copy(clone, module.__dict__["_hf_hook"])
    return clone


def _hook_copy(clone: nn.Module, hook) -> None:
    """accelerate's hook (``add_hook_to_module``) around the copy's own forward: inputs moved to the
    layer's GPU before, outputs handled by the hook after. The hook object is shared with the original:
    it holds the layer's device, and what it keeps from one call's start to its end is set anew each
    call. ``init_hook`` is not run again: it would place the weights, placed already and shared."""
    forward = type(clone).forward.__get__(clone)

    def hooked(*args, **kwargs):
        args, kwargs = hook.pre_forward(clone, *args, **kwargs)
        return hook.post_forward(clone, forward(*args, **kwargs))

    hooked = functools.update_wrapper(hooked, forward)  # its signature is the layer's (callers inspect it)
    clone.__dict__.update(_hf_hook=hook, _old_forward=forward, forward=hooked)


def _layer_at(layer: nn.Module, position: int, scales: Scales = NO_SCALES,
              targets: architectures.ScaleTargets | None = None) -> nn.Module:  # fmt: skip
    """The base layer at an output position: its own attention index; at a scaled repeat, the modules
    the family scales (``ScaleTargets``) answer their output times the factor, weights still shared."""
    clone = _shallow(layer)
    attention = _shallow(layer.self_attn)
    attention.layer_idx = position
    clone.self_attn = attention
    copied = {id(clone), id(attention)}  # modules of this position alone: changed in place
    for role in architectures.SCALE_ROLES if targets and not scales.is_identity else ():
        factor = getattr(scales, role)
        for target in getattr(targets, role) if factor != 1.0 else ():
            *parents, leaf = target.rstrip(".").split(".")
            owner = clone
            for name in parents:  # a copy of each module on the way, so the base layer stays unscaled
                if id(owner._modules[name]) not in copied:
                    owner._modules[name] = _shallow(owner._modules[name])
                    copied.add(id(owner._modules[name]))
                owner = owner._modules[name]
            owner._modules[leaf] = _times(owner._modules[leaf], factor)
    return clone


def _times(module: nn.Module, factor: float) -> nn.Module:
    """A copy of ``module`` whose output is multiplied by ``factor``: the same weights, no bytes more."""
    clone = _shallow(module)
    forward = clone.forward

    def scaled(*args, **kwargs):
        return forward(*args, **kwargs) * factor

    clone.__dict__["forward"] = functools.update_wrapper(scaled, forward)
    return clone


def merged_config(config, plan: LayerPlan):
    """A transformers config of the merge: the same rule as a merged config.json (architectures.py)."""
    merged, before = copy.deepcopy(config), config.to_dict()
    for key, value in architectures.merged_config(before, plan).items():
        if value != before[key]:
            setattr(merged, key, value)
    return merged


def _scale_targets(model: nn.Module, plan: LayerPlan) -> architectures.ScaleTargets | None:
    """The modules a plan's scales act on, from the architecture table (None: a plan without scales)."""
    if plan.scales.is_identity:
        return None
    config = model.config
    arch = architectures.find((getattr(config, "architectures", None) or [type(model).__name__])[0],
                              getattr(config, "model_type", None))  # fmt: skip
    if arch is None:
        raise architectures.unsupported(type(model).__name__)
    return arch.hf_scales


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
    targets = _scale_targets(first, plan)
    new_inner.layers = nn.ModuleList(
        _layer_at(models[name or ""].model.layers[layer], position, scales, targets)
        for position, ((name, layer), scales) in enumerate(zip(plan.layer_sources, plan.layer_scales))
    )  # fmt: skip
    new_inner.norm = last.model.norm
    merged = _shallow(first)
    merged.config = config
    merged.model = new_inner
    if not getattr(first.config, "tie_word_embeddings", False):  # a tied head is the first model's embeddings
        merged.lm_head = last.lm_head
    return merged
