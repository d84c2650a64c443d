"""The perplexity objective of a sweep: the text is loaded and tokenized once, then each model
file is scored on the same windows, optionally in two stages (a few windows first, so a sweep can
stop a hopeless plan early; the rest only if it goes on)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from evals.corpus import load_text
from evals.llama_cpp_model import LlamaCppModel
from evals.perplexity import PerplexityResult, make_windows, perplexity

CHARS_PER_TOKEN_BOUND = 8  # English prose averages ~4 characters a token; read twice that to be safe


class PerplexityEval:
    """``open_model(model, n_ctx=, threads=, batch=)`` opens what is scored: by default a GGUF path in
    llama.cpp; the torch backend passes its own opener for in-memory models."""

    def __init__(self, tokenizer_model, text: str, n_ctx: int = 512, windows: int = 4, threads=None, batch: int = 512,
                 open_model: Callable = LlamaCppModel) -> None:  # fmt: skip
        self.n_ctx, self.threads, self.batch, self.open_model = n_ctx, threads, batch, open_model
        max_chars = windows * n_ctx * CHARS_PER_TOKEN_BOUND if windows else 50_000_000
        corpus = load_text(text, max_chars=max_chars)
        with open_model(tokenizer_model, n_ctx=n_ctx, threads=threads, batch=batch) as model:
            tokens = model.tokenize(corpus)
            self.windows = make_windows(tokens, n_ctx, windows, model.bos_for_windows)

    @classmethod
    def from_config(cls, tokenizer_model, config, open_model: Callable = LlamaCppModel) -> PerplexityEval:
        return cls(tokenizer_model, config.text, config.n_ctx, config.windows, config.threads, config.batch, open_model)

    def _open(self, model):
        return self.open_model(model, n_ctx=self.n_ctx, threads=self.threads, batch=self.batch)

    def __call__(self, model_path, progress: bool = False) -> PerplexityResult:
        with self._open(model_path) as model:
            return perplexity(model, self.windows, progress=progress)

    def staged(self, model_path: str | Path, early_windows: int, stop: Callable[[float], bool], progress: bool = False
               ) -> tuple[PerplexityResult, Optional[PerplexityResult]]:  # fmt: skip
        """Perplexity on the first ``early_windows`` windows, then ``stop(early_ppl)`` decides: stopped,
        the full result is None; else the remaining windows extend the early ones (none scored twice)."""
        with self._open(model_path) as model:
            early = perplexity(model, self.windows[:early_windows], progress=progress)
            if early_windows >= len(self.windows):
                return early, early
            if stop(early.ppl):
                return early, None
            return early, early.extended(perplexity(model, self.windows[early_windows:], progress=progress))
