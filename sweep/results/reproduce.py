"""Rebuild a trial of a sweep from its stored plan with the sweep's own backend, re-score it the
same way, compare scores, and write the formats asked for (GGUF, safetensors folder, mergekit YAML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import optuna

from evals.registry import EVALS
from evals.schema import Field, StudyKey
from merge_core.errors import SelfMergeError
from merge_core.export import FORMATS, write_plan
from merge_core.layer_plan import LayerPlan
from merge_core.architectures import of_model
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.model_card import CardFacts, Score, base_licence, write_card
from merge_core.model_files import BUNDLED_FILE, bundled_model_path
from merge_core.model_shape import ModelShape
from merge_core.safetensors_merge import merge_safetensors
from merge_core.sources import used_sources
from sweep.trials.backends import Backend, make_backend
from sweep.config import BackendConfig
from sweep.results.records import merged_trials
from sweep.trials.scoring import TrialScorer, eval_config_from_fingerprint

SUFFIXES = {"gguf": ".gguf", "safetensors": "", "mergekit": ".mergekit.yml"}


def pick_trial(study: optuna.Study, trial_number: int | None):
    """The trial to rebuild: the given one, or the best by the study's first objective."""
    completed = merged_trials(study)
    if trial_number is None:
        if not completed:
            raise SelfMergeError("the sweep has no completed trial yet")
        name = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])[0]
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        return min(completed, key=lambda t: sign * t.user_attrs[name])
    for trial in completed:
        if trial.number == trial_number:
            return trial
    raise SelfMergeError(f"trial {trial_number} is not a completed trial of this sweep")


def _base_source(scoring: dict) -> Path | dict[str, Path]:
    """The sweep's base (or its sources by name, for a sweep over several models) on this machine."""
    if isinstance(scoring["model"], dict):
        return {name: _base_source({"model": path}) for name, path in scoring["model"].items()}
    base = Path(scoring["model"])
    if not base.exists() and base.name == BUNDLED_FILE:  # a sweep from another machine's site-packages
        base = bundled_model_path()
    if not base.exists():
        raise SelfMergeError(f"the sweep's base model {base} is not on this machine")
    return base


def sweep_backend(study: optuna.Study, results_dir: Path) -> tuple[Path, BackendConfig, Backend]:
    """The base, backend settings and backend a sweep scored with, as stored in its study."""
    scoring = study.user_attrs.get(StudyKey.SCORING)
    if not scoring:
        raise SelfMergeError("this study has no scoring record; it was not written by selfmerge sweep")
    source = _base_source(scoring)
    config = BackendConfig(**scoring.get("backend", {}))
    model = {name: str(path) for name, path in source.items()} if isinstance(source, dict) else str(source)
    # an HF base converts once, into results_dir/base
    return source, config, make_backend(model, config, results_dir, scoring.get("base_source"))


