"""The EQ-Bench objective of a sweep: ask a model the items, score as EQ-Bench v2 does.

Two ways to answer (``eval.eqbench.mode``):
  generate  the benchmark as published: a greedy chat reply, parsed and scored (the default)
  logits    no generation: the answer template is filled up to ``Emotion:`` and the model's
            probabilities over the scores 0-10 at that point give the emotion's score (their
            expected value, or the argmax). The prompt is read once per item, then a few
            tokens per emotion, so a sweep can afford it on every trial. First pass only.

Both modes work on any model with the ``ChatModel`` methods (llama.cpp here; the torch backend
implements the same ones), through the model's own chat template.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from evals.base import EvalContext, EvalSpec, StopEarly, never, question_key
from evals.eqbench import EQBenchResult, ItemRecord, item_score, score_answers, summarize
from evals.eqbench_items import EQItem, load_items, subset
from evals.llama_cpp_model import LlamaCppModel
from evals.probes import FIRST_PASS_HEADING, ProbeItem, answer_masses, prepare
from evals.schema import Field
from merge_core.errors import SelfMergeError

MODES = ("generate", "logits")
LOGITS_SCORES = ("expected", "argmax")
SCORE_VALUES = tuple(range(11))


class ChatModel(Protocol):
    def chat(self, messages: list[dict], max_tokens: int) -> str: ...
    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]: ...
    def tokenize(self, text: str) -> list[int]: ...
    def next_token_logprobs(self, tokens: Sequence[int]) -> np.ndarray: ...


def _messages(item: EQItem) -> list[dict]:
    return [{"role": "user", "content": item.prompt}]


# -- generation mode --------------------------------------------------------------------------
def answer_by_generation(model: ChatModel, items: list[EQItem], max_tokens: int, progress: bool = False) -> EQBenchResult:
    """Every item at once on a model that batches (``chat_batch``: the torch backend); one by one
    otherwise (llama-cpp-python generates one sequence per call)."""
    if hasattr(model, "chat_batch"):
        replies = model.chat_batch([_messages(item) for item in items], max_tokens)
        return score_answers(items, {item.id: reply for item, reply in zip(items, replies)})
    asked = tqdm(items, desc=Field.EQBENCH, unit="item", disable=not progress)
    answers = {item.id: model.chat(_messages(item), max_tokens) for item in asked}
    return score_answers(items, answers)


# -- logits mode ------------------------------------------------------------------------------
def score_distribution(model: ChatModel, prompt: list[int], answer_so_far: str) -> np.ndarray:
    """P(score = 0..10) for the next ``Emotion: <score>``, over the tokenizer's own spelling of each
    number (" 10" may be one token or " 1" then "0"), normalised over the scores. A model that no
    longer answers in the format gets the uniform distribution here; probes gate it (evals/probes.py)."""
    rating = ProbeItem(Field.EQBENCH, "", "", 0, "rating", f"{answer_so_far} ", scale=(SCORE_VALUES[0], SCORE_VALUES[-1]))
    prepared = prepare(model, rating, prompt)
    ending = answer_masses(model, prepared.context, prepared.paths)
    if ending.sum() <= 0:
        return np.full(len(SCORE_VALUES), 1 / len(SCORE_VALUES))
    return ending / ending.sum()


def answer_by_logits(model: ChatModel, items: list[EQItem], score: str = "expected", progress: bool = False) -> EQBenchResult:
    """First-pass scores read from the model's probabilities; every item is answered (parse rate 1)."""
    records = []
    for item in tqdm(items, desc="eqbench (logits)", unit="item", disable=not progress):
        prompt = model.chat_prompt_tokens(_messages(item))
        answer, values = FIRST_PASS_HEADING, {}
        for emotion in item.emotions:
            distribution = score_distribution(model, prompt, f"{answer}{emotion}:")
            best = int(np.argmax(distribution))
            values[emotion] = float(np.dot(SCORE_VALUES, distribution)) if score == "expected" else float(best)
            answer += f"{emotion}: {best}\n"  # the context goes on with the most likely score, as a reply would
        records.append(ItemRecord(item.id, answer, values, None, item_score(item.reference, values), None))
    return summarize(records)


# -- the sweep's objective --------------------------------------------------------------------
def check_options(mode: str, logits_score: str, max_tokens: int, n_items: int) -> None:
    if mode not in MODES:
        raise SelfMergeError(f"eval.eqbench.mode={mode!r} is unknown; choose one of {list(MODES)}")
    if logits_score not in LOGITS_SCORES:
        raise SelfMergeError(f"eval.eqbench.logits_score={logits_score!r} is unknown; choose one of {list(LOGITS_SCORES)}")
    if max_tokens < 1:
        raise SelfMergeError(f"eval.eqbench.max_tokens={max_tokens} is out of range: must be >= 1")
    if n_items < 0:
        raise SelfMergeError(f"eval.eqbench.n_items={n_items} is out of range: must be >= 0 (0 = all)")


