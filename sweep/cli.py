"""The ``selfmerge`` command: sweep, leaderboard, report, reproduce, validate, plans, analyze, merge, eval,
eqbench.

Bad input prints one line, ``selfmerge: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from evals.schema import Field
from merge_core.errors import SelfMergeError

USAGE_ERROR = 2


def _fail(message: str) -> None:
    """One line, whatever the message (a YAML or database error spans several)."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"selfmerge: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _quiet_optuna() -> None:
    """Our log says what each trial did; Optuna's own lines and experimental-API notes are noise here."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# -- sweep ------------------------------------------------------------------------------------
def cmd_sweep(overrides: list[str]) -> None:
    """A Hydra app, so multirun and launchers (-m hydra/launcher=joblib) work as in any Hydra app.
    ``sweep.workers`` / ``sweep.gpus`` start one worker process each here (sweep/trials/workers.py); when
    they have ended this process validates (sweep.validate) and prints the leaderboard once."""
    import hydra

    from sweep.trials import workers
    from sweep.config import CONF_DIR, compose, load_config

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        config, job = _checked(load_config, cfg), HydraConfig.get()
        multirun = job.mode == RunMode.MULTIRUN
        if config.sweep.worker is None and multirun:  # -m: job i is worker i
            config = _with_worker(config, job.job.num)
        # one of the workers `_launch` started: it validates and prints the leaderboard once they have ended
        _run_sweep(config, fresh=fresh, quiet=config.sweep.worker is not None and not multirun)

    overrides = [_storage_alias(o) for o in overrides]
    fresh = None  # the sweep's folder, when this run creates it (removed again if the sweep is refused)
    if not {"-m", "--multirun"} & set(overrides):  # a multirun's sweep values (a=1,2) are checked per job
        # check overrides and values first: Hydra reports over several lines, and makes the run folder
        config = _checked(lambda: load_config(compose([o for o in overrides if not o.startswith("-")])))
        directory, run = config.sweep.directory, config.sweep
        groups = _checked(workers.groups, run)
        fresh = None if directory.exists() else directory
        try:  # made here, so an unusable results_dir is one line, not Hydra's traceback
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _fail(f"cannot create the sweep folder {directory} (sweep.results_dir): {err.strerror}")
        if run.worker is None and workers.n_workers(run.workers, groups) > 1:
            return _launch(config, overrides, workers.n_workers(run.workers, groups), groups, fresh)
    flags = [o for o in overrides if o in ("-m", "--multirun")]  # Hydra reads flags before overrides only
    sys.argv = ["selfmerge", *flags, *[o for o in overrides if o not in flags]]
    if flags:  # Hydra prints a launcher's error with its traceback; raised, it is ours to say in one line
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except SystemExit as exit_:
        # Hydra reports a bad override or config on one line and exits 1: that is bad input.
        sys.exit(USAGE_ERROR if exit_.code == 1 else exit_.code)
    except Exception as err:  # a multirun's: a bad override, or a job that did not finish (killed, lost)
        from hydra.errors import HydraException

        if isinstance(err, HydraException):
            _fail(str(err))
        cause = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        print(f"selfmerge: error: a job of this multirun did not finish ({cause}); the study keeps what every "
              "job finished: rerun the same command to resume", file=sys.stderr)  # fmt: skip
        sys.exit(1)


def _launch(config, overrides: list[str], count: int, groups: list[tuple[int, ...]], fresh: Path | None) -> None:
    """The workers of ``sweep.workers``/``sweep.gpus``; once all have ended, validation and the
    leaderboard, once. Exits with the first failed worker's status (0 if none failed)."""
    from sweep.trials import workers

    on = f", GPUs {' | '.join(','.join(map(str, g)) for g in groups)}" if groups else ""
    print(f"selfmerge: {count} workers on sweep {config.sweep.name}{on}", file=sys.stderr)
    statuses = workers.launch(overrides, count, split_cores=not groups)
    status = workers.exit_status(statuses)
    if all(statuses.values()):  # none got anywhere (each said why): nothing to show
        if fresh is not None and not (fresh / "study.json").exists():  # no base scored: no sweep started
            shutil.rmtree(fresh, ignore_errors=True)
        sys.exit(status)
    for worker, code in statuses.items():
        if code != 0:
            how = f"was killed (signal {-code})" if code < 0 else f"exited with status {code}"
            print(f"selfmerge: worker {worker} {how}; the study keeps what all workers finished", file=sys.stderr)
    _run_sweep(_with_worker(config, 0), fresh=None, search=False)
    sys.exit(status)


