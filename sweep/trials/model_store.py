"""The merged files of a sweep, ``results/<sweep>/models/trial_N.gguf``: one object owns them.

Each trial writes its file here; after each trial only the best ``sweep.keep_top_k`` stay; before
each merge, under ``sweep.disk_budget``, kept files go worst first until the next one fits. A file
of a trial still running (another worker's, on this machine) is never deleted.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan

log = logging.getLogger("selfmerge")


class DiskFull(SelfMergeError):
    """The next merged file does not fit on the disk."""


def models_dir(directory: Path) -> Path:
    return directory / "models"


def model_file(directory: Path, trial_number: int) -> Path:
    return models_dir(directory) / f"trial_{trial_number}.gguf"


class ModelStore:
    """``rank_key(trial)`` orders completed trials best first; ``size_bound(plan)`` bounds a merged
    file's bytes before it is written (the backend's); ``budget`` is sweep.disk_budget in bytes."""

    def __init__(self, directory: Path, keep_top_k: int, budget: Optional[int], budget_text: Optional[str],
                 rank_key: Callable[[FrozenTrial], float],
                 size_bound: Callable[[LayerPlan], int]) -> None:  # fmt: skip
        self.directory, self.keep_top_k = directory, keep_top_k
        self.budget, self.budget_text = budget, budget_text
        self.rank_key, self.size_bound = rank_key, size_bound

    def path(self, trial_number: int) -> Path:
        return model_file(self.directory, trial_number)

    def _files(self) -> list[Path]:
        return list(models_dir(self.directory).glob("trial_*.gguf"))

    def _ranked(self, trials: list[FrozenTrial]) -> list[Path]:
        """The merged files of completed trials, best first."""
        scored = [t for t in trials if t.state == TrialState.COMPLETE and Field.CACHE_HIT_OF not in t.user_attrs]
        return [self.path(t.number) for t in sorted(scored, key=self.rank_key)]

    def _finished(self, trials: list[FrozenTrial]) -> set[Path]:
        """Files of finished trials: another worker's running trial may be writing or reading its own."""
        return {self.path(t.number) for t in trials if t.state.is_finished()}

    def check_budget(self, plan: LayerPlan) -> None:
        """At start: a budget smaller than one merged file (of ``plan``, the base) is refused."""
        size = self.size_bound(plan)
        if self.budget is not None and self.budget < size:
            raise SelfMergeError(f"sweep.disk_budget={self.budget_text} is smaller than one merged file "
                                 f"({size / 2**20:.0f} MiB or more)")  # fmt: skip

    def keep_best(self, trials: list[FrozenTrial]) -> None:
        keep = set(self._ranked(trials)[: self.keep_top_k])
        finished = self._finished(trials)
        for path in self._files():
            if path not in keep and path in finished:
                path.unlink(missing_ok=True)

    def make_room(self, plan: LayerPlan, trials: list[FrozenTrial]) -> None:
        """Under the budget, delete kept files, strays first then worst first, until ``plan``'s fits;
        then the disk itself must hold it (``DiskFull`` names the folder and the sizes)."""
        needed = self.size_bound(plan)
        if self.budget is not None:
            self._within_budget(plan, needed, trials)
        folder = models_dir(self.directory)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise DiskFull(f"{folder} is on a full disk: the next merge needs {needed / 2**20:.0f} MiB and "
                           f"{free / 2**20:.0f} MiB are free (free some space, or set sweep.disk_budget or a "
                           "lower sweep.keep_top_k)")  # fmt: skip

    def _within_budget(self, plan: LayerPlan, needed: int, trials: list[FrozenTrial]) -> None:
        if needed > self.budget:
            raise SelfMergeError(f"plan {plan} makes a {needed / 2**20:.0f} MiB file, "
                                 f"more than sweep.disk_budget={self.budget_text}")  # fmt: skip
        files = [p for p in reversed(self._ranked(trials)) if p.exists()]
        finished = self._finished(trials)
        files += [p for p in self._files() if p not in files and p in finished]  # strays: deleted first
        used = sum(p.stat().st_size for p in models_dir(self.directory).glob("*.gguf*"))
        while used + needed > self.budget and files:
            victim = files.pop()
            used -= victim.stat().st_size
            victim.unlink()
            log.info("disk budget: deleted %s to make room", victim.name)
