"""The architecture table: what selfmerge knows of each model family, as data.

Every path reads this one module: the GGUF merge, the safetensors passthrough, HF-to-GGUF
conversion, the torch backend, shape and size estimates, and the refusal message. Which tensors
are layer ``i`` is one answer (``LayerNames.split``); the re-ordered tensor list of a plan is one
function (``plan_tensors``). Adding a family is one ``Architecture`` entry plus its tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence, TypeVar

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan, Scales


@dataclass(frozen=True)
class LayerNames:
    """How one format names a layer's tensors: ``<prefix><index>.<suffix>``; and which tensors outside
    the layers come after them (final norm, output head), which a frankenmerge takes from the model of
    its last slice (mergekit's passthrough does; the embeddings come with the first slice's model)."""

    prefix: str
    after_layers: tuple[str, ...] = ()  # name prefixes
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(rf"^{re.escape(self.prefix)}(\d+)\.(.+)$"))

    def split(self, name: str) -> Optional[tuple[int, str]]:
        """(layer index, suffix) of a layer tensor's name; None for a tensor outside the layers."""
        match = self.pattern.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}{index}.{suffix}"


HF_LAYERS = LayerNames("model.layers.", after_layers=("model.norm.", "lm_head."))  # transformers' decoder stack
GGUF_LAYERS = LayerNames("blk.", after_layers=("output_norm.", "output."))  # llama.cpp (gguf-py's TENSOR_NAMES)


SCALE_ROLES = ("qk", "attn_out", "mlp_out")  # the factors of Scales


@dataclass(frozen=True)
class ScaleTargets:
    """Which of a layer's tensors carry each factor of ``Scales``, as name suffixes (``q_proj.`` takes
    the weight and a bias alike: Qwen2's ``q = Wx + b`` scales as a whole). A factor goes on the last
    linear map before what it scales; where an RMSNorm follows that map (Qwen3's and Gemma 3's q/k
    norms, Gemma 3's post-attention and post-feed-forward norms) the norm would undo it (RMSNorm(s x) =
    RMSNorm(x)), so it goes on the norm's weight, after which nothing is normalised again. RoPE is a
    rotation, linear, so a factor on q or k before it is the same factor after it."""

    qk: tuple[str, ...]
    attn_out: tuple[str, ...]
    mlp_out: tuple[str, ...]

    def factor(self, suffix: str, scales: Scales) -> float:
        """The factor on the layer tensor ``suffix`` at a position with ``scales`` (1.0: untouched)."""
        for role in SCALE_ROLES:
            if suffix.startswith(getattr(self, role)):
                return getattr(scales, role)
        return 1.0

    def filters(self) -> list[tuple[str, str, str]]:
        """(target suffix, mergekit ``filter`` (the tensor's own name: ``q_proj``), role) of each target."""
        return [(target, target.rstrip(".").rsplit(".", 1)[-1], role) for role in SCALE_ROLES
                for target in getattr(self, role)]  # fmt: skip


# Llama, Mistral, Qwen2: the projections themselves
PROJECTIONS_HF = ScaleTargets(
    ("self_attn.q_proj.", "self_attn.k_proj."), ("self_attn.o_proj.",), ("mlp.down_proj.",)
)
PROJECTIONS_GGUF = ScaleTargets(("attn_q.", "attn_k."), ("attn_output.",), ("ffn_down.",))
# Qwen3: q/k normalised per head after their projections
QK_NORMS_HF = ScaleTargets(
    ("self_attn.q_norm.", "self_attn.k_norm."), PROJECTIONS_HF.attn_out, PROJECTIONS_HF.mlp_out
)
QK_NORMS_GGUF = ScaleTargets(("attn_q_norm.", "attn_k_norm."), PROJECTIONS_GGUF.attn_out, PROJECTIONS_GGUF.mlp_out)
# Gemma 3: each branch's output normalised again before the residual add
GEMMA3_HF = ScaleTargets(QK_NORMS_HF.qk, ("post_attention_layernorm.",), ("post_feedforward_layernorm.",))
GEMMA3_GGUF = ScaleTargets(QK_NORMS_GGUF.qk, ("post_attention_norm.",), ("post_ffw_norm.",))


