"""Probes: short item sets scored from next-token probabilities, with no generation, as RYS and
the ``layer-scan`` tool score each plan. Gains seen on a probe often fail to transfer, so the best
plans of a sweep are checked again on held-out items (sweep/results/validation.py).

An item is a chat prompt, an answer ``prefix`` that the assistant turn starts with, and an answer
of one kind:
  integer  a whole number: the model's most likely continuation must spell it, then stop
  choice   one of the item's ``choices``
  rating   an integer on ``scale`` (EQ-Bench's emotions: 0-10); the reference may be fractional

What one item measures (``ItemScore``):
  accuracy  1 when the most likely answer is the right one
  logprob   log P(right answer): a continuous, low-noise signal (never below LOGPROB_FLOOR)
  score     0-100: 100 x accuracy; for a rating, 100 x (1 - |E[value] - reference| / span)
  coverage  probability on valid answers: how much of the model still answers in the format
  entropy   nats, of the first answer token's distribution over the whole vocabulary
A plan that has lost the format spreads its probability over everything: its expected rating sits
mid-scale, which used to score well (EQ-Bench logits mode gave gibberish 71.8). ``gated`` floors
an item whose coverage falls under a threshold, so such a plan can never outscore the base.

Probe sources (``eval.probe.probes``): the names in PROBES (shipped, written for selfmerge), or a
.jsonl / .yaml file of items: ``{id, prompt, answer, kind, prefix, choices, scale}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import yaml

from evals.base import question_key
from merge_core.errors import SelfMergeError

KINDS = ("integer", "choice", "rating")
METRICS = ("accuracy", "logprob", "score", "coverage", "entropy")
LOGPROB_FLOOR = -20.0  # log P of an answer the model all but rules out; a gated item's logprob
INTEGER_SPELLINGS = range(-9, 1000)  # numbers whose first token counts as "answering with a number"
FIRST_PASS_HEADING = "First pass scores:\n"  # EQ-Bench's answer template (evals/eqbench.py parses it)


class ProbeModel(Protocol):
    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]: ...
    def tokenize(self, text: str) -> list[int]: ...
    def next_token_logprobs(self, tokens: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class ProbeItem:
    probe: str  # the probe's name: a PROBES name or the file's stem
    id: str
    prompt: str
    answer: Union[int, float, str]
    kind: str = "integer"
    prefix: str = ""  # the assistant's reply starts with it, e.g. "Answer: "
    choices: tuple[str, ...] = ()  # choice: the valid answers
    scale: tuple[int, int] = (0, 10)  # rating: lowest and highest value

    def candidates(self) -> list[str]:
        if self.kind == "rating":
            return [str(value) for value in range(self.scale[0], self.scale[1] + 1)]
        return list(self.choices) if self.kind == "choice" else [str(self.answer)]

    def right(self) -> int:
        """Index of the right answer among ``candidates()``."""
        if self.kind == "rating":
            return int(round(float(self.answer))) - self.scale[0]
        return self.candidates().index(str(self.answer))

    @property
    def key(self) -> str:
        """What makes two items the same question (held-out sets must share none with a probe)."""
        return question_key(self.prompt)


@dataclass(frozen=True)
class ItemScore:
    probe: str
    id: str
    accuracy: float
    logprob: Optional[float]  # None in generation mode (nothing is read from probabilities)
    score: float
    coverage: float  # generation mode: 1 when the reply held a valid answer, else 0
    entropy: Optional[float]
    gated: bool = False

    @classmethod
    def from_row(cls, row: dict) -> ItemScore:
        """From a record's row (``asdict``, perhaps with more keys: a validation row's item, seconds)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__ if name in row})

    def gated_at_floor(self) -> ItemScore:
        """The probe's floor: no credit for an item the model no longer answers in the format."""
        return replace(
            self,
            accuracy=0.0,
            score=0.0,
            logprob=LOGPROB_FLOOR if self.logprob is not None else None,
            gated=True,
        )


