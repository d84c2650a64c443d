"""Validation: the best plans of a sweep, and the base, scored again on held-out items with the full
benchmark in its published mode. A probe ranks plans cheaply; its gains often fail to transfer (RYS,
layer-scan), so the final word is the held-out benchmark's.

    selfmerge validate results/<sweep> [--top K] [--only EVAL,...] [EVAL.KEY=VALUE ...]

runs by hand what ``sweep.validate.top_k`` runs when a search ends. It writes, in <sweep>/validation/:
  <id>/settings.json          the validation's settings; <id> is their hash, so other settings start afresh
  <id>/<plan>/<eval>.items.jsonl   a row per finished item, written and synced every CHUNK items
  <id>/<plan>/record.json     the plan's validated record, once all its items are done
  summary.json, summary.csv   the latest validation: each plan's sweep score, validated scores, ranks
A killed validation loses no finished item: run it again and it goes on. The items must be held
out: any item a validation shares with the sweep's own evaluations is refused before anything runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import optuna
import pandas as pd
from tqdm.auto import tqdm

from evals.base import EvalContext, Evaluation
from evals.eqbench_items import OFFLINE, OFFICIAL
from evals.registry import EVALS
from evals.registry import get as get_eval
from evals.stats import PairedDifference, holm
from evals.stats import verdict as stats_verdict
from evals.schema import Field, StudyKey
from merge_core.errors import SelfMergeError, read_json
from merge_core.layer_plan import LayerPlan
from sweep.trials.backends import Backend
from sweep.config import EvalConfig, SweepConfig
from sweep.trials.model_store import model_file
from sweep.results.records import VALIDATION_DIR, atomic_write_text, merged_trials

log = logging.getLogger("selfmerge")

DEFAULT_TOP_K = 5  # when a probe, a real benchmark or EQ-Bench logits mode is the objective
HELD_OUT_ITEMS = 500  # per task of eval=bench: a 4-point gain at ~60% accuracy is seen 4 times in 5
CHUNK = 8  # items scored between two writes of their rows: at most this many are lost to a kill
TRANSFERS = 0.6  # Spearman from which the sweep's ranking is said to carry over
HELD_OUT = {  # a shipped probe -> the benchmark, in its published form, that validates it
    "math": (Field.PROBE, {"probes": ["math_heldout"], "mode": "generate", "metric": "accuracy"}),
    "eq": (Field.EQBENCH, {"questions": OFFICIAL, "mode": "generate"}),
}


# -- what is validated, and on what ------------------------------------------------------------
def default_evals(objective: str, evals: dict[str, dict]) -> tuple[int, dict[str, dict]]:
    """(top_k, {eval: settings}) for a sweep's objective and its evaluations' settings."""
    if objective == Field.PROBE:
        chosen: dict[str, dict] = {}
        for probe in evals[Field.PROBE]["probes"]:
            if probe not in HELD_OUT:
                raise SelfMergeError(f"sweep.validate.evals: no held-out benchmark is known for probe {probe!r}; name one, "
                                     "e.g. sweep.validate.evals={probe: {probes: [held_out.jsonl]}}, or set sweep.validate.top_k=0")  # fmt: skip
            name, settings = HELD_OUT[probe]
            if name in chosen and "probes" in settings:
                chosen[name]["probes"] = [*chosen[name]["probes"], *settings["probes"]]
            else:
                chosen[name] = json.loads(json.dumps(settings))
        return DEFAULT_TOP_K, chosen
    if objective == Field.BENCH:  # the same tasks and metric on held-out items, as many as a verdict needs
        settings = {**evals[Field.BENCH], "part": "held_out", "n_items": HELD_OUT_ITEMS}
        return DEFAULT_TOP_K, {Field.BENCH: settings}
    if objective == Field.EQBENCH and evals[Field.EQBENCH].get("mode") == "logits":
        if evals[Field.EQBENCH].get("questions") != OFFLINE:
            raise SelfMergeError("sweep.validate.evals: name held-out EQ-Bench questions for this sweep's question set, "
                                 "e.g. sweep.validate.evals={eqbench: {questions: held_out.json}}, or set sweep.validate.top_k=0")  # fmt: skip
        return DEFAULT_TOP_K, {Field.EQBENCH: {"questions": OFFICIAL, "mode": "generate"}}
    return 0, {}


def check_held_out(sweep_evals: EvalConfig, validation: EvalConfig) -> None:
    """Refuse a validation that asks any question the sweep's own evaluations asked."""
    for name, section in validation.sections.items():
        held = EVALS[name].questions(section) if EVALS[name].questions else set()
        for other, other_section in sweep_evals.sections.items():
            if not held or EVALS[other].questions is None:
                continue
            shared = held & EVALS[other].questions(other_section)
            if shared:
                raise SelfMergeError(f"validation eval {name} shares {len(shared)} of its {len(held)} items with the sweep's "
                                     f"eval.{other} (e.g. {sorted(shared)[0][:60]!r}): validate on held-out items")  # fmt: skip


