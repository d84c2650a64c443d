"""What a sweep writes under results/<sweep>/: per-trial JSON records and the leaderboard CSV.

Both are rebuilt from the study, so they are never the only copy of a result, and both are
written to a temporary file and renamed, so a killed sweep never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from evals.registry import EVALS
from evals.schema import Field, StudyKey
from sweep.trials.model_store import model_file

LEADERBOARD_ONLY = ("rank", "trial", "state", "model_file", Field.ERROR)  # not a trial's own attributes
INTEGER_COLUMNS = ("rank", Field.N_LAYERS, Field.CACHE_HIT_OF)  # written 3, not 3.0, where a row has none
STUDY_RECORD = "study.json"  # the study's own attributes, beside trials/N.json: enough to rebuild it


def leaderboard_columns(evals: Iterable[str] = tuple(EVALS)) -> list[str]:
    """The columns of a leaderboard of a sweep that ran ``evals``: their columns, then their timings."""
    specs = [EVALS[name] for name in EVALS if name in set(evals)]
    throughput = [Field.TOKENS_PER_SECOND] if Field.PPL in evals else []
    return [
        "rank", "trial", Field.PLAN, Field.N_LAYERS,
        *(column for spec in specs for column in spec.columns), *(spec.seconds for spec in specs),
        Field.MERGE_SECONDS, "state", *throughput, Field.FILE_MB, Field.PRIOR_COST, "model_file",
        Field.CACHE_HIT_OF, Field.ERROR,
    ]  # fmt: skip


LEADERBOARD_COLUMNS = leaderboard_columns()  # every evaluation's
VALIDATION_DIR = "validation"  # sweep/results/validation.py writes there; the leaderboard reads its summary


def atomic_write_text(path: Path, text: str) -> None:
    """Written whole or not at all. Several workers write the same leaderboard and study record, so
    each writes a temporary file of its own (a shared ``.partial`` name would be one worker's to
    delete while another still writes it), then renames it over the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would follow the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trial_record(trial: FrozenTrial) -> dict:
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "distributions": {name: json.loads(distribution_to_json(d)) for name, d in trial.distributions.items()},
        "intermediate_values": trial.intermediate_values,
        **trial.user_attrs,
        Field.FAIL_REASON: trial.system_attrs.get(Field.FAIL_REASON),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "finished": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
    }


def write_trial_record(directory: Path, trial: FrozenTrial) -> None:
    (directory / "trials").mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "trials" / f"{trial.number}.json", json.dumps(trial_record(trial), indent=2, default=str))


def write_study_record(directory: Path, study: optuna.Study) -> None:
    """The study's name, directions and attributes (objectives, scoring, base record): with the
    trial records, what ``selfmerge rebuild`` needs to make the study again."""
    record = {"study_name": study.study_name, "directions": [d.name.lower() for d in study.directions],
              "user_attrs": study.user_attrs}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / STUDY_RECORD, json.dumps(record, indent=2, default=str))


def merged_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, each a scored self-merge (cache hits included)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def pareto_flags(points: list[tuple[float, ...]], directions: list[str]) -> list[bool]:
    """True for each point no other point dominates (as good in every objective, better in one).
    Two objectives (the leaderboard's usual score and depth) in one sort, O(n log n): the board is
    rewritten all through a sweep of 20,000 trials; more objectives compare each point with all."""
    keyed = np.asarray(points, dtype=float).reshape(len(points), -1)
    keyed = keyed * np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    if len(keyed) and keyed.shape[1] == 2:
        flags = np.zeros(len(keyed), dtype=bool)
        order = np.lexsort((keyed[:, 1], keyed[:, 0]))  # by the first objective, then the second
        best_second = np.inf  # the least second value among points with a smaller first value
        starts = np.flatnonzero(np.r_[True, np.diff(keyed[order, 0]) != 0])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            group = order[start:end]
            least = keyed[group, 1].min()  # within a tie on the first objective, only the least second
            flags[group] = (keyed[group, 1] == least) & (least < best_second)
            best_second = min(best_second, least)
        return flags.tolist()
    return [not np.any(np.all(keyed <= mine, axis=1) & np.any(keyed < mine, axis=1)) for mine in keyed]


