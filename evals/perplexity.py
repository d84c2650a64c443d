"""Perplexity as llama.cpp's ``llama-perplexity`` computes it, for any backend.

The text is tokenized once and cut into non-overlapping windows of ``n_ctx`` tokens. Each window
is evaluated from an empty cache; only its second half is scored (every scored token sees at
least ``n_ctx/2`` tokens of context). If the model adds a BOS token, it replaces the first token
of each window, as llama.cpp does. ppl = exp(mean negative log-likelihood of the scored tokens).

With a ``Reference`` (the base model's distributions on the same windows) it also measures damage as
llama.cpp's ``--kl-divergence`` does: the mean KL divergence of the model's next-token distribution
from the base's, and how often both put the same token first. The reference keeps the base's top
KLD_TOP_K tokens per position and lumps the rest into one bucket (a full one is positions x vocab
floats: gigabytes at 7B scale); the KL over those buckets is exact when the top tokens hold all the
base's mass and never above the full KL otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from merge_core.errors import SelfMergeError


KLD_TOP_K = 64  # base tokens kept per position; at 64 they hold nearly all of a trained model's mass


class WindowScorer(Protocol):
    """A backend: negative log-likelihoods of ``window[first + 1:]``, each predicted from its prefix.
    One with ``batch_windows`` > 1 also has ``windows_nll`` (several windows in one pass).
    ``scored_logits`` gives the raw logits rows behind them (for the KL divergence)."""

    def window_nll(self, window: Sequence[int], first: int) -> np.ndarray: ...
    def scored_logits(self, window: Sequence[int], first: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Reference:
    """The base's distribution at each scored position of one window: top token ids and log-probs."""

    ids: np.ndarray  # (positions, KLD_TOP_K) int64, most likely first
    logprobs: np.ndarray  # (positions, KLD_TOP_K) float64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))


def reference_of(logits: np.ndarray) -> Reference:
    logprobs = log_softmax(logits)
    ids = np.argsort(-logprobs, axis=1)[:, :KLD_TOP_K]
    return Reference(ids, np.take_along_axis(logprobs, ids, axis=1))


def divergence(logits: np.ndarray, reference: Reference) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(base || model) over the base's top tokens and the rest as one bucket, and
    whether the model's most likely token is the base's."""
    logq = log_softmax(logits)
    p, q_top = np.exp(reference.logprobs), np.take_along_axis(logq, reference.ids, axis=1)
    p_rest = np.clip(1 - p.sum(axis=1), 0, None)
    q_rest = np.clip(1 - np.exp(q_top).sum(axis=1), 1e-300, None)
    kl = (p * (reference.logprobs - q_top)).sum(axis=1)
    kl += np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(kl, 0.0), logq.argmax(axis=1) == reference.ids[:, 0]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_windows: int
    n_ctx: int
    n_tokens_scored: int
    n_tokens_evaluated: int
    seconds: float
    kld: Optional[float] = None  # mean KL divergence from the base, per scored token (with a reference)
    top1_agreement: Optional[float] = None  # share of scored tokens where model and base agree on the top token

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens_evaluated / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def extended(self, more: PerplexityResult) -> PerplexityResult:
        """This result and one over further windows, as if scored together."""
        n = self.n_tokens_scored + more.n_tokens_scored

        def weighted(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return None if a is None or b is None else (a * self.n_tokens_scored + b * more.n_tokens_scored) / n

        mean = weighted(self.mean_nll, more.mean_nll)
        return PerplexityResult(
            _ppl(mean), mean, self.n_windows + more.n_windows, self.n_ctx, n,
            self.n_tokens_evaluated + more.n_tokens_evaluated, self.seconds + more.seconds,
            weighted(self.kld, more.kld), weighted(self.top1_agreement, more.top1_agreement),
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


def scored_half(n_ctx: int) -> int:
    """The first position whose next token is scored: every scored token sees n_ctx/2 of context."""
    return n_ctx // 2


def perplexity(scorer: WindowScorer, windows: list[list[int]], progress: bool = False,
               references: Optional[Sequence[Reference]] = None) -> PerplexityResult:  # fmt: skip
    """With ``references`` (one per window, from the base), the KL divergence and top-1 agreement too;
    then each window's logits are read whole, one window at a time."""
    n_ctx = len(windows[0])
    first = scored_half(n_ctx)
    total_nll, total_kl, agreed, n_scored = 0.0, 0.0, 0, 0
    batch = getattr(scorer, "batch_windows", 1) if references is None else 1
    start = time.perf_counter()
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, len(windows), batch):
            group = windows[i : i + batch]
            if references is not None:
                logits = scorer.scored_logits(group[0], first)
                kl, same = divergence(logits, references[i])
                total_kl, agreed = total_kl + float(kl.sum()), agreed + int(same.sum())
                nlls = [log_softmax_nll(logits, np.asarray(group[0][first + 1 :], dtype=np.int64))]
            else:
                nlls = scorer.windows_nll(group, first) if batch > 1 else [scorer.window_nll(group[0], first)]
            for nll in nlls:
                total_nll += float(nll.sum())
                n_scored += len(nll)
            bar.update(len(group))
    seconds = time.perf_counter() - start
    mean = total_nll / n_scored
    damage = (total_kl / n_scored, agreed / n_scored) if references is not None else (None, None)
    return PerplexityResult(_ppl(mean), mean, len(windows), n_ctx, n_scored, len(windows) * n_ctx, seconds, *damage)


def references_of(scorer: WindowScorer, windows: list[list[int]], progress: bool = False) -> list[Reference]:
    """The base's distributions on every window, kept for ``perplexity(..., references=)``."""
    first = scored_half(len(windows[0]))
    return [reference_of(scorer.scored_logits(window, first)) for window in tqdm(windows, desc="kld reference", disable=not progress)]