def _checked(function, *args):
    """``function(*args)``, a SelfMergeError printed as one line (exit 2)."""
    try:
        return function(*args)
    except SelfMergeError as err:
        _fail(str(err))


def _with_worker(config, worker: int):
    import dataclasses

    run = dataclasses.replace(config.sweep, worker=worker, progress=config.sweep.progress and worker == 0)
    return dataclasses.replace(config, sweep=run)


def _run_sweep(config, fresh: Path | None, quiet: bool = False, search: bool = True) -> None:
    """One worker's sweep (``search``), then validation and the leaderboard unless ``quiet`` (a worker
    ``cmd_sweep`` started: it does them once they are all done, with ``search`` off; the model is
    loaded then only if there is something to validate)."""
    from sweep.results import validation
    from sweep.results.records import leaderboard_frame
    from sweep.trials.runner import StopSweep, Sweep
    from sweep.study.open import load_study

    _quiet_optuna()
    sweep = None
    try:
        if search:
            sweep = Sweep(config)
            study = sweep.run()
        else:
            study = load_study(config.storage_url, config.sweep.name)
            sweep = Sweep(config) if validation.configured(config)[0] else None
        if not quiet:
            if sweep is not None:
                sweep.validate(study)
            print_leaderboard(leaderboard_frame(study, config.sweep.directory), top=10)
            print(f"leaderboard: {config.sweep.directory / 'leaderboard.csv'}")
    except SelfMergeError as err:
        if fresh is not None and (sweep is None or not sweep.started):  # refused: leave no folder behind
            shutil.rmtree(fresh, ignore_errors=True)
        _fail(str(err))
    except StopSweep as stop:  # a stop is reported as every error is, with its own exit status
        print(f"selfmerge: error: {stop.message}", file=sys.stderr)
        sys.exit(stop.status)
    except KeyboardInterrupt:
        print("selfmerge: interrupted; finished trials are saved, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _storage_alias(override: str) -> str:
    """``storage=postgresql://u@h/db`` or ``storage=journal:/x.log`` means ``storage.url=...``
    (``storage=sqlite`` still picks the config group)."""
    key, _, value = override.partition("=")
    if key == "storage" and ("://" in value or value.startswith("journal:")):
        return f"storage.url={value}"
    return override


# -- leaderboard / reproduce ------------------------------------------------------------------
def print_leaderboard(frame, top: int = 10) -> None:
    import pandas as pd

    from evals.registry import EVALS
    from sweep.results.records import distinct_plans

    scores = [c for spec in EVALS.values() for c in spec.columns if c != Field.PPL_EARLY]  # early ppl: a pruning aid
    validated = [c for c in frame if c.startswith(Field.VALIDATED) or c == Field.FINAL_RANK]
    columns = ["rank", "trial", Field.PLAN, Field.N_LAYERS, *scores, *validated, Field.EVAL_SECONDS, "state", "pareto"]
    columns = [c for c in columns if c in ("rank", "trial", Field.PLAN, "state") or (c in frame and frame[c].notna().any())]
    distinct = distinct_plans(frame)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        print(distinct[columns].head(top).to_string(index=False) if not frame.empty else "(no finished trials yet)")


def _open_results(directory: str, storage: str | None):
    from sweep.study.open import load_study

    path = Path(directory)
    url = storage or f"sqlite:///{path / 'study.db'}"
    if storage is None and not (path / "study.db").is_file():
        raise SelfMergeError(f"{path} holds no sweep (no study.db); pass --storage URL for a remote study")
    return path, load_study(url, path.name)


def cmd_leaderboard(args) -> None:
    from sweep.results.records import leaderboard_frame

    path, study = _open_results(args.results, args.storage)
    print_leaderboard(leaderboard_frame(study, path), top=args.top)


def cmd_rebuild(args) -> None:
    from sweep.study.rebuild import MISSING, rebuild_study

    _quiet_optuna()
    study, aside = rebuild_study(Path(args.results), args.storage)
    lost = sum(t.system_attrs.get(Field.FAIL_REASON) == MISSING for t in study.trials)
    print(f"rebuilt sweep {study.study_name!r}: {len(study.trials)} trials ({lost} without a record)"
          + (f"; the damaged file is kept as {aside}" if aside else ""))  # fmt: skip


def cmd_report(args) -> None:
    from sweep.results.report import write_report

    path, study = _open_results(args.results, args.storage)
    out = write_report(study, path)
    print(f"report: {out}")


def cmd_reproduce(args) -> None:
    from sweep.results.reproduce import reproduce

    path, study = _open_results(args.results, args.storage)
    formats = args.format.split(",") if args.format else None
    reproduce(study, path, trial_number=None if args.best else args.trial, out_dir=Path(args.out), threads=args.threads, formats=formats)


def cmd_validate(args, overrides: list[str]) -> None:
    from sweep.results.records import VALIDATION_DIR, write_leaderboard
    from sweep.results.reproduce import sweep_backend
    from sweep.results.validation import settings_for, validate

    _quiet_optuna()
    path, study = _open_results(args.results, args.storage)
    only = args.only.split(",") if args.only else None
    top_k, evals = settings_for(study, args.top, only, tuple(overrides))
    if not top_k or not evals:
        raise SelfMergeError("nothing to validate: pass --top K and the held-out benchmark, e.g. eqbench.questions=FILE")
    frame = validate(study, path, sweep_backend(study, path)[2], top_k, evals, args.threads)
    if frame is None:
        raise SelfMergeError(f"another process is validating {path} now")
    write_leaderboard(study, path)
    print(frame.to_string(index=False))
    print(json.loads((path / VALIDATION_DIR / "summary.json").read_text())["verdict"])


# -- plans / merge / eval ---------------------------------------------------------------------
def cmd_plans(args, overrides: list[str]) -> None:
    from merge_core.model_files import resolve_model_source
    from merge_core.model_shape import ModelShape
    from sweep.config import compose, load_config
    from sweep.search.spaces import build_space, sample_plans

    _quiet_optuna()
    config = load_config(compose(overrides))
    sources = tuple(config.model.sources)
    shape = ModelShape.of(resolve_model_source(config.model.sources[sources[0]] if sources else config.model.path))
    space = build_space(config.space_kind, shape, config.space, sources, config.space_scale)
    if args.count:
        count, exact = space.count_plans(limit=args.limit)
        qualifier = "exactly" if exact else "at most (estimate: parameter sets, some giving the same plan)"
        over = f", slices from {len(sources)} sources" if sources else ""
        print(f"{qualifier} {count} valid plans in space '{config.space_kind}' for a {shape.n_layers}-layer model{over}")
    for plan in sample_plans(space, args.sample, seed=args.seed) if args.sample else []:
        print(f"{plan}  ({plan.n_layers} layers)")


def cmd_analyze(args, overrides: list[str]) -> None:
    from sweep.config import compose, load_config
    from sweep.search.prior import analyze

    config = load_config(compose(overrides))
    ppl = config.eval.get(Field.PPL)
    text, n_ctx = (ppl.text, ppl.n_ctx) if ppl else ("stdlib-docstrings", 512)
    importance = analyze(config.model.path, text, n_ctx, args.windows, args.max_block, config.backend.device)
    name = Path(config.model.path.rstrip("/")).stem if config.model.path != "bundled" else "SmolLM2-135M-Instruct"
    csv, png = importance.write(Path(args.out) if args.out else Path(config.sweep.results_dir) / "analysis" / name)
    frame = importance.to_frame()
    print(frame[["layer", "block_influence", "angular_distance_1"]].to_string(index=False, float_format="{:.4f}".format))
    quiet = frame.sort_values("block_influence")["layer"].head(5).tolist()
    print(f"layers that change the hidden state least (block influence): {quiet}")
    print(f"wrote {csv} and {png}")


def _clear_output(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` without --force; with it, a folder goes now (a file is replaced
    atomically once the new one is complete)."""
    if out.exists():
        if not force:
            raise SelfMergeError(f"{out} exists; pass --force to overwrite it")
        if out.is_dir():
            shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)


def cmd_merge(args) -> None:
    import time

    from merge_core.architectures import of_model
    from merge_core.export import default_format, write_plan
    from merge_core.layer_plan import LayerPlan
    from merge_core.mergekit_recipe import recipe_beside
    from merge_core.model_card import CardFacts, base_licence, write_card
    from merge_core.model_files import BUNDLED, resolve_model_source
    from merge_core.model_shape import ModelShape
    from sweep.config import ModelConfig, parse_size

    plan = LayerPlan.parse(args.plan)
    if len(args.model) > 1 or "=" in args.model[0]:
        return _merge_sources(args, plan)
    if args.base:
        raise SelfMergeError(f"--base {args.base} names one of several models (NAME=PATH ...): one was given")
    args.model = args.model[0]
    source = resolve_model_source(args.model)
    out = Path(args.out)
    fmt = args.format or default_format(source, out)
    shard_bytes = parse_size(args.out_shard_size, "--out-shard-size")
    _clear_output(out, args.force)
    start = time.perf_counter()
    model_name = args.hf_id or (ModelConfig.hf_id if args.model == BUNDLED else str(source))
    write_plan(source, plan, out, fmt, model_name, quant=args.quant, shard_bytes=shard_bytes, progress=True)
    if fmt == "gguf":
        out.with_suffix(".mergekit.yml").write_text(recipe_beside(plan, model_name, arch=of_model(source)))
    if fmt != "mergekit":  # a model file or folder gets its model card, as mergekit writes one
        command = f"selfmerge merge {args.model} --plan {plan} --out {out.name}" + (f" --quant {args.quant}" if args.quant else "")
        facts = CardFacts(model_name, plan, ModelShape.of(source), base_licence(source), reproduce=(command,),
                          arch=of_model(source))  # fmt: skip
        print(f"model card: {write_card(out, facts)}")
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({fmt}, {plan.n_layers} layers, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f} s")


def _merge_sources(args, plan) -> None:
    """``selfmerge merge a=A.gguf b=B.gguf --plan a:0-24,b:8-32``: a frankenmerge of several models,
    written as a GGUF (blocks from each slice's file), a safetensors folder (from HF folders) or a
    mergekit recipe, with its model card."""
    from merge_core.gguf_merge import merge_gguf
    from merge_core.architectures import of_model
    from merge_core.mergekit_recipe import plan_to_mergekit_yaml, recipe_beside
    from merge_core.model_card import CardFacts, base_licence, write_card
    from merge_core.model_files import is_gguf, resolve_model_source
    from merge_core.model_shape import ModelShape
    from merge_core.safetensors_merge import merge_safetensors
    from merge_core.sources import used_sources
    from sweep.config import parse_size

    pairs = [item.partition("=") for item in args.model]
    if any(not name or not path for name, _, path in pairs):
        raise SelfMergeError(
            f"several models are given as NAME=PATH, each named in --plan (a:0-24,b:8-32): got {args.model}"
        )
    given = {name: path for name, _, path in pairs}
    sources = {name: resolve_model_source(path) for name, path in given.items()}
    out = Path(args.out)
    all_gguf = all(map(is_gguf, sources.values()))
    fmt = args.format or ("mergekit" if out.suffix in (".yml", ".yaml") else "gguf" if all_gguf else "safetensors")
    if (fmt == "gguf") != all_gguf and fmt != "mergekit":
        kind = "a GGUF" if fmt == "gguf" else "an HF folder"
        raise SelfMergeError(f"--format {fmt} from several models needs every source {kind}")
    _clear_output(out, args.force)
    base = args.base
    arch = of_model(next(iter(sources.values())))
    if fmt == "mergekit":
        out.write_text(plan_to_mergekit_yaml(plan, given, base_source=base, arch=arch))
        print(f"wrote {out} (mergekit recipe over {', '.join(given)})")
        return
    if fmt == "gguf":
        merge_gguf(sources, plan, out, base)
        out.with_suffix(".mergekit.yml").write_text(recipe_beside(plan, given, base_source=base, arch=arch))
    else:
        shard_bytes = parse_size(args.out_shard_size, "--out-shard-size")
        merge_safetensors(sources, plan, out, shard_bytes, given, progress=True, base_source=base)
    first = plan.end_sources(next(iter(given)), base)[0]
    named = tuple((name, given[name], base_licence(sources[name])) for name in used_sources(plan, base))
    command = f"selfmerge merge {' '.join(args.model)} --plan {plan} --out {out.name}"
    command += f" --base {base}" if base else ""
    facts = CardFacts(given[first], plan, ModelShape.of(sources[first]), reproduce=(command,), sources=named,
                      base_source=base, arch=arch)  # fmt: skip
    print(f"model card: {write_card(out, facts)}")
    print(f"wrote {out} ({fmt}, {plan.n_layers} layers from {', '.join(sources)})")


def cmd_eval(args) -> None:
    from evals.ppl_eval import PerplexityEval
    from merge_core.model_files import resolve_model_path
    from merge_core.gguf_file import read_gguf_header

    model = resolve_model_path(args.model)
    read_gguf_header(model)  # a clear error for a file that is no GGUF, before llama.cpp sees it
    evaluate = PerplexityEval(model, args.ppl_text, n_ctx=args.n_ctx, windows=args.windows, threads=args.threads)
    result = evaluate(model, progress=True)
    print(
        f"ppl {result.ppl:.4f}  ({result.n_windows} windows of {result.n_ctx} tokens, {result.n_tokens_scored} scored, "
        f"{result.tokens_per_second:.0f} tok/s, {result.seconds:.1f} s)"
    )


def _print_eqbench(result) -> None:
    print(
        f"EQ-Bench v2 score {result.score:.2f} ({result.used}; first pass {result.first_pass_score:.2f}, "
        f"revised {result.revised_score:.2f}); parse rate {result.parse_rate:.3f} of {result.n_items} items"
    )


def cmd_eqbench(args) -> None:
    if args.eqbench_command == "score":
        return cmd_eqbench_score(args)
    import json
    from dataclasses import asdict

    from evals.eqbench_eval import EQBenchEval
    from merge_core.model_files import resolve_model_path
    from sweep.results.records import atomic_write_text

    model = resolve_model_path(args.model)
    evaluate = EQBenchEval(args.questions, args.n_items, args.seed, args.mode, args.max_tokens, args.logits_score, args.n_ctx, args.threads)
    evaluate.check_fits(model)
    result = evaluate(model, progress=True)
    _print_eqbench(result)
    if args.out:  # one JSON object per item; its id and text are what `selfmerge eqbench score` reads
        lines = [json.dumps({"id": r.id, "text": r.raw_answer, **{k: v for k, v in asdict(r).items() if k not in ("id", "raw_answer")}}) for r in result.records]
        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
        print(f"answers: {args.out}")


def cmd_eqbench_score(args) -> None:
    from evals.eqbench import read_answers_jsonl, score_answers
    from evals.eqbench_items import load_items

    items = load_items(args.questions)
    answers = read_answers_jsonl(args.answers)
    unknown = sorted(set(answers) - {item.id for item in items})
    if unknown:
        raise SelfMergeError(f"{args.answers} answers questions the question file lacks: {unknown[:5]}")
    _print_eqbench(score_answers(items, answers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfmerge", description="Find good self-merges (passthrough frankenmerges) of a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sweep", help="run or resume a sweep: selfmerge sweep [hydra overrides]", add_help=False)

    p = sub.add_parser("leaderboard", help="print the best trials of a sweep")
    p.add_argument("results", help="results/<sweep> folder")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")

    p = sub.add_parser("rebuild", help="make a sweep's study again from its records (a damaged or lost study.db)")
    p.add_argument("results", help="results/<sweep> folder (study.json and trials/*.json)")
    p.add_argument("--storage", help="Optuna storage URL to rebuild into (default: the folder's study.db)")

    p = sub.add_parser("report", help="write report.html and PNG plots into the sweep's folder")
    p.add_argument("results", help="results/<sweep> folder")
    p.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")

    p = sub.add_parser("reproduce", help="rebuild a trial's merged model, re-score it, write it as GGUF / safetensors / mergekit YAML")
    p.add_argument("results", help="results/<sweep> folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true")
    which.add_argument("--trial", type=int)
    p.add_argument("--out", required=True, help="folder for the files written")
    p.add_argument("--format", help="comma-separated: gguf,safetensors,mergekit (default: what the sweep scored + mergekit)")
    p.add_argument("--storage")
    p.add_argument("--threads", type=int)

    p = sub.add_parser("validate", help="score a sweep's best plans and the base again on held-out items [EVAL.KEY=VALUE ...]")
    p.add_argument("results", help="results/<sweep> folder")
    p.add_argument("--top", type=int, help="plans validated (default: the sweep's sweep.validate.top_k, else 5)")
    p.add_argument("--only", help="comma-separated evaluations of the validation to run, e.g. eqbench")
    p.add_argument("--storage")
    p.add_argument("--threads", type=int)

    p = sub.add_parser("plans", help="count or sample the valid plans of a space: selfmerge plans --count [overrides]")
    p.add_argument("--count", action="store_true", help="enumerate the space and print how many distinct plans it has")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print N plans drawn at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=1_000_000, help="stop enumerating past this many plans")

    p = sub.add_parser("analyze", help="layer importance of the base model (angular distance, block influence): CSV + PNG [overrides]")
    p.add_argument("--windows", type=int, default=8, help="calibration windows of eval.ppl.n_ctx tokens from eval.ppl.text")
    p.add_argument("--max-block", type=int, default=8, help="largest block size n for the angular distance")
    p.add_argument("--out", help="folder (default: results/analysis/<model>)")

    p = sub.add_parser("merge", help="merge one plan by hand")
    p.add_argument("model", nargs="+", help="base: a GGUF file, 'bundled', an HF model folder or a hub id; "
                   "several models: NAME=FILE.gguf each, named in --plan")  # fmt: skip
    p.add_argument("--plan", required=True, help="e.g. 0-16,8-30; several models: a:0-24,b:8-32")
    p.add_argument("--out", required=True, help="output GGUF file, safetensors folder or YAML file")
    p.add_argument("--format", choices=["gguf", "safetensors", "mergekit"], help="default: from --out's suffix (.gguf, .yml), else the base's own kind")
    p.add_argument("--quant", help="GGUF from an HF base: llama.cpp type, e.g. Q4_K_M, Q8_0 (default: F16)")
    p.add_argument("--out-shard-size", default="5GB", help="safetensors: largest shard (default 5GB)")
    p.add_argument("--hf-id", help="model id written into the mergekit YAML")
    p.add_argument("--base", metavar="NAME", help="several models: the one every tensor outside the layers "
                   "comes from (embeddings, norm, head, tokenizer; default: the first and last slice's)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite --out")

    p = sub.add_parser("eval", help="perplexity of one model file")
    p.add_argument("model", help="GGUF file, or 'bundled'")
    p.add_argument("--ppl-text", default="stdlib-docstrings", help="text file, stdlib-docstrings, or hf:DATASET:SPLIT:COLUMN")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="windows scored (0 = all)")
    p.add_argument("--threads", type=int)

    p = sub.add_parser(Field.EQBENCH, help="EQ-Bench v2 tools")  # named as the evaluation
    eq = p.add_subparsers(dest="eqbench_command", required=True)
    p = eq.add_parser("run", help="ask a model the questions and score its answers")
    p.add_argument("model", help="GGUF file, or 'bundled'")
    p.add_argument("--questions", default="offline", help="offline (shipped), a v2 question .json/.csv, or hf:OWNER/NAME")
    p.add_argument("--n-items", type=int, default=0, help="a fixed random subset of this many items (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="generate", help="generate (as published) or logits (no generation)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--logits-score", default="expected", help="logits mode: expected or argmax")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="write the answers and per-item scores as JSONL")
    p = eq.add_parser("score", help="score answers produced elsewhere exactly as EQ-Bench v2 does")
    p.add_argument("questions", help="v2 question file (e.g. eq_bench_v2_questions_171.json), or offline")
    p.add_argument("answers", help='JSONL, one {"id": ..., "text": ...} per line')
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["sweep"]:
        return cmd_sweep(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("plans", "analyze", "validate"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "plans" and not (args.count or args.sample):
        parser.error("plans needs --count and/or --sample N")
    try:
        if args.command == "plans":
            cmd_plans(args, extra)
        elif args.command == "analyze":
            cmd_analyze(args, extra)
        elif args.command == "validate":
            cmd_validate(args, extra)
        else:
            commands = {"leaderboard": cmd_leaderboard, "report": cmd_report, "reproduce": cmd_reproduce, "merge": cmd_merge,
                        "eval": cmd_eval, Field.EQBENCH: cmd_eqbench, "rebuild": cmd_rebuild}  # fmt: skip
            commands[args.command](args)
    except SelfMergeError as err:
        _fail(str(err))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        _fail(f"{err.filename}: {err.strerror}" if err.filename else str(err))


if __name__ == "__main__":
    main()