# -- items ------------------------------------------------------------------------------------
def _checked(raw: dict, probe: str, where: str) -> ProbeItem:
    if not isinstance(raw, dict):
        raise SelfMergeError(f"{where}: an item must be a mapping with prompt and answer, not {raw!r}")
    missing = [key for key in ("prompt", "answer") if key not in raw]
    if missing:
        raise SelfMergeError(f"{where}: the item lacks {missing}")
    unknown = sorted(set(raw) - {"id", "prompt", "answer", "kind", "prefix", "choices", "scale"})
    if unknown:
        raise SelfMergeError(f"{where}: unknown item keys {unknown}")
    kind = raw.get("kind", "integer")
    if kind not in KINDS:
        raise SelfMergeError(f"{where}: kind={kind!r} is unknown; choose one of {list(KINDS)}")
    item = ProbeItem(probe, str(raw.get("id", where)), str(raw["prompt"]), raw["answer"], kind, str(raw.get("prefix", "")),
                     tuple(str(c) for c in raw.get("choices", ())), tuple(raw.get("scale", (0, 10))))  # fmt: skip
    if kind == "integer" and not (isinstance(item.answer, int) or str(item.answer).lstrip("-").isdigit()):
        raise SelfMergeError(f"{where}: answer={item.answer!r} is not a whole number (kind integer)")
    if kind == "choice" and str(item.answer) not in item.choices:
        raise SelfMergeError(
            f"{where}: answer={item.answer!r} is not one of its choices {list(item.choices)}"
        )
    if kind == "rating":
        low, high = item.scale
        if not (isinstance(item.answer, (int, float)) and low <= item.answer <= high):
            raise SelfMergeError(f"{where}: answer={item.answer!r} is not a number on its scale {low}-{high}")
    return item


