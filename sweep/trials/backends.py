"""Backends: how a plan becomes a model that the evals can open (``backend=llama_cpp|torch``).
``Backend`` states what the sweep needs of one; ``BACKENDS`` names them."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol

from evals.llama_cpp_model import LlamaCppModel
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import GGUFHeader, read_gguf_header
from merge_core.gguf_merge import merge_gguf, merged_size_bound
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import is_gguf, resolve_model_source
from merge_core.model_shape import ModelShape
from merge_core.sources import check_sources
from sweep.config import BackendConfig

log = logging.getLogger("selfmerge")


@functools.lru_cache(maxsize=4)
def _base_header(path: Path) -> GGUFHeader:
    """The base GGUF's header, read once: every trial asks for a size bound before its merge, and the
    base does not change during a sweep (kept out of the backend, which is pickled into each child)."""
    return read_gguf_header(path)


class Backend(Protocol):
    source: Path | dict[str, Path]  # the model the config names, resolved (a GGUF or an HF folder); or sources
    base: Any  # what is scored as the base: a GGUF path, or a loaded model (of several: model.base, else the 1st)
    base_source: Optional[str]  # model.base: the source of every tensor outside the layers of a build
    isolatable: ClassVar[bool]  # trials may run in child processes (everything it holds pickles)
    writes_files: ClassVar[bool]  # a build is a file under models/ (kept best first, under the disk budget)

    @property
    def shape(self) -> ModelShape: ...

    def build(self, plan: LayerPlan, out: Path) -> Any:
        """The merged model of ``plan``: a file written at ``out``, or an in-memory model."""

    def open_model(self, model: Any, n_ctx: int, threads: Optional[int] = None, batch: int = 512) -> Any:
        """A context manager over ``model`` (the base or a build) that the evals score (evals/base.py)."""

    def size_bound(self, plan: LayerPlan) -> int:
        """Bytes ``build`` will write for ``plan``, at most (disk budget); 0 when nothing is written."""

    def n_bytes(self, model: Any) -> int:
        """Bytes of what ``build`` wrote."""


@dataclass
class LlamaCppBackend:
    """A GGUF base is merged as it is. An HF base is converted (``convert_type``) and quantized
    (``quant``) once into ``work_dir``; ``requantize`` merges the unquantized GGUF and quantizes
    each plan. Plain paths only: it is pickled into each trial's child process."""

    source: Path | dict[str, Path]  # one model, or several by name (model.sources), each converted once
    config: BackendConfig
    work_dir: Path
    base_source: Optional[str] = None  # model.base
    base: Path = field(init=False)  # the GGUF scored as the base (of several: model.base, else the first)
    merge_from: Path | dict[str, Path] = field(init=False)  # the GGUF(s) whose blocks a plan re-indexes
    requantize: bool = field(init=False)  # merge unquantized GGUFs, then quantize each plan
    isolatable = True  # trials may run in child processes
    writes_files = True
    open_model = staticmethod(LlamaCppModel)

    def __post_init__(self) -> None:
        sources = self.source if isinstance(self.source, dict) else {"": self.source}
        check_sources(sources)  # several sources: before any conversion
        files = {name: self._gguf(path, f"source-{name}" if name else "base") for name, path in sources.items()}
        self.base = files[self.base_source or next(iter(files))][0]
        merge_from = {name: pair[1] for name, pair in files.items()}
        self.merge_from = merge_from if isinstance(self.source, dict) else merge_from[""]
        self.requantize = any(scored != unquantized for scored, unquantized in files.values())

    def _gguf(self, source: Path, stem: str) -> tuple[Path, Path]:
        """(the GGUF scored, the GGUF merged) of one model: a GGUF itself; an HF folder converted and
        quantized once into ``work_dir/base`` (kept: a resumed sweep or a second worker reuses them)."""
        if is_gguf(source):
            return source, source
        from merge_core.gguf_convert import convert_hf_to_gguf
        from merge_core.gguf_quantize import check_quant_type, quantize_gguf

        quant = check_quant_type(self.config.quant)
        folder = self.work_dir / "base"
        unquantized = folder / f"{stem}.{self.config.convert_type}.gguf"
        scored = folder / f"{stem}.{quant}.gguf"
        if not unquantized.is_file():
            log.info("converting %s to %s", source, unquantized)
            convert_hf_to_gguf(source, unquantized, self.config.convert_type, progress=True)
        if not scored.is_file():
            log.info("quantizing %s to %s", unquantized.name, quant)
            quantize_gguf(unquantized, scored, quant)
        return scored, scored if self.config.quant_mode == "reuse" else unquantized

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_gguf_header(_base_header(self.base))

    def build(self, plan: LayerPlan, out: Path) -> Path:
        if not self.requantize:
            return merge_gguf(self.merge_from, plan, out, self.base_source)
        from merge_core.gguf_quantize import quantize_gguf

        unquantized = out.with_name(out.name + ".unquantized")
        try:
            merge_gguf(self.merge_from, plan, unquantized, self.base_source)
            return quantize_gguf(unquantized, out, self.config.quant)
        finally:
            unquantized.unlink(missing_ok=True)

    def size_bound(self, plan: LayerPlan) -> int:
        return merged_size_bound(_base_header(self.base), LayerPlan(plan.slices))  # sources share the shape

    def n_bytes(self, model: Path) -> int:
        return model.stat().st_size


