"""What a trial measures: the configured evaluations of one model, as flat record fields.

Built once per sweep (the perplexity text is tokenized and the EQ-Bench items loaded once); the
base model and every merged plan are scored by the same object, so their numbers compare. Each
evaluation comes from the registry (evals/registry.py) and keeps the contract of evals/base.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from evals.base import EvalContext, StopEarly, never
from evals.llama_cpp_model import LlamaCppModel
from evals.registry import EVALS
from evals.schema import Field
from sweep.config import EvalConfig, SweepConfig


def scoring_fingerprint(config: SweepConfig, base_path: Path | dict[str, Path]) -> dict:
    """What makes two scores comparable; a resumed sweep must match it (several sources: each of them,
    and model.base if set)."""
    model = {name: str(path) for name, path in base_path.items()} if isinstance(base_path, dict) else str(base_path)
    base_source = {"base_source": config.model.base} if config.model.base else {}
    return {"model": model, **base_source, "backend": config.backend.scoring(), "eval": config.eval.fingerprint()}


def with_new_defaults(stored: dict) -> dict:
    """A fingerprint stored by an earlier selfmerge, each evaluation setting added since filled in at its
    default (a new setting's default scores as before, e.g. eval.ppl.kld=false), so that sweep resumes."""
    evals = {
        name: {**EvalConfig({name: EVALS[name].config()}).fingerprint()[name], **section} if name in EVALS else section
        for name, section in stored.get("eval", {}).items()
    }
    return {**stored, "eval": evals}


def eval_config_from_fingerprint(fingerprint: dict, threads: Optional[int] = None) -> EvalConfig:
    """The EvalConfig a sweep scored with, from its stored fingerprint (to re-score the same way)."""
    return EvalConfig.from_fingerprint(fingerprint["eval"], threads)


class TrialScorer:
    """``early_windows`` > 0 scores perplexity in two stages (see PerplexityEval.staged): the record
    gets ``ppl_early``; ``item_steps``, item evaluations in steps (evals/bench.py). A ``stop_early(stage)``
    that answers True ends the scoring there.
    ``open_model`` is the backend's: it opens a GGUF path (llama.cpp) or an in-memory model (torch)."""

    def __init__(self, config: EvalConfig, base_model, early_windows: int = 0, open_model=LlamaCppModel,
                 item_steps: tuple[int, ...] = ()) -> None:  # fmt: skip
        context = EvalContext(base_model, open_model, early_windows, item_steps)
        self.evaluations = [EVALS[name].build(section, context) for name, section in config.sections.items()]

    def __call__(self, model, base: dict | None = None, progress: bool = False,
                 stop_early: StopEarly | None = None) -> dict:  # fmt: skip
        """Record fields of every configured evaluation, in order; ``base`` (the base model's record)
        gives the ratios. Stopped early, the record has the first stage's fields and ``pruned``."""
        record: dict = {}
        for evaluation in self.evaluations:
            record.update(evaluation.record(model, base, progress, stop_early or never))
            if record.get(Field.PRUNED):
                break
        return record
