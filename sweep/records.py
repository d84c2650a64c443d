"""What a sweep writes under results/<sweep>/: per-trial JSON records and the leaderboard CSV.

Both are rebuilt from the study, so they are never the only copy of a result, and both are
written to a temporary file and renamed, so a killed sweep never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

LEADERBOARD_COLUMNS = [
    "rank", "trial", "plan", "n_layers", "ppl", "ppl_vs_base", "eval_seconds", "merge_seconds", "state",
    "tokens_per_second", "file_mb", "model_file", "cache_hit_of", "error",
]  # fmt: skip


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def models_dir(directory: Path) -> Path:
    return directory / "models"


def model_file(directory: Path, trial_number: int) -> Path:
    return models_dir(directory) / f"trial_{trial_number}.gguf"


def trial_record(trial: FrozenTrial) -> dict:
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        **trial.user_attrs,
        "fail_reason": trial.system_attrs.get("fail_reason"),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "finished": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
    }


def write_trial_record(directory: Path, trial: FrozenTrial) -> None:
    (directory / "trials").mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "trials" / f"{trial.number}.json", json.dumps(trial_record(trial), indent=2, default=str))


def leaderboard_frame(study: optuna.Study, directory: Path | None = None) -> pd.DataFrame:
    """One row per finished trial: completed ones best first (ranked), then pruned and failed."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    rows = []
    for trial in finished:
        attrs = trial.user_attrs
        path = model_file(directory, trial.number) if directory is not None else None
        rows.append(
            {
                "trial": trial.number,
                "plan": attrs.get("plan"),
                "n_layers": attrs.get("n_layers"),
                "ppl": trial.value if trial.state == TrialState.COMPLETE else attrs.get("ppl"),
                "ppl_vs_base": attrs.get("ppl_vs_base"),
                "eval_seconds": attrs.get("eval_seconds"),
                "merge_seconds": attrs.get("merge_seconds"),
                "state": "BASE" if attrs.get("is_base") and trial.state == TrialState.COMPLETE else trial.state.name,
                "tokens_per_second": attrs.get("tokens_per_second"),
                "file_mb": attrs.get("file_mb"),
                "model_file": str(path) if path is not None and path.exists() else None,
                "cache_hit_of": attrs.get("cache_hit_of"),
                "error": attrs.get("error") or trial.system_attrs.get("fail_reason"),
            }
        )
    frame = pd.DataFrame(rows, columns=[c for c in LEADERBOARD_COLUMNS if c != "rank"])
    if frame.empty:
        frame.insert(0, "rank", pd.Series(dtype="Int64"))
        return frame
    done = frame["state"].isin(["COMPLETE", "BASE"])
    frame["_order"] = (~done).astype(int)
    frame = frame.sort_values(["_order", "ppl", "trial"], na_position="last").drop(columns="_order").reset_index(drop=True)
    ranks = pd.Series(range(1, int(done.sum()) + 1), dtype="Int64")
    frame.insert(0, "rank", pd.concat([ranks, pd.Series([pd.NA] * (len(frame) - len(ranks)), dtype="Int64")], ignore_index=True))
    return frame


def write_leaderboard(study: optuna.Study, directory: Path) -> pd.DataFrame:
    frame = leaderboard_frame(study, directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "leaderboard.csv", frame.to_csv(index=False))
    return frame


def format_float(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