def configured(config: SweepConfig) -> tuple[int, dict[str, dict]]:
    """(top_k, {eval: settings}) of a sweep's ``sweep.validate``, checked before any trial runs."""
    chosen = config.sweep.validate
    if chosen.top_k == 0:
        return 0, {}
    if chosen.evals is None:
        top_k, evals = default_evals(config.objectives[0][0], config.eval.fingerprint())
    else:
        top_k, evals = DEFAULT_TOP_K, json.loads(json.dumps(chosen.evals))
    top_k = chosen.top_k if chosen.top_k is not None else top_k
    if top_k and not evals:
        raise SelfMergeError(f"sweep.validate.top_k={top_k}: the objective {config.objectives[0][0]} has no held-out "
                             "benchmark by default; name one in sweep.validate.evals")  # fmt: skip
    if top_k:
        check_held_out(config.eval, sections(evals))
    return top_k, evals


def settings_for(study: optuna.Study, top_k: Optional[int] = None, only: Optional[list[str]] = None,
                 overrides: tuple[str, ...] = ()) -> tuple[int, dict[str, dict]]:  # fmt: skip
    """The stored validation of a sweep (or the default for its objective), with a command line's changes:
    ``--top``, ``--only eqbench``, ``eqbench.mode=logits``."""
    import yaml

    stored = study.user_attrs.get(StudyKey.VALIDATION) or {}
    if stored.get("evals"):
        k, evals = stored["top_k"], json.loads(json.dumps(stored["evals"]))
    else:
        objective = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])[0]
        try:
            k, evals = default_evals(objective, study.user_attrs[StudyKey.SCORING]["eval"])
        except SelfMergeError as err:  # a probe of the user's own: the command line may name its held-out set
            if not overrides:
                raise SelfMergeError(f"{err}; or on this command line, e.g. probe.probes=[held_out.jsonl]") from None
            k, evals = DEFAULT_TOP_K, {}
    for override in overrides:
        key, equals, value = override.partition("=")
        name, dot, setting = key.partition(".")
        if not equals or not dot or name not in EVALS:
            raise SelfMergeError(f"{override!r} is not EVAL.KEY=VALUE with EVAL one of {list(EVALS)}")
        evals.setdefault(name, {})[setting] = yaml.safe_load(value)
    if only:
        unknown = [name for name in only if name not in evals]
        if unknown:
            raise SelfMergeError(f"--only {unknown}: this validation runs {list(evals)}")
        evals = {name: evals[name] for name in only}
    return (top_k if top_k is not None else k or DEFAULT_TOP_K), evals


def sections(evals: dict[str, dict], threads: Optional[int] = None) -> EvalConfig:
    """Typed, each refused with its key when wrong, in the registry's order."""
    for name, values in evals.items():
        unknown = sorted(set(values) - set(get_eval(name).config.__dataclass_fields__))
        if unknown:
            raise SelfMergeError(f"sweep.validate.evals.{name}: unknown keys {unknown}")
    return EvalConfig.from_fingerprint(evals, threads)


