"""EQ-Bench v2 scoring, exactly as the original benchmark parses and scores answers.

An item is a dialogue, a character and four emotions, each with a reference intensity 0-10
(``reference_answer_fullscale``). The model answers with "First pass scores:", a critique and
"Revised scores:", one ``Emotion: number`` line per emotion. An answer is parseable only if it
names all four emotions (case-insensitive) with integer scores.

Item score (v2 fullscale): for each emotion d = |answer - reference|; d == 0 adds 0; d <= 5 adds
6.5 / (1 + e^(-1.2 (d - 4))); d > 5 adds d; item = 10 - 0.7477 * total. Run score = 100 * mean item
score / 10 over parseable items, for first pass and revised apart; the revised one counts when it is
>= the first pass and has at least 95% as many parseable answers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from evals.eqbench_items import EQItem
from merge_core.errors import SelfMergeError

_PAIR = re.compile(r"(\w+):\s+(\d+)")
_FIRST_PASS = re.compile(r"First pass scores:(.*?)Revised scores:", re.DOTALL)
_REVISED = re.compile(r"Revised scores:(.*?)$", re.DOTALL)
ADJUST = 0.7477  # answering the top reference emotion 10 and the others 0 scores about 0


@dataclass(frozen=True)
class ItemRecord:
    id: str
    raw_answer: str
    first_pass: Optional[dict[str, float]]  # None when unparseable
    revised: Optional[dict[str, float]]
    first_pass_score: Optional[float]
    revised_score: Optional[float]


@dataclass(frozen=True)
class EQBenchResult:
    score: float  # 0-100
    parse_rate: float  # parseable answers / items asked, for the pass that counts
    used: str  # "revised" or "first_pass"
    first_pass_score: float
    revised_score: float
    n_items: int
    records: list[ItemRecord] = field(repr=False)


def parse_answer(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The ``Emotion: number`` pairs of the first-pass and revised sections (later pairs win)."""
    first = _FIRST_PASS.search(text)
    revised = _REVISED.search(text)
    return (dict(_PAIR.findall(first.group(1))) if first else {}, dict(_PAIR.findall(revised.group(1))) if revised else {})


def _matched(reference: dict[str, float], answer: dict[str, str]) -> Optional[dict[str, int]]:
    """The answer keyed by reference emotion, or None unless it gives exactly the four emotions."""
    if len(answer) != 4:
        return None
    by_lower = {emotion.lower(): emotion for emotion in reference}
    matched = {by_lower[name.lower()]: int(score) for name, score in answer.items() if name.lower() in by_lower}
    return matched if len(matched) == 4 else None


def item_score(reference: dict[str, float], answer: dict[str, float]) -> float:
    total = 0.0
    for emotion, value in answer.items():
        d = abs(float(value) - reference[emotion])
        if d == 0:
            continue
        total += 6.5 / (1 + math.e ** (-1.2 * (d - 4))) if d <= 5 else d
    return 10 - ADJUST * total


def score_answers(items: list[EQItem], answers: dict[str, str]) -> EQBenchResult:
    """Score raw answers (item id -> text); a missing or gibberish answer counts as unparseable."""
    if not items:
        raise SelfMergeError("no EQ-Bench items to score")
    records = []
    for item in items:
        text = answers.get(item.id, "")
        first_raw, revised_raw = parse_answer(text)
        first, revised = _matched(item.reference, first_raw), _matched(item.reference, revised_raw)
        records.append(
            ItemRecord(
                item.id, text, first, revised,
                item_score(item.reference, first) if first else None,
                item_score(item.reference, revised) if revised else None,
            )  # fmt: skip
        )
    return summarize(records)


def summarize(records: list[ItemRecord]) -> EQBenchResult:
    """The run score from per-item records: revised when it is no worse and as often parseable."""
    first_scores = [r.first_pass_score for r in records if r.first_pass_score is not None]
    revised_scores = [r.revised_score for r in records if r.revised_score is not None]
    first_run = 10 * sum(first_scores) / len(first_scores) if first_scores else 0.0
    revised_run = 10 * sum(revised_scores) / len(revised_scores) if revised_scores else 0.0
    use_revised = bool(revised_scores) and revised_run >= first_run and len(revised_scores) >= 0.95 * len(first_scores)
    parsed = len(revised_scores) if use_revised else len(first_scores)
    return EQBenchResult(
        score=revised_run if use_revised else first_run,
        parse_rate=parsed / len(records),
        used="revised" if use_revised else "first_pass",
        first_pass_score=first_run,
        revised_score=revised_run,
        n_items=len(records),
        records=records,
    )


def read_answers_jsonl(path: str | Path) -> dict[str, str]:
    """Answers produced elsewhere: one ``{"id": ..., "text": ...}`` object per line."""
    answers = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SelfMergeError(f"answers file not found: {path}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers[str(row["id"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SelfMergeError(f"{path} line {number} is not a JSON object with 'id' and 'text'") from None
    return answers
