"""Rebuild a trial of a sweep from its stored plan, re-score it the same way, compare scores."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from evals.perplexity import PerplexityResult
from evals.ppl_eval import PerplexityEval
from merge_core.errors import SelfMergeError
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.model_files import BUNDLED_FILE, bundled_model_path
from sweep.config import PerplexityConfig
from sweep.records import merged_trials


def pick_trial(study: optuna.Study, trial_number: int | None):
    """The trial to rebuild: the given one, or the one with the lowest perplexity."""
    completed = merged_trials(study)
    if trial_number is None:
        if not completed:
            raise SelfMergeError("the sweep has no completed trial yet")
        return min(completed, key=lambda t: t.user_attrs["ppl"])
    for trial in completed:
        if trial.number == trial_number:
            return trial
    raise SelfMergeError(f"trial {trial_number} is not a completed trial of this sweep")


def reproduce(study: optuna.Study, results_dir: Path, trial_number: int | None, out_dir: Path, threads: int | None = None) -> PerplexityResult:
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
    model_path = out_dir / f"{results_dir.name}-trial{trial.number}.gguf"
    merge_gguf(base, plan, model_path)
    hf_id = study.user_attrs.get("model_hf_id", str(base))
    (out_dir / f"{results_dir.name}-trial{trial.number}.mergekit.yml").write_text(plan_to_mergekit_yaml(plan, hf_id))
    ppl_config = PerplexityConfig(**{**scoring["eval"]["ppl"], "threads": threads})
    result = PerplexityEval.from_config(base, ppl_config)(model_path, progress=True)
    stored = trial.user_attrs["ppl"]
    record = {"trial": trial.number, "plan": str(plan), "stored_ppl": stored, "reproduced_ppl": result.ppl, "model": str(model_path)}
    (out_dir / f"{results_dir.name}-trial{trial.number}.json").write_text(json.dumps(record, indent=2))
    print(f"trial {trial.number}  plan {plan}  ({plan.n_layers} layers)")
    print(f"stored ppl     {stored:.4f}")
    print(f"reproduced ppl {result.ppl:.4f}  ({(result.ppl / stored - 1) * 100:+.3f}%)")
    print(f"wrote {model_path} and its mergekit YAML")
    return result