def reproduce(study: optuna.Study, results_dir: Path, trial_number: int | None, out_dir: Path, threads: int | None = None,
              formats: list[str] | None = None) -> dict:  # fmt: skip
    """``formats`` default: what the sweep scored (GGUF for llama_cpp, safetensors for torch) and the YAML."""
    trial = pick_trial(study, trial_number)
    scoring = study.user_attrs.get(StudyKey.SCORING)
    source, backend_config, backend = sweep_backend(study, results_dir)
    formats = formats or (["gguf", "mergekit"] if backend_config.kind == "llama_cpp" else ["safetensors", "mergekit"])
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SelfMergeError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    plan = LayerPlan.parse(trial.user_attrs[Field.PLAN])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results_dir.name}-trial{trial.number}"
    hf_id = study.user_attrs.get(StudyKey.MODEL_HF_ID, str(source))
    written = []
    scored_file = out_dir / f"{stem}.gguf"
    if backend_config.kind == "llama_cpp":  # the very file the sweep scored, rebuilt by the same code
        scored_file.unlink(missing_ok=True)
        model = backend.build(plan, scored_file)
        written.append(scored_file)
    else:
        model = backend.build(plan)
    for fmt in formats:
        if fmt == "gguf" and backend_config.kind == "llama_cpp":
            continue
        target = out_dir / f"{stem}{SUFFIXES[fmt]}"
        if fmt == "safetensors" and target.exists():
            raise SelfMergeError(f"{target} already exists: remove it or choose another --out")
        if isinstance(source, dict):
            written.append(_write_sources(source, plan, target, fmt, backend.base_source))
            continue
        quant = backend_config.quant if fmt == "gguf" and not source.suffix == ".gguf" else None
        written.append(write_plan(source, plan, target, fmt, hf_id, quant=quant, convert_type=backend_config.convert_type, progress=True))
    scores = TrialScorer(eval_config_from_fingerprint(scoring, threads), backend.base, 0, backend.open_model)(model, progress=True)
    record = {"trial": trial.number, Field.PLAN: str(plan), "written": [str(p) for p in written]}
    print(f"trial {trial.number}  plan {plan}  ({plan.n_layers} layers, {backend_config.kind} backend)")
    for name in (score for spec in EVALS.values() for score in spec.scores):
        if name in scores:
            stored, again = trial.user_attrs[name], scores[name]
            record[f"stored_{name}"], record[f"reproduced_{name}"] = stored, again
            change = f"  ({(again / stored - 1) * 100:+.3f}%)" if stored else ""
            print(f"{name:18s} stored {stored:.4f}  reproduced {again:.4f}{change}")
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))
    facts = _card_facts(study, trial, plan, source, hf_id, results_dir, out_dir, backend.base_source)
    cards = [write_card(target, facts) for target in (out_dir, *(p for p in written if p.is_dir()))]
    print("wrote " + ", ".join(str(p) for p in [*written, *cards]))
    return record


def _write_sources(source: dict[str, Path], plan: LayerPlan, target: Path, fmt: str,
                   base_source: Optional[str]) -> Path:  # fmt: skip
    """A plan over several models as ``fmt``: the recipe naming each, or from HF folders the safetensors
    folder (a GGUF from GGUF sources is the very file the llama.cpp backend scored, written above)."""
    models = {name: str(path) for name, path in source.items()}
    if fmt == "mergekit":
        arch = of_model(next(iter(source.values())))
        target.write_text(plan_to_mergekit_yaml(plan, models, base_source=base_source, arch=arch))
    elif fmt == "safetensors" and all(path.is_dir() for path in source.values()):
        merge_safetensors(source, plan, target, model_name=models, progress=True, base_source=base_source)
    else:
        raise SelfMergeError(
            f"a sweep over several models is reproduced as mergekit, and as gguf from GGUF sources or "
            f"safetensors from HF folders; not {fmt} from {', '.join(models.values())}"
        )
    return target


def _scored_on(scoring: dict) -> str:
    """The sweep's scoring fingerprint in words: each evaluation's settings, then the backend's."""
    evals = "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in settings.items())})" for name, settings in scoring["eval"].items())
    backend = ", ".join(f"{k}={v}" for k, v in scoring.get("backend", {}).items())
    return f"{evals}; backend {backend}"


def _card_facts(study, trial, plan: LayerPlan, source: Path | dict[str, Path], hf_id: str, results_dir: Path,
                out_dir: Path, base_source: Optional[str]) -> CardFacts:  # fmt: skip
    base = study.user_attrs.get(StudyKey.BASE, {})
    names = [name for spec in EVALS.values() for name in spec.scores if name in trial.user_attrs]
    scores = tuple(Score(name, trial.user_attrs[name], base.get(name)) for name in names)
    command = f"selfmerge reproduce {results_dir} --trial {trial.number} --out {out_dir}"
    sources = source if isinstance(source, dict) else {}
    first = sources[plan.end_sources(next(iter(sources)), base_source)[0]] if sources else source
    named = tuple((name, str(sources[name]), base_licence(sources[name]))
                  for name in used_sources(plan, base_source))  # fmt: skip
    return CardFacts(hf_id, plan, ModelShape.of(first), base_licence(first), scores,
                     _scored_on(study.user_attrs[StudyKey.SCORING]), (command,), named, base_source,
                     of_model(first))  # fmt: skip