@dataclass(frozen=True)
class Architecture:
    name: str  # the family, as users say it
    hf_classes: tuple[str, ...]  # transformers ``*ForCausalLM`` classes (config.json "architectures")
    model_types: tuple[str, ...]  # config.json "model_type"
    gguf_arch: str  # llama.cpp's general.architecture
    permute_qk: bool  # llama.cpp wants q/k rows interleaved (HF stores them for rotate-half RoPE)
    tied_embeddings: bool = False  # tie_word_embeddings when config.json does not say (transformers' default)
    # llama.cpp's built-in sliding-window period when a GGUF states none: layer i slides unless
    # i % period == period - 1. It is derived from the index, so a merge writes the pattern out per layer.
    swa_period: int = 0
    norm_offset: float = 0.0  # HF stores RMSNorm weights as w - offset (Gemma: x * (1 + w)); GGUF stores w
    hf_layers: LayerNames = HF_LAYERS
    gguf_layers: LayerNames = GGUF_LAYERS
    hf_scales: ScaleTargets = PROJECTIONS_HF  # where a repeat's factors go (LayerPlan.scales)
    gguf_scales: ScaleTargets = PROJECTIONS_GGUF

    def hf_scaled(self, suffix: str, scales: Scales) -> tuple[float, float]:
        """(factor, offset) for the HF tensor ``suffix``: its new weight is ``(w + offset) * factor - offset``,
        the norm's effective weight scaled where HF stores it less ``norm_offset``; (1, 0): untouched."""
        factor = self.hf_scales.factor(suffix, scales)
        offset = self.norm_offset if factor != 1.0 and "norm" in suffix else 0.0
        return factor, offset


ARCHITECTURES = (
    Architecture("llama", ("LlamaForCausalLM",), ("llama",), gguf_arch="llama", permute_qk=True),
    Architecture("mistral", ("MistralForCausalLM",), ("mistral",), gguf_arch="llama", permute_qk=True),
    Architecture("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), gguf_arch="qwen2", permute_qk=False),
    # Qwen3: Qwen2 without q/k/v biases, with an RMSNorm on each head's queries and keys (attn_q_norm, attn_k_norm)
    Architecture("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), gguf_arch="qwen3", permute_qk=False,
                 hf_scales=QK_NORMS_HF, gguf_scales=QK_NORMS_GGUF),
    # Gemma 3 text models: q/k norms, four norms a layer, embeddings scaled by sqrt(hidden), GELU-tanh,
    # five sliding-window layers to one global layer (config.json's layer_types), each with its own RoPE base
    Architecture("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), gguf_arch="gemma3", permute_qk=False,
                 tied_embeddings=True, swa_period=6, norm_offset=1.0,
                 hf_scales=GEMMA3_HF, gguf_scales=GEMMA3_GGUF),
)
_BY_CLASS = {cls: arch for arch in ARCHITECTURES for cls in arch.hf_classes}
_BY_MODEL_TYPE = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}
SUPPORTED = tuple(_BY_CLASS)


def mergekit_scale_filters() -> dict[str, str]:
    """Every family's mergekit ``filter`` names and the factor each carries (reading a recipe, whose
    family is not known yet)."""
    return {name: role for arch in ARCHITECTURES for _, name, role in arch.hf_scales.filters()}


def find(hf_class: Optional[str] = None, model_type: Optional[str] = None) -> Optional[Architecture]:
    """The entry for a transformers class name (or, when a config names none, its ``model_type``)."""
    return _BY_CLASS.get(hf_class) if hf_class else _BY_MODEL_TYPE.get(model_type or "")


def of_config(config: dict) -> Architecture:
    """The entry of a config.json; a clear error naming the architecture and the supported list."""
    hf_class = (config.get("architectures") or [None])[0]
    arch = find(hf_class, config.get("model_type"))
    if arch is None:
        raise unsupported(hf_class or config.get("model_type") or "(none in config.json)")
    return arch