def _row(trial: FrozenTrial | None, attrs: dict, state: str, directory: Path | None) -> dict:
    path = model_file(directory, trial.number) if trial is not None and directory is not None else None
    return {
        "trial": trial.number if trial is not None else "base",
        **{column: attrs.get(column) for column in LEADERBOARD_COLUMNS if column not in LEADERBOARD_ONLY},
        "state": state,
        "model_file": str(path) if path is not None and path.exists() else None,
        Field.ERROR: attrs.get(Field.ERROR) or (trial.system_attrs.get(Field.FAIL_REASON) if trial is not None else None),
    }


def leaderboard_frame(study: optuna.Study, directory: Path | None = None) -> pd.DataFrame:
    """The base model, then one row per finished trial: completed ones best first (by the first
    objective), then pruned and failed. ``pareto`` marks the merges no other merge dominates in the
    study's objectives (for a single-objective study: in it and depth, deeper counting as better).
    Only the evaluations the sweep ran have columns."""
    columns = leaderboard_columns(study.user_attrs.get(StudyKey.SCORING, {}).get("eval", EVALS)) + ["pareto"]
    completed = merged_trials(study)
    others = study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL))
    rows = [_row(t, t.user_attrs, "COMPLETE", directory) for t in completed]
    names = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])
    directions = [d.name.lower() for d in study.directions]
    if completed:
        pareto_names, pareto_directions = (names, directions) if len(names) > 1 else ([names[0], Field.N_LAYERS], [directions[0], "maximize"])
        flags = pareto_flags([tuple(t.user_attrs[n] for n in pareto_names) for t in completed], pareto_directions)
        for row, flag in zip(rows, flags):
            row["pareto"] = flag
    frame = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS[1:] + ["pareto"])
    frame = frame.sort_values([names[0], "trial"], ascending=[directions[0] == "minimize", True], kind="stable").reset_index(drop=True)
    # rank distinct plans: a cache hit (the same plan proposed again) shares its first trial's rank
    first = frame[Field.CACHE_HIT_OF].isna()
    rank_of = dict(zip(frame.loc[first, "trial"], range(1, int(first.sum()) + 1)))
    frame.insert(0, "rank", pd.Series([rank_of.get(t if f else c) for t, f, c in zip(frame["trial"], first, frame[Field.CACHE_HIT_OF])], dtype="Int64"))
    tail = pd.DataFrame([_row(t, t.user_attrs, t.state.name, directory) for t in others], columns=LEADERBOARD_COLUMNS[1:])
    base = study.user_attrs.get(StudyKey.BASE)
    head = pd.DataFrame([_row(None, base, "BASE", None)]) if base is not None else None
    parts = [p for p in (head, frame, tail) if p is not None and not p.empty]
    board = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    board = board.reindex(columns=columns)
    for column in INTEGER_COLUMNS:
        board[column] = pd.to_numeric(board[column]).astype("Int64")
    return with_validation(board, directory)


def with_validation(board: pd.DataFrame, directory: Path | None) -> pd.DataFrame:
    """The validated scores beside each validated plan, and the final rank by the first of them."""
    summary = directory / VALIDATION_DIR / "summary.json" if directory is not None else None
    if summary is None or not summary.is_file():
        return board
    models = json.loads(summary.read_text(encoding="utf-8"))["models"]
    columns = [key for key in models[0] if key.startswith(Field.VALIDATED)] + [Field.FINAL_RANK] if models else []
    by_plan = {model[Field.PLAN]: model for model in models}
    for position, column in enumerate(columns):
        values = [by_plan.get(plan, {}).get(column) if state in ("BASE", "COMPLETE") else None
                  for plan, state in zip(board[Field.PLAN], board["state"])]  # fmt: skip
        board.insert(4 + position, column, pd.Series(values, index=board.index, dtype="Int64" if column == Field.FINAL_RANK else "Float64"))
    return board


def distinct_plans(frame: pd.DataFrame) -> pd.DataFrame:
    """Leaderboard rows without cache hits: each plan once, under the trial that scored it."""
    return frame[frame[Field.CACHE_HIT_OF].isna()]


def write_leaderboard(study: optuna.Study, directory: Path) -> pd.DataFrame:
    frame = leaderboard_frame(study, directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "leaderboard.csv", frame.to_csv(index=False))
    return frame


