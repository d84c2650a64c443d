"""Probes as a sweep objective (``eval=probe``, ``eval=[ppl,probe]``): each plan answers the probes'
items from its next-token probabilities (evals/probes.py), with a coverage gate against the base.

The record holds, over all probes (each probe weighs the same) and per probe (``probe_by_name``):
accuracy, logprob, score, coverage, entropy and the share of items gated; ``eval.probe.metric``
names the objective. ``mode=generate`` asks for greedy replies and parses them instead: a probe's
published form, which validation uses (sweep/results/validation.py); it measures accuracy and score only.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from evals.base import EvalContext, EvalSpec, StopEarly, never
from evals.eqbench_items import subset
from evals.llama_cpp_model import LlamaCppModel
from evals.probes import (
    METRICS,
    ItemScore,
    ProbeItem,
    load_probe,
    prepare_all,
    reply_messages,
    score_item,
    score_reply,
)
from evals.schema import Field
from merge_core.errors import SelfMergeError

MODES = ("logits", "generate")
GATES = ("relative", "absolute")
GENERATED_METRICS = ("accuracy", "score")  # what a parsed reply measures


@dataclass(frozen=True)
class ProbeConfig:
    probes: tuple[str, ...] = ("math", "eq")  # shipped (math, math_heldout, eq) or .jsonl/.yaml files
    metric: str = "logprob"  # the objective: logprob is continuous and low-noise; accuracy | score | coverage
    min_coverage: float = 0.5  # the gate: an item under this coverage scores the floor (see coverage_gate)
    coverage_gate: str = "relative"  # relative: x the base's coverage on the item; absolute: a probability
    mode: str = "logits"  # generate: greedy replies, parsed (validation)
    max_tokens: int = 24  # generate mode: reply bound
    n_items: int = 0  # a fixed random subset of each probe's questions (0 = all)
    seed: int = 0
    n_ctx: int = 2048
    threads: Optional[int] = None  # None = all cores

    def __post_init__(self) -> None:
        if not self.probes:
            raise SelfMergeError(
                "eval.probe.probes is empty: name at least one probe (math, eq) or a probe file"
            )
        if self.mode not in MODES:
            raise SelfMergeError(f"eval.probe.mode={self.mode!r} is unknown; choose one of {list(MODES)}")
        metrics = GENERATED_METRICS if self.mode == "generate" else METRICS[:4]
        if self.metric not in metrics:
            raise SelfMergeError(
                f"eval.probe.metric={self.metric!r} is unknown in {self.mode} mode; choose one of {list(metrics)}"
            )
        if self.coverage_gate not in GATES:
            raise SelfMergeError(
                f"eval.probe.coverage_gate={self.coverage_gate!r} is unknown; choose one of {list(GATES)}"
            )
        if not 0 <= self.min_coverage <= 1:
            raise SelfMergeError(
                f"eval.probe.min_coverage={self.min_coverage} is out of range: must be in [0, 1]"
            )
        if self.max_tokens < 1 or self.n_items < 0 or self.n_ctx < 64:
            raise SelfMergeError(f"eval.probe: max_tokens={self.max_tokens} must be >= 1, n_items={self.n_items} >= 0, "
                                 f"n_ctx={self.n_ctx} >= 64")  # fmt: skip


PER_METRIC = {  # the record field of each metric's mean over probes
    "accuracy": Field.PROBE_ACCURACY,
    "logprob": Field.PROBE_LOGPROB,
    "score": Field.PROBE_SCORE,
    "coverage": Field.PROBE_COVERAGE,
    "entropy": Field.PROBE_ENTROPY,
    "gated": Field.PROBE_GATED,
}


def summarize(scores: list[ItemScore], metric: str) -> dict:
    """Means per probe, then over probes; ``metric``'s mean is the objective."""
    by_name: dict[str, dict] = {}
    for name in dict.fromkeys(score.probe for score in scores):
        mine = [score for score in scores if score.probe == name]
        means = {
            m: float(np.mean(values))
            for m in METRICS
            if (values := [getattr(s, m) for s in mine if getattr(s, m) is not None])
        }
        by_name[name] = {
            **{m: round(v, 4) for m, v in means.items()},
            "gated": round(float(np.mean([s.gated for s in mine])), 4),
        }
    overall = {
        m: float(np.mean([p[m] for p in by_name.values()]))
        for m in (*METRICS, "gated")
        if all(m in p for p in by_name.values())
    }
    return {
        Field.PROBE: round(overall[metric], 4),
        **{field: round(overall[m], 4) for m, field in PER_METRIC.items() if m in overall},
        Field.PROBE_BY_NAME: by_name,
    }