# -- scoring, resumably -----------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    """Finished items; a last line torn by a kill is dropped (its item is scored again)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def validate_model(evaluations: dict[str, Evaluation], build: Callable[[], Any], folder: Path,
                   base: Optional[dict]) -> dict:  # fmt: skip
    """One model's validated record. Item evaluations write each finished item's row before going on;
    ``build`` makes the model only if something is left to score."""
    if (folder / "record.json").exists():
        return read_json(folder / "record.json")
    folder.mkdir(parents=True, exist_ok=True)
    model, record = None, {}
    for name, evaluation in evaluations.items():
        if not hasattr(evaluation, "score_items"):  # all or nothing (lm-eval)
            model = model if model is not None else build()
            record.update(evaluation.record(model, base))
            continue
        path = folder / f"{name}.items.jsonl"
        rows = {row["item"]: row for row in _rows(path)}
        todo = [item for item in evaluation.item_ids() if item not in rows]
        with open(path, "w" if not rows else "a", encoding="utf-8") as out:
            if rows and path.read_bytes()[-1:] != b"\n":  # a torn last line: rewrite what survived
                out.truncate(0)
                out.write("".join(json.dumps(row) + "\n" for row in rows.values()))
            for start in range(0, len(todo), CHUNK):
                model = model if model is not None else build()
                chunk = todo[start : start + CHUNK]
                for item, row in zip(chunk, evaluation.score_items(model, chunk)):
                    rows[item] = {"item": item, **row}
                    out.write(json.dumps(rows[item]) + "\n")
                out.flush()
                os.fsync(out.fileno())
        ordered = [rows[item] for item in evaluation.item_ids()]
        record.update(evaluation.summarize_items(ordered, base))
    atomic_write_text(folder / "record.json", json.dumps(record))
    return record


def best_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best distinct plans by the sweep's first objective (cache hits are repeats)."""
    name = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])[0]
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    scored = [
        t for t in merged_trials(study) if Field.CACHE_HIT_OF not in t.user_attrs and name in t.user_attrs
    ]
    return sorted(scored, key=lambda t: (sign * t.user_attrs[name], t.number))[:k]


@contextlib.contextmanager
def _validation_lock(directory: Path) -> Iterator[bool]:
    """One validator per sweep: a worker that finds it taken leaves the validation to its holder."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def validate(study: optuna.Study, directory: Path, backend: Backend, top_k: int, evals: dict[str, dict],
             threads: Optional[int] = None, progress: bool = True) -> Optional[pd.DataFrame]:  # fmt: skip
    """Validate the base and the ``top_k`` best plans; the summary frame (None: another worker holds it)."""
    from sweep.trials.scoring import eval_config_from_fingerprint

    validation = sections(evals, threads)
    check_held_out(eval_config_from_fingerprint(study.user_attrs[StudyKey.SCORING]), validation)
    folder = directory / VALIDATION_DIR
    with _validation_lock(folder) as mine:
        if not mine:
            log.info("another worker is validating %s", directory)
            return None
        context = EvalContext(backend.base, backend.open_model)
        evaluations = {
            name: EVALS[name].build(section, context) for name, section in validation.sections.items()
        }
        settings = json.dumps(validation.fingerprint(), sort_keys=True)
        run = folder / hashlib.sha1(settings.encode()).hexdigest()[:10]
        run.mkdir(exist_ok=True)
        atomic_write_text(run / "settings.json", settings)
        base_plan = LayerPlan.identity(study.user_attrs[StudyKey.N_BASE_LAYERS])
        models = [
            ("base", base_plan, None),
            *((t.number, LayerPlan.parse(t.user_attrs[Field.PLAN]), t) for t in best_trials(study, top_k)),
        ]
        records, base = {}, None
        for label, plan, trial in tqdm(models, desc="validate", unit="model", disable=not progress):
            here = run / _slug(plan)
            records[label] = validate_model(
                evaluations, _builder(backend, plan, trial, directory, here), here, base
            )
            (here / "model.gguf").unlink(missing_ok=True)  # built for validation only
            base = base or records[label]
        return write_summary(study, folder, models, records, validation)


def _slug(plan: LayerPlan) -> str:
    return str(plan).replace(",", "_")


def _builder(backend: Backend, plan: LayerPlan, trial, directory: Path, folder: Path) -> Callable[[], Any]:
    """The model of ``plan``: the sweep's kept file when there is one, else built again."""

    def build():
        if trial is None:
            return backend.base
        kept = model_file(directory, trial.number)
        if backend.writes_files and kept.is_file():
            return kept
        if backend.writes_files:
            out = folder / "model.gguf"
            out.unlink(missing_ok=True)
            return backend.build(plan, out)
        return backend.build(plan)

    return build


