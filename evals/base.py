"""The contract between the sweep and an evaluation, declared where they meet.

An evaluation is built once per sweep from its config section (``eval.<name>``): the text is
tokenized, the items loaded, once. Then ``record`` scores one model (the base, or a merged plan)
and returns flat record fields (evals/schema.py). The base model and every plan are scored by the
same object, so their numbers compare. ``EvalSpec`` is the registry's row for it (evals/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol


@dataclass(frozen=True)
class Stage:
    """A partial score, asked about mid-evaluation: ``field``'s value after ``step`` (perplexity: its
    early windows, step 0; item evaluations: the items scored per task so far)."""

    field: str
    step: int
    value: float


StopEarly = Callable[[Stage], bool]  # given a partial score, True stops the scoring there


def never(stage: Stage) -> bool:
    return False


@dataclass(frozen=True)
class EvalContext:
    """What every evaluation is built with, besides its own config."""

    base_model: Any  # what the backend scores as the base (a GGUF path, a loaded model): tokenizer, fit checks
    open_model: Callable  # the backend's opener: model -> a context manager over a scorable model
    early_windows: int = 0  # > 0: perplexity in two stages, stop_early asked after the first
    item_steps: tuple[int, ...] = ()  # items per task after which an item evaluation asks stop_early


class Evaluation(Protocol):
    def record(self, model: Any, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        """Record fields for ``model``; ``base`` is the base model's record (for ratios), None when
        scoring the base itself. An evaluation that honours ``stop_early`` and is stopped returns
        the fields of what it scored and ``Field.PRUNED: True``. Raises on a score that is not a number."""
        ...


class ItemEvaluation(Evaluation, Protocol):
    """An evaluation over separate items, which validation (sweep/results/validation.py) scores a few items at
    a time, writing each item's row as it finishes, so a killed validation resumes where it stopped."""

    def item_ids(self) -> list[str]: ...

    def score_items(self, model: Any, ids: list[str], progress: bool = False) -> list[dict]:
        """One JSON-able row per item of ``ids``, in that order."""
        ...

    def summarize_items(self, rows: list[dict], base: Optional[Mapping]) -> dict:
        """The record fields ``record`` would return, from the rows of every item."""
        ...


def question_key(text: str) -> str:
    """What makes two items the same question, whatever their spacing or case."""
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class EvalSpec:
    name: str  # eval=<name>, conf/eval/<name>.yaml, and the record field of its objective
    config: type  # frozen dataclass of eval.<name>; its __post_init__ refuses bad values, naming the key
    build: Callable[[Any, EvalContext], Evaluation]
    direction: Callable[[Any], str]  # the objective's direction (minimize | maximize), from the config
    columns: tuple[str, ...]  # leaderboard columns, the objective first
    scores: tuple[str, ...]  # fields ``selfmerge reproduce`` re-scores and compares
    seconds: str  # the field holding its wall time (trial.timeout=auto, cache hits)
    questions: Optional[Callable[[Any], set[str]]] = None  # config -> question_key of each item it asks
    # the record fields of a plan's paired difference to the base (evals/stats.py), where it has one:
    # mean difference, its 95% interval (low, high), p-value, items, smallest detectable difference
    paired: Optional[tuple[str, str, str, str, str, str]] = None
    item_steps: bool = False  # honours EvalContext.item_steps (prune.min_items: successive halving on items)