class TorchBackend:
    """The base loaded once (CPU or GPU); each plan is a model sharing its layers, built in ~1 ms."""

    isolatable = False  # the loaded base (perhaps on a GPU) lives in this process
    writes_files = False

    def __init__(self, source: Path | dict[str, Path], config: BackendConfig,
                 base_source: Optional[str] = None, gpus: Optional[tuple[int, ...]] = None) -> None:  # fmt: skip
        from merge_core.torch_merge import load_causal_lm

        from evals.torch_model import compiled_layer_fn, run_layer

        self.source, self.config, self.base_source = source, config, base_source
        sources = source if isinstance(source, dict) else {"": source}
        check_sources(sources)  # before loading anything
        # every source loaded once, its layers shared by every plan; model.base (else the first) is the base;
        # on this worker's GPUs (sweep.gpus), spread over them with backend.device_map
        loaded = {name: load_causal_lm(path, config.dtype, config.device, config.load_in, config.device_map, gpus)
                  for name, path in sources.items()}  # fmt: skip
        self.models = {name: model for name, (model, _) in loaded.items()}
        self.base, self.tokenizer = loaded[base_source or next(iter(loaded))]
        self.layer_fn = compiled_layer_fn() if config.compile else run_layer

    @property
    def shape(self) -> ModelShape:
        layers = self.base.model.layers
        per_layer = sum(p.numel() for p in layers[0].parameters())
        outside = sum(p.numel() for p in self.base.parameters()) - per_layer * len(layers)
        return ModelShape(len(layers), per_layer, outside)

    def build(self, plan: LayerPlan, out: Optional[Path] = None) -> Any:
        from merge_core.torch_merge import merged_model

        return merged_model(self.models if plan.sources else self.base, plan, self.base_source)

    def open_model(self, model, n_ctx: int, threads: Optional[int] = None, batch: int = 512):
        from evals.torch_model import TorchModel

        return TorchModel(model, self.tokenizer, n_ctx, self.config.batch_windows, self.layer_fn, self.config.gen_batch)

    def size_bound(self, plan: LayerPlan) -> int:
        return 0  # nothing is written

    def n_bytes(self, model) -> int:
        return 0


BACKENDS = {  # backend.kind -> how to make it from (source, config, work_dir, base_source, gpus)
    "llama_cpp": lambda source, config, work_dir, base, gpus: LlamaCppBackend(source, config, work_dir, base),
    "torch": lambda source, config, work_dir, base, gpus: TorchBackend(source, config, base, gpus),
}


def make_backend(model: str | dict[str, str], config: BackendConfig, work_dir: Path,
                 base_source: Optional[str] = None, gpus: Optional[tuple[int, ...]] = None) -> Backend:  # fmt: skip
    """The backend for ``model``: one model's path, or several sources by name (model.sources; the first
    is scored as the base), ``base_source`` (model.base) giving every tensor outside the layers, on the
    worker's ``gpus`` (sweep.gpus; None: backend.device)."""
    if config.kind not in BACKENDS:
        raise SelfMergeError(f"unknown backend {config.kind!r}; choose one of {list(BACKENDS)}")
    if isinstance(model, dict):
        sources = {name: resolve_model_source(path) for name, path in model.items()}
        return BACKENDS[config.kind](sources, config, work_dir, base_source, gpus)
    return BACKENDS[config.kind](resolve_model_source(model), config, work_dir, base_source, gpus)