class ProbeEval:
    """Items loaded and their token paths prepared once, with the base model's tokenizer."""

    def __init__(self, config: ProbeConfig, tokenizer_model, open_model: Callable = LlamaCppModel,
                 items: Optional[list[ProbeItem]] = None) -> None:  # fmt: skip
        """``items``: these instead of config.probes' own."""
        self.config, self.open_model = config, open_model
        self.items = (
            items
            if items is not None
            else [item for source in config.probes for item in _subset(config, source)]
        )
        with self._open(tokenizer_model) as model:
            self.prepared = prepare_all(model, self.items)
        longest = max(self.prepared, key=lambda p: len(p.context) + max(map(len, p.paths)))
        need = (
            len(longest.context)
            + max(map(len, longest.paths))
            + (config.max_tokens if config.mode == "generate" else 1)
        )
        if need > config.n_ctx:
            raise SelfMergeError(f"eval.probe.n_ctx={config.n_ctx} is too small: probe {longest.item.probe} item "
                                 f"{longest.item.id} needs {need} tokens")  # fmt: skip

    @classmethod
    def from_config(cls, config: ProbeConfig, context: EvalContext) -> ProbeEval:
        return cls(config, context.base_model, context.open_model)

    def _open(self, model):
        return self.open_model(model, n_ctx=self.config.n_ctx, threads=self.config.threads)

    def scores(self, model, progress: bool = False) -> list[ItemScore]:
        """Every item's score, ungated."""
        with self._open(model) as opened:
            if self.config.mode == "generate":
                conversations = [reply_messages(item) for item in self.items]
                if hasattr(opened, "chat_batch"):
                    replies = opened.chat_batch(conversations, self.config.max_tokens)
                else:
                    asked = tqdm(
                        conversations, desc=Field.PROBE, unit="item", disable=not progress, leave=False
                    )
                    replies = [opened.chat(messages, self.config.max_tokens) for messages in asked]
                return [score_reply(item, reply) for item, reply in zip(self.items, replies)]
            asked = tqdm(self.prepared, desc=Field.PROBE, unit="item", disable=not progress, leave=False)
            return [score_item(opened, prepared) for prepared in asked]

    def gate(self, scores: list[ItemScore], base: Optional[Mapping]) -> list[ItemScore]:
        """Floor the items under the coverage gate. Relative: against the base's coverage on the same
        item (the base itself passes its own gate); absolute: against min_coverage."""
        if self.config.coverage_gate == "absolute":
            return [s.gated_at_floor() if s.coverage < self.config.min_coverage else s for s in scores]
        if not base:
            return scores
        base_coverage = {
            (b.probe, b.id): b.coverage for b in map(ItemScore.from_row, base[Field.PROBE_ITEMS])
        }
        return [
            s.gated_at_floor() if s.coverage < self.config.min_coverage * base_coverage[s.probe, s.id] else s
            for s in scores
        ]

    def record(self, model, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        start = time.perf_counter()
        return self._fields(self.gate(self.scores(model, progress), base), time.perf_counter() - start)

    def _fields(self, scores: list[ItemScore], seconds: float) -> dict:
        return {
            **summarize(scores, self.config.metric),
            Field.PROBE_SECONDS: round(seconds, 2),
            Field.PROBE_ITEMS: [asdict(score) for score in scores],  # the base's coverage gates the plans
        }

    # -- item by item (validation: evals/base.py ItemEvaluation) --------------------------------
    def item_ids(self) -> list[str]:
        return [f"{item.probe}/{item.id}" for item in self.items]

    def score_items(self, model, ids: list[str], progress: bool = False) -> list[dict]:
        wanted = set(ids)
        part = copy.copy(self)
        keep = [f"{item.probe}/{item.id}" in wanted for item in self.items]
        part.items = [item for item, kept in zip(self.items, keep) if kept]
        part.prepared = [prepared for prepared, kept in zip(self.prepared, keep) if kept]
        start = time.perf_counter()
        scores = part.scores(model, progress)
        seconds = (time.perf_counter() - start) / max(len(scores), 1)
        return [{**asdict(score), "seconds": seconds} for score in scores]

    def summarize_items(self, rows: list[dict], base: Optional[Mapping]) -> dict:
        scores = [
            replace(ItemScore.from_row(row), gated=False) for row in rows
        ]  # gated again below, against this base
        return self._fields(self.gate(scores, base), sum(row.get("seconds", 0.0) for row in rows))


def _subset(config: ProbeConfig, source: str) -> list[ProbeItem]:
    """The probe's items for ``n_items`` of its questions (an eq question is rated on four emotions)."""
    items = load_probe(source)
    chosen = set(subset(list(dict.fromkeys(item.prompt for item in items)), config.n_items, config.seed))
    return [item for item in items if item.prompt in chosen]


def _questions(config: ProbeConfig) -> set[str]:
    return {item.key for source in config.probes for item in _subset(config, source)}


SPEC = EvalSpec(
    name=Field.PROBE,
    config=ProbeConfig,
    build=ProbeEval.from_config,
    direction=lambda config: "maximize",  # every metric it offers grows with quality
    columns=(Field.PROBE, Field.PROBE_COVERAGE, Field.PROBE_GATED),
    scores=(Field.PROBE,),
    seconds=Field.PROBE_SECONDS,
    questions=_questions,
)
