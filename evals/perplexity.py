"""Perplexity as llama.cpp's ``llama-perplexity`` computes it, for any backend.

The text is tokenized once and cut into non-overlapping windows of ``n_ctx`` tokens. Each window
is evaluated from an empty cache; only its second half is scored (every scored token sees at
least ``n_ctx/2`` tokens of context). If the model adds a BOS token, it replaces the first token
of each window, as llama.cpp does. ppl = exp(mean negative log-likelihood of the scored tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from merge_core.errors import SelfMergeError


class WindowScorer(Protocol):
    """A backend: negative log-likelihoods of ``window[first + 1:]``, each predicted from its prefix.
    One with ``batch_windows`` > 1 also has ``windows_nll`` (several windows in one pass)."""

    def window_nll(self, window: Sequence[int], first: int) -> np.ndarray: ...


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_windows: int
    n_ctx: int
    n_tokens_scored: int
    n_tokens_evaluated: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens_evaluated / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def extended(self, more: PerplexityResult) -> PerplexityResult:
        """This result and one over further windows, as if scored together."""
        n = self.n_tokens_scored + more.n_tokens_scored
        mean = (self.mean_nll * self.n_tokens_scored + more.mean_nll * more.n_tokens_scored) / n
        return PerplexityResult(
            _ppl(mean), mean, self.n_windows + more.n_windows, self.n_ctx, n,
            self.n_tokens_evaluated + more.n_tokens_evaluated, self.seconds + more.seconds,
        )  # fmt: skip


def _ppl(mean_nll: float) -> float:
    if not math.isfinite(mean_nll):
        return float("nan") if math.isnan(mean_nll) else float("inf")
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def make_windows(tokens: Sequence[int], n_ctx: int, max_windows: int = 0, bos: Optional[int] = None) -> list[list[int]]:
    """Non-overlapping windows of ``n_ctx`` tokens (at most ``max_windows``; 0 = all)."""
    n_windows = len(tokens) // n_ctx
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SelfMergeError(f"the text has {len(tokens)} tokens, fewer than one window of n_ctx={n_ctx}")
    windows = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(n_windows)]
    if bos is not None:
        for window in windows:
            window[0] = bos
    return windows


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row of raw logits, without materialising the full log-softmax."""
    logits = np.asarray(logits, dtype=np.float32)
    row_max = logits.max(axis=1)
    log_norm = row_max + np.log(np.exp(logits - row_max[:, None]).sum(axis=1))
    return (log_norm - logits[np.arange(len(targets)), targets]).astype(np.float64)


def perplexity(scorer: WindowScorer, windows: list[list[int]], progress: bool = False) -> PerplexityResult:
    n_ctx = len(windows[0])
    first = n_ctx // 2
    total_nll, n_scored = 0.0, 0
    batch = getattr(scorer, "batch_windows", 1)
    start = time.perf_counter()
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, len(windows), batch):
            group = windows[i : i + batch]
            for nll in scorer.windows_nll(group, first) if batch > 1 else [scorer.window_nll(group[0], first)]:
                total_nll += float(nll.sum())
                n_scored += len(nll)
            bar.update(len(group))
    seconds = time.perf_counter() - start
    mean = total_nll / n_scored
    return PerplexityResult(_ppl(mean), mean, len(windows), n_ctx, n_scored, len(windows) * n_ctx, seconds)
