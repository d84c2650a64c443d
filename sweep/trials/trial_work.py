"""What one trial does, in whichever process runs it: build the plan's model with the backend (a
merged GGUF file, or an in-memory model), then score it.

With the llama.cpp backend it is a plain picklable object, so the sweep can hand it to a child
process (sweep/trials/isolation.py).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.base import StopEarly
from evals.schema import Field
from merge_core.layer_plan import LayerPlan
from sweep.trials.backends import Backend
from sweep.trials.scoring import TrialScorer


def merge_record(plan: LayerPlan, merge_seconds: float, file_bytes: int) -> dict:
    return {
        Field.PLAN: str(plan),
        Field.N_LAYERS: plan.n_layers,
        Field.MERGE_SECONDS: round(merge_seconds, 3),
        Field.FILE_MB: round(file_bytes / 2**20, 1),
        Field.WORKER: socket.gethostname(),
    }


@dataclass
class TrialWork:
    backend: Backend
    scorer: TrialScorer
    base: Optional[dict] = None  # the base model's record, for ratios; set once it is scored

    def merge(self, plan: LayerPlan, out: Path):
        return self.backend.build(plan, out)

    def __call__(self, plan: LayerPlan, out: Path, stop_early: StopEarly) -> dict:
        start = time.perf_counter()
        model = self.merge(plan, out)
        record = merge_record(plan, time.perf_counter() - start, self.backend.n_bytes(model))
        record.update(self.scorer(model, self.base, stop_early=stop_early))
        return record
