"""Rebuild a trial of a sweep from its stored plan, re-score it the same way, compare scores."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from merge_core.errors import SelfMergeError
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.model_files import BUNDLED_FILE, bundled_model_path
from sweep.records import merged_trials
from sweep.scoring import TrialScorer, eval_config_from_fingerprint

SCORES = ("ppl", "eqbench", "eqbench_parse_rate")


def pick_trial(study: optuna.Study, trial_number: int | None):
    """The trial to rebuild: the given one, or the best by the study's first objective."""
    completed = merged_trials(study)
    if trial_number is None:
        if not completed:
            raise SelfMergeError("the sweep has no completed trial yet")
        name = study.user_attrs.get("objectives", ["ppl"])[0]
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        return min(completed, key=lambda t: sign * t.user_attrs[name])
    for trial in completed:
        if trial.number == trial_number:
            return trial
    raise SelfMergeError(f"trial {trial_number} is not a completed trial of this sweep")


def reproduce(study: optuna.Study, results_dir: Path, trial_number: int | None, out_dir: Path, threads: int | None = None) -> dict:
    trial = pick_trial(study, trial_number)
    scoring = study.user_attrs.get("scoring")
    if not scoring:
        raise SelfMergeError("this study has no scoring record; it was not written by selfmerge sweep")
    base = Path(scoring["model"])
    if not base.is_file() and base.name == BUNDLED_FILE:  # a sweep from another machine's site-packages
        base = bundled_model_path()
    if not base.is_file():
        raise SelfMergeError(f"the sweep's base model {base} is not on this machine")
    plan = LayerPlan.parse(trial.user_attrs["plan"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results_dir.name}-trial{trial.number}"
    model_path = out_dir / f"{stem}.gguf"
    merge_gguf(base, plan, model_path)
    hf_id = study.user_attrs.get("model_hf_id", str(base))
    (out_dir / f"{stem}.mergekit.yml").write_text(plan_to_mergekit_yaml(plan, hf_id))
    scores = TrialScorer(eval_config_from_fingerprint(scoring, threads), base)(model_path, progress=True)
    record = {"trial": trial.number, "plan": str(plan), "model": str(model_path)}
    print(f"trial {trial.number}  plan {plan}  ({plan.n_layers} layers)")
    for name in SCORES:
        if name in scores:
            stored, again = trial.user_attrs[name], scores[name]
            record[f"stored_{name}"], record[f"reproduced_{name}"] = stored, again
            change = f"  ({(again / stored - 1) * 100:+.3f}%)" if stored else ""
            print(f"{name:18s} stored {stored:.4f}  reproduced {again:.4f}{change}")
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {model_path} and its mergekit YAML")
    return record