def unsupported(name: str) -> SelfMergeError:
    return SelfMergeError(f"architecture {name} is not supported; supported: {', '.join(SUPPORTED)}")


def of_model(source) -> Optional[Architecture]:
    """The entry of a local GGUF file or HF folder, from its header or config.json (None: not in the
    table, or neither of those on disk, e.g. a hub id)."""
    import json
    from pathlib import Path

    from merge_core.gguf_file import read_gguf_header

    source = Path(source)
    if (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
        return find((config.get("architectures") or [None])[0], config.get("model_type"))
    return of_gguf(read_gguf_header(source).architecture) if source.is_file() else None


def hf_layer_names(config: dict) -> LayerNames:
    """Layer naming of an HF checkpoint; a family not in the table is read with transformers' usual one
    (the safetensors passthrough needs nothing more)."""
    arch = find((config.get("architectures") or [None])[0], config.get("model_type"))
    return arch.hf_layers if arch else HF_LAYERS


def of_gguf(gguf_arch: str) -> Optional[Architecture]:
    """The first entry written as llama.cpp's ``gguf_arch`` (Llama and Mistral share "llama")."""
    return next((arch for arch in ARCHITECTURES if arch.gguf_arch == gguf_arch), None)


def gguf_layer_names(gguf_arch: str) -> LayerNames:
    arch = of_gguf(gguf_arch)
    return arch.gguf_layers if arch else GGUF_LAYERS


def sliding_layers(n_layers: int, period: int) -> list[bool]:
    """Which layers llama.cpp runs with the sliding window when it derives them from the index."""
    return [period == 0 or i % period < period - 1 for i in range(n_layers)]


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


def plan_tensors(tensors: Sequence[T], plan: LayerPlan, names: LayerNames) -> list[tuple[str, T]]:
    """(output name, source tensor) for a plan of one model: ``plan_source_tensors`` with one source."""
    return [(name, tensor) for name, _, tensor in plan_source_tensors({"": tensors}, plan, names, "")]


def plan_source_tensors(tensors: Mapping[str, Sequence[T]], plan: LayerPlan, names: LayerNames, default: str,
                        base_source: Optional[str] = None) -> list[tuple[str, str, T]]:  # fmt: skip
    """The one re-order planner: (output name, source, source tensor) for ``plan`` over the models in
    ``tensors`` (by source name; ``default`` for a plan without names). Tensors outside the layers stay
    in place, in their model's order (``plan.end_sources``): those ``names.after_layers`` lists from
    the last slice's model, the rest (embeddings) from the first; all from ``base_source`` if given.
    The plan's layers are written where the layers began, each with its tensors in source order; a
    layer used twice appears twice."""
    first, last = plan.end_sources(default, base_source)
    layers: dict[tuple[str, int], list[tuple[str, T]]] = {}
    for source in set(plan.source_of_slices(default)):
        for tensor in tensors[source]:
            split = names.split(tensor.name)
            if split is not None:
                layers.setdefault((source, split[0]), []).append((split[1], tensor))
    last_outside = {t.name: t for t in tensors[last] if names.split(t.name) is None}
    order: list[tuple[str, str, T]] = []
    layers_written = False
    for tensor in tensors[first]:
        if names.split(tensor.name) is None:
            after = tensor.name.startswith(names.after_layers) and tensor.name in last_outside
            order.append((tensor.name, last, last_outside[tensor.name]) if after else (tensor.name, first, tensor))
        elif not layers_written:
            layers_written = True
            for out_index, (source, layer) in enumerate(plan.layer_sources):
                source = source or default
                order.extend((names.name(out_index, suffix), source, t) for suffix, t in layers[(source, layer)])
    return order


def merged_config(config: dict, plan: LayerPlan) -> dict:
    """config.json of the merge: ``num_hidden_layers`` and every per-layer list (one item per base
    layer, e.g. ``layer_types``) follow the plan. The rule is generic, so no family lists its keys."""
    n_base = int(config["num_hidden_layers"])
    merged = dict(config, num_hidden_layers=plan.n_layers)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == n_base and n_base > 1 and key != "architectures":
            merged[key] = [value[i] for i in plan.layer_indices]
    return merged