@dataclass(frozen=True)
class EQBenchConfig:
    questions: str = "offline"  # "offline" (32 shipped), "official" (the 171 v2, shipped), a v2 JSON/CSV, hf:OWNER/NAME
    n_items: int = 0  # a fixed random subset of this many items (0 = all), for faster sweeps
    seed: int = 0  # which subset
    mode: str = "generate"  # generate (the benchmark as published) or logits (one pass, no generation)
    max_tokens: int = 512  # reply length bound in generate mode
    logits_score: str = "expected"  # logits mode: expected value or argmax of P(score 0-10)
    n_ctx: int = 2048
    threads: Optional[int] = None  # None = all cores

    def __post_init__(self) -> None:
        check_options(self.mode, self.logits_score, self.max_tokens, self.n_items)
        if self.n_ctx < 256:
            raise SelfMergeError(f"eval.eqbench.n_ctx={self.n_ctx} is out of range: must be >= 256")


class EQBenchEval:
    """Items loaded once (a fixed subset when n_items is set); each call scores one model file."""

    def __init__(self, questions: str = "offline", n_items: int = 0, seed: int = 0, mode: str = "generate", max_tokens: int = 512,
                 logits_score: str = "expected", n_ctx: int = 2048, threads=None, open_model: Callable = LlamaCppModel) -> None:  # fmt: skip
        check_options(mode, logits_score, max_tokens, n_items)
        self.items = subset(load_items(questions), n_items, seed)
        if not self.items:
            raise SelfMergeError(f"eval.eqbench.questions={questions!r} holds no items")
        self.mode, self.max_tokens, self.logits_score, self.n_ctx, self.threads = mode, max_tokens, logits_score, n_ctx, threads
        self.open_model = open_model  # model -> ChatModel context; LlamaCppModel opens GGUF paths

    @classmethod
    def from_config(cls, config: EQBenchConfig, context: EvalContext) -> EQBenchEval:
        """Checked against the base model: every prompt and its reply must fit n_ctx."""
        evaluation = cls(config.questions, config.n_items, config.seed, config.mode, config.max_tokens,
                         config.logits_score, config.n_ctx, config.threads, context.open_model)  # fmt: skip
        evaluation.check_fits(context.base_model)
        return evaluation

    def check_fits(self, tokenizer_model: str | Path) -> None:
        """Fail before the sweep starts if the longest prompt plus the reply does not fit n_ctx."""
        with self.open_model(tokenizer_model, n_ctx=self.n_ctx, threads=self.threads) as model:
            longest = max((len(model.chat_prompt_tokens(_messages(item))), item.id) for item in self.items)
        reply = self.max_tokens if self.mode == "generate" else 16
        if longest[0] + reply > self.n_ctx:
            raise SelfMergeError(
                f"eval.eqbench.n_ctx={self.n_ctx} is too small: question {longest[1]} takes {longest[0]} tokens plus {reply} for the answer"
            )

    def __call__(self, model_path: str | Path, progress: bool = False) -> EQBenchResult:
        with self.open_model(model_path, n_ctx=self.n_ctx, threads=self.threads) as model:
            if self.mode == "logits":
                return answer_by_logits(model, self.items, self.logits_score, progress)
            return answer_by_generation(model, self.items, self.max_tokens, progress)

    def record(self, model, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        start = time.perf_counter()
        return _fields(self(model, progress=progress), time.perf_counter() - start)

    # -- item by item (validation: evals/base.py ItemEvaluation) --------------------------------
    def item_ids(self) -> list[str]:
        return [item.id for item in self.items]

    def score_items(self, model, ids: list[str], progress: bool = False) -> list[dict]:
        wanted = set(ids)
        part = copy.copy(self)
        part.items = [item for item in self.items if item.id in wanted]
        start = time.perf_counter()
        records = part(model, progress=progress).records
        seconds = (time.perf_counter() - start) / max(len(records), 1)
        return [{**asdict(record), "seconds": seconds} for record in records]

    def summarize_items(self, rows: list[dict], base: Optional[Mapping]) -> dict:
        fields = {f.name for f in dataclasses.fields(ItemRecord)}
        return _fields(summarize([ItemRecord(**{k: v for k, v in row.items() if k in fields}) for row in rows]),
                       sum(row.get("seconds", 0.0) for row in rows))  # fmt: skip


def _fields(result: EQBenchResult, seconds: float) -> dict:
    return {
        Field.EQBENCH: round(result.score, 3),
        Field.EQBENCH_PARSE_RATE: round(result.parse_rate, 3),
        Field.EQBENCH_USED: result.used,
        Field.EQBENCH_FIRST_PASS: round(result.first_pass_score, 3),
        Field.EQBENCH_REVISED: round(result.revised_score, 3),
        Field.EQBENCH_SECONDS: round(seconds, 2),
        Field.EQBENCH_ITEMS: [asdict(r) for r in result.records],  # why a plan scored as it did
    }


def _questions(config: EQBenchConfig) -> set[str]:
    return {question_key(item.prompt) for item in subset(load_items(config.questions), config.n_items, config.seed)}


SPEC = EvalSpec(
    name=Field.EQBENCH,
    config=EQBenchConfig,
    build=EQBenchEval.from_config,
    direction=lambda config: "maximize",
    columns=(Field.EQBENCH, Field.EQBENCH_PARSE_RATE),
    scores=(Field.EQBENCH, Field.EQBENCH_PARSE_RATE),
    seconds=Field.EQBENCH_SECONDS,
    questions=_questions,
)