def load_probe_file(path: str | Path) -> list[ProbeItem]:
    """Items of a user probe: JSON lines, or YAML (a list, or a mapping with ``items``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SelfMergeError(
            f"probe file not found: {path}; eval.probe.probes takes {list(PROBES)} or a .jsonl/.yaml file"
        ) from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path} line {number}"))
                except json.JSONDecodeError as err:
                    raise SelfMergeError(f"{path} line {number} is not JSON: {err.msg}") from None
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text)
        data = data.get("items") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise SelfMergeError(f"{path}: expected a list of items (or a mapping with 'items')")
        rows = [(row, f"{path} item {number}") for number, row in enumerate(data, 1)]
    else:
        raise SelfMergeError(f"probe file {path} must end in .jsonl, .yaml or .yml")
    items = [_checked(row, path.stem, where) for row, where in rows]
    if not items:
        raise SelfMergeError(f"probe file {path} holds no items")
    return items


def _shipped(name: str) -> list[ProbeItem]:
    with resources.as_file(resources.files("evals").joinpath(f"data/probe_{name}.jsonl")) as path:
        return [replace(item, probe=name) for item in load_probe_file(path)]


def _eq_items() -> list[ProbeItem]:
    """The shipped EQ-Bench items (evals/data/eqbench_offline.yaml), one rating per emotion, read where
    EQ-Bench's logits mode reads it: after ``First pass scores:`` and the emotion's name."""
    from evals.eqbench_items import load_offline_items

    return [
        ProbeItem(
            "eq", f"{item.id}/{emotion}", item.prompt, value, "rating", f"{FIRST_PASS_HEADING}{emotion}: "
        )
        for item in load_offline_items()
        for emotion, value in item.reference.items()
    ]


PROBES = {  # shipped probes, written for selfmerge
    "math": lambda: _shipped("math"),  # 64 arithmetic and word problems, integer answers
    "math_heldout": lambda: _shipped("math_heldout"),  # 64 more of the same kinds, none shared: validation
    "eq": _eq_items,  # the 32 shipped EQ-Bench items x 4 emotions, rated 0-10
}


def load_probe(source: str) -> list[ProbeItem]:
    return PROBES[source]() if source in PROBES else load_probe_file(source)


# -- token paths, prepared once per sweep with the base model's tokenizer ----------------------
def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    n = 0
    while all(len(s) > n for s in sequences) and len({s[n] for s in sequences}) == 1:
        n += 1
    return n


@dataclass(frozen=True)
class PreparedItem:
    item: ProbeItem
    context: tuple[int, ...]  # the chat prompt, the assistant turn opened, and the prefix's tokens
    paths: tuple[tuple[int, ...], ...]  # each candidate's tokens after the context
    valid_first: frozenset[int]  # first tokens of any valid answer (coverage of an integer item)
    continues: frozenset[int] = frozenset()  # integer: tokens that would lengthen the number


def prepare(model: ProbeModel, item: ProbeItem, prompt: Optional[Sequence[int]] = None) -> PreparedItem:
    """Each candidate spelled after the prefix as the tokenizer spells it in context (" 10" may be one
    token or two), then cut where the candidates part. ``prompt``: the item's chat prompt tokens."""
    if prompt is None:
        prompt = model.chat_prompt_tokens(reply_messages(item))
    spell = item.candidates() if item.kind != "integer" else [str(item.answer), *map(str, INTEGER_SPELLINGS)]
    spelled = [model.tokenize(item.prefix + text) for text in spell]
    shared = _common_prefix(spelled)
    if item.prefix:  # never cut into a shared start of the answers themselves ("Par" of Paris, Parma)
        shared = min(shared, _common_prefix([model.tokenize(item.prefix), spelled[0]]))
    paths = tuple(tuple(tokens[shared:]) for tokens in spelled)
    where = f"probe {item.probe} item {item.id}"
    if any(not path for path in paths):
        raise SelfMergeError(f"{where}: an answer has no tokens of its own after the prefix {item.prefix!r}")
    if item.kind == "integer":
        answer = paths[0]
        longer = [model.tokenize(f"{item.prefix}{item.answer}{digit}")[shared:] for digit in range(10)]
        continues = frozenset(
            t[len(answer)] for t in longer if len(t) > len(answer) and tuple(t[: len(answer)]) == answer
        )
        return PreparedItem(
            item, (*prompt, *spelled[0][:shared]), (answer,), frozenset(p[0] for p in paths), continues
        )
    if len(set(paths)) < len(paths):
        raise SelfMergeError(f"{where}: the tokenizer spells two answers the same way")
    return PreparedItem(item, (*prompt, *spelled[0][:shared]), paths, frozenset(p[0] for p in paths))


def prepare_all(model: ProbeModel, items: Sequence[ProbeItem]) -> list[PreparedItem]:
    """Every item prepared, each distinct prompt rendered once (the eq probe asks four per prompt)."""
    prompts: dict[str, list[int]] = {}
    for item in items:
        if item.prompt not in prompts:
            prompts[item.prompt] = model.chat_prompt_tokens(reply_messages(item))
    return [prepare(model, item, prompts[item.prompt]) for item in items]


# -- scoring from probabilities ---------------------------------------------------------------
def answer_masses(model: ProbeModel, context: Sequence[int], paths: Sequence[tuple[int, ...]],
                  first: Optional[np.ndarray] = None) -> np.ndarray:  # fmt: skip
    """P(the reply is exactly each answer): the product along its token path, less the mass of longer
    answers passing through it (" 1" then "0" is 10, not 1). ``first``: the context's log-probs, if read."""
    context = list(context)
    logprobs: dict[tuple, np.ndarray] = {} if first is None else {(): first}

    def through(path: tuple) -> float:
        total = 0.0
        for depth, token in enumerate(path):
            head = path[:depth]
            if head not in logprobs:
                logprobs[head] = model.next_token_logprobs(context + list(head))
            total += logprobs[head][token]
        return float(np.exp(total))

    passing = np.array([through(path) for path in paths])
    ending = passing.copy()
    for i, path in enumerate(paths):
        for j, longer in enumerate(paths):
            if j != i and len(longer) > len(path) and longer[: len(path)] == path:
                ending[i] -= passing[j]
    return np.clip(ending, 0.0, None)