# -- the verdict --------------------------------------------------------------------------------
def write_summary(
    study: optuna.Study, folder: Path, models: list, records: dict, validation: EvalConfig
) -> pd.DataFrame:
    objective = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])[0]
    base_record = study.user_attrs.get(StudyKey.BASE, {})
    names = list(validation.sections)
    rows = []
    for label, plan, trial in models:
        scored = base_record if trial is None else trial.user_attrs
        rows.append({"trial": label, Field.PLAN: str(plan), objective: scored.get(objective),
                     **{Field.VALIDATED + name: records[label].get(name) for name in names}})  # fmt: skip
    frame = pd.DataFrame(rows)
    first = Field.VALIDATED + names[0]
    descending = EVALS[names[0]].direction(validation.sections[names[0]]) == "maximize"
    frame[Field.FINAL_RANK] = frame[first].rank(ascending=not descending, method="min").astype("Int64")
    frame = frame.sort_values(Field.FINAL_RANK, kind="stable").reset_index(
        drop=True
    )  # ties: the sweep's order
    rho = spearman(frame[objective], frame[first])
    verdict = transfer_verdict(objective, first, rho, frame)
    for name in names:  # evaluations with a paired difference to the base: Holm's verdict over the plans
        if EVALS[name].paired:
            frame, said = _versus_base(frame, name, models, records)
            verdict += f". {name} on held-out items: {said}"
    summary = {"objective": objective, "validated": names, "settings": validation.fingerprint(), "spearman": rho, "verdict": verdict,
               "models": frame.astype(object).where(frame.notna(), None).to_dict("records")}  # fmt: skip
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(folder / "summary.csv", frame.to_csv(index=False))
    log.info("%s", verdict)
    return frame


def _versus_base(frame: pd.DataFrame, name: str, models: list, records: dict) -> tuple[pd.DataFrame, str]:
    """Columns of each plan's paired difference to the base on ``name`` (difference, 95% interval,
    Holm-corrected p, beats the base) and the sentence saying which plans beat it, if any."""
    fields = EVALS[name].paired
    plans = [(label, plan) for label, plan, trial in models
             if trial is not None and fields[0] in records[label]]  # fmt: skip
    differences = [_paired(records[label], fields) for label, _ in plans]
    beats, said = stats_verdict([str(plan) for _, plan in plans], differences)
    values = {label: {"diff": d.diff, "low": d.low, "high": d.high, "p_holm": p, "beats_base": b}
              for (label, _), d, p, b in zip(plans, differences, holm([d.p_value for d in differences]), beats)}
    for column in ("diff", "low", "high", "p_holm", "beats_base"):
        frame[f"{Field.VALIDATED}{name}_{column}"] = [values.get(label, {}).get(column) for label in frame["trial"]]
    return frame, said


def _paired(record: dict, fields: tuple[str, ...]) -> PairedDifference:
    diff, low, high, p_value, n, detectable = (record[f] for f in fields)
    return PairedDifference(n=n, diff=diff, low=low, high=high, p_value=p_value, detectable=detectable, test="")


def spearman(a, b) -> float:
    """Rank correlation (ties share their mean rank); NaN under three points or for a constant score."""
    a, b = (pd.to_numeric(pd.Series(list(x)), errors="coerce") for x in (a, b))
    both = a.notna() & b.notna()
    a, b = a[both].rank(), b[both].rank()
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def transfer_verdict(objective: str, validated: str, rho: float, frame: pd.DataFrame) -> str:
    """In plain words: did the sweep's ranking carry over to the held-out benchmark?"""
    n = len(frame)
    if rho != rho:  # NaN: fewer than three models, or a constant score
        return f"{validated}: too few distinct scores among {n} models to say whether {objective} transferred"
    word = "carried over to" if rho >= TRANSFERS else "did NOT carry over to"
    best = frame.iloc[0]
    base = frame[frame["trial"] == "base"]
    beats = (
        not base.empty and best["trial"] != "base" and best[Field.FINAL_RANK] < base[Field.FINAL_RANK].iloc[0]
    )
    return (f"the {objective} ranking {word} the held-out benchmark: Spearman {rho:.2f} with {validated} over {n} models; "
            f"best validated: {best[Field.PLAN]} ({'ranks above' if beats else 'does not rank above'} the base; "
            "a rank is not a significant gain)")  # fmt: skip
