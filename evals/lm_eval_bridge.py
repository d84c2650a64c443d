"""lm-eval tasks (EleutherAI's lm-evaluation-harness) as sweep objectives, on either backend.

torch: the in-memory merged model is handed to lm-eval's own HF wrapper (``HFLM``) as an instance,
so no file is written. llama.cpp: ``LlamaCppLM`` answers lm-eval's requests (log-likelihood of a
continuation, rolling log-likelihood, greedy generation) from the merged GGUF in llama-cpp-python.
The objective is one metric (``eval.lm_eval.metric``, e.g. acc or acc_norm) averaged over the tasks.
Tasks come from lm-eval's registry (online: they download their datasets) or from YAML files in
``include_path`` (offline: a local JSON dataset, as the tests do).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

from evals.base import EvalContext, EvalSpec, StopEarly, never
from evals.llama_cpp_model import LlamaCppModel
from evals.schema import Field
from merge_core.errors import SelfMergeError


@dataclass(frozen=True)
class LmEvalConfig:
    """lm-eval tasks as one objective: ``metric`` averaged over ``tasks``."""

    tasks: tuple[str, ...] = ("arc_easy",)
    metric: str = "acc"  # acc, acc_norm, exact_match, ... as the tasks report it
    direction: str = "maximize"
    limit: Optional[float] = None  # items per task (a fraction if < 1); null = all
    num_fewshot: Optional[int] = None  # null = the task's default
    include_path: Optional[str] = None  # a folder of task YAMLs of your own (e.g. over local JSON data)
    batch_size: int = 8  # torch backend
    n_ctx: int = 2048
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise SelfMergeError(f"eval.lm_eval.direction={self.direction!r}: use minimize or maximize")
        if self.limit is not None and self.limit <= 0:
            raise SelfMergeError(f"eval.lm_eval.limit={self.limit} is out of range: must be > 0 or null")


def _lm_class():
    from lm_eval.api.model import LM

    class LlamaCppLM(LM):
        """lm-eval's three request types, answered by a GGUF in llama.cpp."""

        def __init__(self, model: LlamaCppModel) -> None:
            super().__init__()
            self.model = model
            self.bos = [model.llm.token_bos()] if model.llm._model.add_bos_token() else []

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            tokens = (self.bos + context + continuation)[-self.model.n_ctx :]
            first = len(tokens) - len(continuation) - 1
            rows = self.model.scored_logits(tokens, first).astype(np.float64)
            log_norm = rows.max(axis=1) + np.log(np.exp(rows - rows.max(axis=1, keepdims=True)).sum(axis=1))
            picked = rows[np.arange(len(continuation)), continuation]
            return float((picked - log_norm).sum()), bool((rows.argmax(axis=1) == np.asarray(continuation)).all())

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            results = []
            for request in requests:
                context, continuation = request.args
                whole = self.model.tokenize(context + continuation)
                head = self.model.tokenize(context)
                split = len(head) if whole[: len(head)] == head and len(whole) > len(head) else None
                if split is None:  # the boundary merged into one token: tokenize the parts apart
                    head, tail = head, self.model.tokenize(continuation)
                else:
                    tail = whole[split:]
                results.append(self._score(head, tail))
            return results

        def loglikelihood_rolling(self, requests) -> list[float]:
            results = []
            for request in requests:
                tokens = self.bos + self.model.tokenize(request.args[0])
                total, step = 0.0, self.model.n_ctx
                for start in range(0, len(tokens) - 1, step - 1):  # windows overlap by one token: each token is predicted once
                    window = tokens[start : start + step]
                    if len(window) > 1:
                        total -= float(self.model.window_nll(window, 0).sum())
                results.append(total)
            return results

        def generate_until(self, requests) -> list[str]:
            results = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                results.append(self.model.complete(context, int(kwargs.get("max_gen_toks", 256)), [until] if isinstance(until, str) else until))
            return results

    return LlamaCppLM


@dataclass(frozen=True)
class LmEvalResult:
    score: float  # the metric averaged over tasks
    per_task: dict[str, float]
    seconds: float


class LmEvalEval:
    """``open_model(model, n_ctx=, threads=)`` as for the other evals; what it opens decides the path."""

    def __init__(self, tasks, metric: str = "acc", limit: Optional[float] = None, num_fewshot: Optional[int] = None,
                 include_path: Optional[str] = None, batch_size: int = 8, n_ctx: int = 2048, threads=None,
                 open_model: Callable = LlamaCppModel, task_manager=None) -> None:  # fmt: skip
        from lm_eval.tasks import TaskManager

        if not tasks:
            raise SelfMergeError("eval.lm_eval.tasks is empty: name at least one lm-eval task, e.g. [arc_easy]")
        self.task_manager = task_manager or TaskManager(include_path=include_path)  # indexes every task YAML: seconds
        unknown = [t for t in tasks if t not in self.task_manager.all_tasks]
        if unknown:
            raise SelfMergeError(f"eval.lm_eval.tasks: unknown task(s) {unknown} (lm-eval's registry{' and ' + include_path if include_path else ''})")
        self.tasks, self.metric, self.limit, self.num_fewshot = list(tasks), metric, limit, num_fewshot
        self.batch_size, self.n_ctx, self.threads, self.open_model = batch_size, n_ctx, threads, open_model

    @classmethod
    def from_config(cls, config: LmEvalConfig, context: EvalContext) -> LmEvalEval:
        return cls(config.tasks, config.metric, config.limit, config.num_fewshot, config.include_path,
                   config.batch_size, config.n_ctx, config.threads, context.open_model)  # fmt: skip

    def _lm(self, model):
        from evals.torch_model import TorchModel

        if isinstance(model, TorchModel):
            from lm_eval.models.huggingface import HFLM

            return HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=self.batch_size, max_length=self.n_ctx, device=str(model.device))
        return _lm_class()(model)

    def __call__(self, model_path, progress: bool = False) -> LmEvalResult:
        import lm_eval

        logging.getLogger("lm-eval").setLevel(logging.WARNING)
        start = time.perf_counter()
        with self.open_model(model_path, n_ctx=self.n_ctx, threads=self.threads) as model:
            out = lm_eval.simple_evaluate(model=self._lm(model), tasks=self.tasks, num_fewshot=self.num_fewshot, limit=self.limit,
                                          task_manager=self.task_manager, bootstrap_iters=0, log_samples=False, verbosity="ERROR")  # fmt: skip
        per_task = {}
        for task in self.tasks:
            values = {k.split(",")[0]: v for k, v in out["results"].get(task, {}).items() if isinstance(v, (int, float))}
            if self.metric not in values:
                raise SelfMergeError(f"lm-eval task {task} has no metric {self.metric!r}; it reports {sorted(values)}")
            per_task[task] = float(values[self.metric])
        return LmEvalResult(float(np.mean(list(per_task.values()))), per_task, time.perf_counter() - start)

    def record(self, model, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        result = self(model, progress=progress)
        return {Field.LM_EVAL: round(result.score, 4), Field.LM_EVAL_TASKS: result.per_task,
                Field.LM_EVAL_SECONDS: round(result.seconds, 2)}  # fmt: skip


SPEC = EvalSpec(
    name=Field.LM_EVAL,
    config=LmEvalConfig,
    build=LmEvalEval.from_config,
    direction=lambda config: config.direction,  # the configured metric's own
    columns=(Field.LM_EVAL,),
    scores=(Field.LM_EVAL,),
    seconds=Field.LM_EVAL_SECONDS,
)