def _entropy(logprobs: np.ndarray) -> float:
    probs = np.exp(logprobs)
    return float(-(probs[probs > 0] * logprobs[probs > 0]).sum())


def _logprob(probability: float) -> float:
    return max(math.log(probability), LOGPROB_FLOOR) if probability > 0 else LOGPROB_FLOOR


def score_item(model: ProbeModel, prepared: PreparedItem) -> ItemScore:
    """One item from the model's probabilities: the context is read once, then each answer's tokens."""
    item, context = prepared.item, list(prepared.context)
    first = model.next_token_logprobs(context)
    entropy = _entropy(first)
    if (
        item.kind == "integer"
    ):  # teacher-forced along the answer; right when greedy decoding would say it and stop
        path, logprob, greedy = prepared.paths[0], 0.0, True
        for depth, token in enumerate(path):
            row = first if depth == 0 else model.next_token_logprobs(context + list(path[:depth]))
            logprob += row[token]
            greedy = greedy and int(np.argmax(row)) == token
        if greedy and prepared.continues:
            greedy = int(np.argmax(model.next_token_logprobs(context + list(path)))) not in prepared.continues
        coverage = float(np.exp(first[list(prepared.valid_first)]).sum())
        return ItemScore(
            item.probe, item.id, float(greedy), _logprob(math.exp(logprob)), 100.0 * greedy, coverage, entropy
        )
    masses = answer_masses(model, context, prepared.paths, first)
    coverage, right = float(masses.sum()), item.right()
    accuracy = float(coverage > 0 and int(np.argmax(masses)) == right)
    if item.kind == "rating":
        low, high = item.scale
        distribution = masses / coverage if coverage > 0 else np.full(len(masses), 1 / len(masses))
        expected = float(np.dot(np.arange(low, high + 1), distribution))
        score = 100.0 * (1 - abs(expected - float(item.answer)) / (high - low))
    else:
        score = 100.0 * accuracy
    return ItemScore(item.probe, item.id, accuracy, _logprob(float(masses[right])), score, coverage, entropy)


# -- scoring a reply (generation mode: a probe's published form, for validation) ---------------
_INTEGER = re.compile(r"-?\d+")


def score_reply(item: ProbeItem, reply: str) -> ItemScore:
    """The first answer in the reply (after the prefix, if the model wrote it): the first whole number,
    or the first of the choices named. No valid answer: coverage 0 and no credit."""
    text = reply.split(item.prefix.strip(), 1)[-1] if item.prefix.strip() else reply
    if item.kind == "choice":
        found = sorted(
            (m.start(), c) for c in item.choices for m in [re.search(rf"\b{re.escape(c)}\b", text, re.I)] if m
        )
        given: Optional[Union[int, str]] = found[0][1] if found else None
    else:
        match = _INTEGER.search(text)
        given = int(match.group()) if match else None
        if given is not None and item.kind == "rating" and not item.scale[0] <= given <= item.scale[1]:
            given = None
    if given is None:
        return ItemScore(item.probe, item.id, 0.0, None, 0.0, 0.0, None)
    if item.kind == "rating":
        low, high = item.scale
        right = float(given == int(round(float(item.answer))))
        return ItemScore(
            item.probe,
            item.id,
            right,
            None,
            100.0 * (1 - abs(given - float(item.answer)) / (high - low)),
            1.0,
            None,
        )
    right = float(str(given).lower() == str(item.answer).lower())
    return ItemScore(item.probe, item.id, right, None, 100.0 * right, 1.0, None)


def reply_messages(item: ProbeItem) -> list[dict]:
    return [{"role": "user", "content": item.prompt}]
