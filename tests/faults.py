"""Trial work that fails on purpose, by trial number, for the sweep's robustness tests.

It runs in the sweep's child processes (pickled there), so it lives in an importable module, not
in a test function. ``PhaseMarks`` also leaves a file at each phase of a trial and waits there,
so a test can SIGKILL the sweep at a known point.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from evals.perplexity import PerplexityResult
from sweep.trials.trial_work import TrialWork, merge_record


def trial_number(out: Path) -> int:
    return int(out.stem.split("_")[1])  # models/trial_<n>.gguf


def nan_perplexity(evaluation) -> None:
    """Make a perplexity eval's every full score NaN (as a broken model's logits give)."""
    real = evaluation.staged

    def staged(model_path, early_windows, stop, progress=False):
        early, full = real(model_path, early_windows, lambda ppl: False, progress)
        nan = PerplexityResult(float("nan"), float("nan"), full.n_windows, full.n_ctx, full.n_tokens_scored, full.n_tokens_evaluated, full.seconds)
        return early, nan

    evaluation.staged = staged


class FaultyWork(TrialWork):
    """Trial 0: the merge raises. 1: hangs. 2: the child is killed. 3: NaN perplexity.
    4: allocates past the memory cap. Later trials run normally."""

    def merge(self, plan, out):
        if trial_number(out) == 0:
            raise RuntimeError("injected merge failure")
        return super().merge(plan, out)

    def __call__(self, plan, out, stop_early):
        n = trial_number(out)
        if n == 1:
            time.sleep(3600)
        if n == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == 3:
            nan_perplexity(self.scorer.evaluations[0])  # perplexity runs first (evals/registry.py)
        if n == 4:
            hog = bytearray(64 * 2**30)  # far beyond trial.max_memory
            hog[-1] = 1
        return super().__call__(plan, out, stop_early)


@dataclass
class PhaseMarks(TrialWork):
    """Writes <marks>/<phase>-<trial> at the start of the merge and of the evaluation, then
    sleeps ``pause`` seconds, so a test sees where the trial is and can kill it there."""

    marks: Path | None = None
    pause: float = 0.0

    def _mark(self, phase: str, out: Path) -> None:
        if self.marks is not None:
            (self.marks / f"{phase}-{trial_number(out)}").touch()
            time.sleep(self.pause)

    def merge(self, plan, out):
        self._mark("merge", out)
        model = super().merge(plan, out)
        self._mark("eval", out)
        return model


@dataclass
class CheapWork(TrialWork):
    """No model: a score computed from the plan after ``delay`` seconds, for the many-worker tests.
    Each evaluation leaves ``<evaluations>/<plan>@<trial>`` so a test can count how often a plan was
    evaluated; with ``hang`` the worker's first trial leaves ``hang@<trial>`` and never ends."""

    evaluations: Path | None = None
    delay: float = 0.0
    hang: bool = False

    def __call__(self, plan, out, stop_early):
        n = trial_number(out)
        (self.evaluations / f"{plan}@{n}").touch()
        if self.hang:
            (self.evaluations / f"hang@{n}").touch()
            time.sleep(3600)
        time.sleep(self.delay)
        ppl = 10.0 + abs(plan.n_layers - 40) + sum(plan.layer_indices) % 7 / 10
        return {**merge_record(plan, 0.0, 0), "ppl": ppl, "ppl_vs_base": ppl / self.base["ppl"]}
