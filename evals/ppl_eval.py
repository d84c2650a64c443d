"""The perplexity objective of a sweep: the text is loaded and tokenized once, then each model
file is scored on the same windows, optionally in two stages (a few windows first, so a sweep can
stop a hopeless plan early; the rest only if it goes on)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from evals.base import EvalContext, EvalSpec, Stage, StopEarly, never
from evals.corpus import load_text
from evals.llama_cpp_model import LlamaCppModel
from evals.perplexity import PerplexityResult, make_windows, perplexity, references_of
from evals.schema import Field
from merge_core.errors import SelfMergeError

CHARS_PER_TOKEN_BOUND = 8  # English prose averages ~4 characters a token; read twice that to be safe


@dataclass(frozen=True)
class PerplexityConfig:
    text: str = "stdlib-docstrings"  # a file, "stdlib-docstrings", or hf:DATASET[:CONFIG]:SPLIT:COLUMN
    n_ctx: int = 512
    windows: int = 4  # windows of n_ctx tokens scored per trial (0 = the whole text)
    threads: Optional[int] = None  # None = all cores
    batch: int = 512
    kld: bool = False  # also the KL divergence from the base and top-1 agreement (llama.cpp's --kl-divergence)

    def __post_init__(self) -> None:
        if self.n_ctx < 16 or self.n_ctx % 2:
            raise SelfMergeError(f"eval.n_ctx={self.n_ctx} is out of range: must be an even number >= 16")
        if self.windows < 0:
            raise SelfMergeError(f"eval.windows={self.windows} is out of range: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise SelfMergeError(f"eval.threads={self.threads} is out of range: must be >= 1 or null")


class PerplexityEval:
    """``open_model(model, n_ctx=, threads=, batch=)`` opens what is scored: by default a GGUF path in
    llama.cpp; the torch backend passes its own opener for in-memory models."""

    def __init__(self, tokenizer_model, text: str, n_ctx: int = 512, windows: int = 4, threads=None, batch: int = 512,
                 open_model: Callable = LlamaCppModel, early_windows: int = 0, kld: bool = False) -> None:  # fmt: skip
        self.n_ctx, self.threads, self.batch, self.open_model = n_ctx, threads, batch, open_model
        self.early_windows = early_windows  # > 0: ``record`` scores in two stages (see ``staged``)
        max_chars = windows * n_ctx * CHARS_PER_TOKEN_BOUND if windows else 50_000_000
        corpus = load_text(text, max_chars=max_chars)
        with open_model(tokenizer_model, n_ctx=n_ctx, threads=threads, batch=batch) as model:
            tokens = model.tokenize(corpus)
            self.windows = make_windows(tokens, n_ctx, windows, model.bos_for_windows)
            # the base's distributions, read once per sweep: every plan's KL divergence is measured from them
            self.references = references_of(model, self.windows) if kld else None

    @classmethod
    def from_config(cls, config: PerplexityConfig, context: EvalContext) -> PerplexityEval:
        return cls(context.base_model, config.text, config.n_ctx, config.windows, config.threads, config.batch,
                   context.open_model, context.early_windows, config.kld)  # fmt: skip

    def _open(self, model):
        return self.open_model(model, n_ctx=self.n_ctx, threads=self.threads, batch=self.batch)

    def __call__(self, model_path, progress: bool = False) -> PerplexityResult:
        with self._open(model_path) as model:
            return perplexity(model, self.windows, progress, self.references)

    def staged(self, model_path: str | Path, early_windows: int, stop: Callable[[float], bool], progress: bool = False
               ) -> tuple[PerplexityResult, Optional[PerplexityResult]]:  # fmt: skip
        """Perplexity on the first ``early_windows`` windows, then ``stop(early_ppl)`` decides: stopped,
        the full result is None; else the remaining windows extend the early ones (none scored twice)."""
        with self._open(model_path) as model:
            refs = self.references or None
            early = perplexity(model, self.windows[:early_windows], progress, refs and refs[:early_windows])
            if early_windows >= len(self.windows):
                return early, early
            if stop(early.ppl):
                return early, None
            return early, early.extended(perplexity(model, self.windows[early_windows:], progress, refs and refs[early_windows:]))

    def record(self, model, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        record: dict = {}
        if self.early_windows:
            stop = lambda ppl: stop_early(Stage(Field.PPL_EARLY, 0, ppl))  # noqa: E731
            early, result = self.staged(model, self.early_windows, stop, progress)
            record[Field.PPL_EARLY] = early.ppl
            if result is None:
                return {**record, Field.PRUNED: True}
        else:
            result = self(model, progress=progress)
        if not math.isfinite(result.ppl):
            raise ValueError(f"perplexity is {result.ppl}")
        return {
            **record,
            Field.PPL: result.ppl,
            Field.PPL_VS_BASE: result.ppl / base[Field.PPL] if base else 1.0,
            Field.TOKENS_PER_SECOND: round(result.tokens_per_second, 1),
            Field.N_TOKENS_SCORED: result.n_tokens_scored,
            Field.EVAL_SECONDS: round(result.seconds, 2),
            **({Field.KLD: round(result.kld, 5), Field.TOP1_AGREEMENT: round(result.top1_agreement, 4)} if result.kld is not None else {}),
        }


SPEC = EvalSpec(
    name=Field.PPL,
    config=PerplexityConfig,
    build=PerplexityEval.from_config,
    direction=lambda config: "minimize",
    columns=(Field.PPL, Field.PPL_VS_BASE, Field.PPL_EARLY, Field.KLD, Field.TOP1_AGREEMENT),
    scores=(Field.PPL,),
    seconds=Field.EVAL_SECONDS,
)
