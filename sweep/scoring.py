"""What a trial measures: the configured evaluations of one model file, as flat record fields.

Built once per sweep (the perplexity text is tokenized and the EQ-Bench items loaded once); the
base model and every merged plan are scored by the same object, so their numbers compare.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from evals.eqbench_eval import EQBenchEval
from evals.llama_cpp_model import LlamaCppModel
from evals.ppl_eval import PerplexityEval
from sweep.config import EQBenchConfig, EvalConfig, LmEvalConfig, PerplexityConfig, SweepConfig


def scoring_fingerprint(config: SweepConfig, base_path: Path) -> dict:
    """What makes two scores comparable; a resumed sweep must match it (threads never change a score)."""
    evals = {}
    for kind in config.eval.kinds:
        evals[kind] = {k: v for k, v in asdict(getattr(config.eval, kind)).items() if k != "threads"}
    # as stored: JSON turns tuples (eval.lm_eval.tasks) into lists, and a resume compares with what was stored
    return json.loads(json.dumps({"model": str(base_path), "backend": config.backend.scoring(), "eval": evals}))


def eval_config_from_fingerprint(fingerprint: dict, threads: int | None = None) -> EvalConfig:
    """The EvalConfig a sweep scored with, from its stored fingerprint (to re-score the same way)."""
    stored = fingerprint["eval"]
    lm_eval = stored.get("lm_eval")
    return EvalConfig(
        ppl=PerplexityConfig(**stored["ppl"], threads=threads) if "ppl" in stored else None,
        eqbench=EQBenchConfig(**stored["eqbench"], threads=threads) if "eqbench" in stored else None,
        lm_eval=LmEvalConfig(**{**lm_eval, "tasks": tuple(lm_eval["tasks"])}, threads=threads) if lm_eval else None,
    )


class TrialScorer:
    """``early_windows`` > 0 scores perplexity in two stages (see PerplexityEval.staged): the record
    gets ``ppl_early``, and a ``stop_early(early_ppl)`` that answers True ends the scoring there.
    ``open_model`` is the backend's: it opens a GGUF path (llama.cpp) or an in-memory model (torch)."""

    def __init__(self, config: EvalConfig, base_model, early_windows: int = 0, open_model=LlamaCppModel) -> None:
        self.early_windows = early_windows
        self.ppl = PerplexityEval.from_config(base_model, config.ppl, open_model) if config.ppl else None
        self.eqbench = EQBenchEval.from_config(config.eqbench, open_model) if config.eqbench else None
        if self.eqbench is not None:
            self.eqbench.check_fits(base_model)
        self.lm_eval = None
        if config.lm_eval:
            from evals.lm_eval_bridge import LmEvalEval  # lm-eval is imported only when asked for

            self.lm_eval = LmEvalEval.from_config(config.lm_eval, open_model)

    def __call__(self, model_path, base: dict | None = None, progress: bool = False, stop_early=None) -> dict:
        """Record fields of every configured eval; ``base`` (the base model's record) gives the ratios.
        Stopped early, the record has ``ppl_early`` and ``pruned`` only."""
        record: dict = {}
        if self.ppl is not None:
            if self.early_windows:
                early, result = self.ppl.staged(model_path, self.early_windows, stop_early or (lambda ppl: False), progress)
                record["ppl_early"] = early.ppl
                if result is None:
                    return {**record, "pruned": True}
            else:
                result = self.ppl(model_path, progress=progress)
            if not math.isfinite(result.ppl):
                raise ValueError(f"perplexity is {result.ppl}")
            record.update(
                ppl=result.ppl,
                ppl_vs_base=result.ppl / base["ppl"] if base else 1.0,
                tokens_per_second=round(result.tokens_per_second, 1),
                n_tokens_scored=result.n_tokens_scored,
                eval_seconds=round(result.seconds, 2),
            )
        if self.eqbench is not None:
            start = time.perf_counter()
            result = self.eqbench(model_path, progress=progress)
            record.update(
                eqbench=round(result.score, 3),
                eqbench_parse_rate=round(result.parse_rate, 3),
                eqbench_used=result.used,
                eqbench_first_pass=round(result.first_pass_score, 3),
                eqbench_revised=round(result.revised_score, 3),
                eqbench_seconds=round(time.perf_counter() - start, 2),
                eqbench_items=[asdict(r) for r in result.records],  # why a plan scored as it did
            )
        if self.lm_eval is not None:
            result = self.lm_eval(model_path, progress=progress)
            record.update(lm_eval=round(result.score, 4), lm_eval_tasks=result.per_task, lm_eval_seconds=round(result.seconds, 2))
        return record
