"""Run a sweep: evaluate the base model as trial 0, then ask Optuna for plans until a budget ends.

Each trial: plan from the space -> GGUF merge -> perplexity -> attributes in the study -> the
leaderboard rewritten. A plan already scored is not merged again (cache hit). A trial whose merge
or evaluation fails is recorded as failed with its reason and the sweep goes on.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evals.ppl_eval import PerplexityEval
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import resolve_model_path
from sweep.config import SweepConfig
from sweep.records import model_file, models_dir, write_leaderboard, write_trial_record
from sweep.space import SearchSpace, build_space
from sweep.study import SweepLock, open_study, retry_orphaned_trials

log = logging.getLogger("selfmerge")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialFailed(Exception):
    """A trial's merge or evaluation failed; the sweep records it and goes on."""


def scoring_fingerprint(config: SweepConfig, base_path: Path) -> dict:
    """What makes two scores comparable; a resumed sweep must match it."""
    ppl = {k: v for k, v in asdict(config.eval.ppl).items() if k != "threads"}  # threads don't change scores
    return {"model": str(base_path), "eval": {"kind": config.eval.kind, "ppl": ppl}}


def _differences(stored, wanted, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix.rstrip('.')} was {stored}, now {wanted}"]


class Sweep:
    def __init__(self, config: SweepConfig) -> None:
        self.config = config
        self.directory = config.sweep.directory
        self.base_path = resolve_model_path(config.model.path)
        self.n_base_layers = read_gguf_header(self.base_path).block_count
        self.space: SearchSpace = build_space(config.space_kind, self.n_base_layers, config.space)

    # -- study set-up -----------------------------------------------------------------------
    def _open(self) -> optuna.Study:
        study = open_study(self.config)
        fingerprint = scoring_fingerprint(self.config, self.base_path)
        stored = study.user_attrs.get("scoring")
        if stored is None:
            study.set_user_attr("scoring", fingerprint)
            study.set_user_attr("model_hf_id", self.config.model.hf_id)
            study.set_user_attr("n_base_layers", self.n_base_layers)
        elif stored != fingerprint:
            changes = "; ".join(_differences(stored, fingerprint))
            raise SelfMergeError(f"sweep {self.config.sweep.name!r} cannot resume with other scoring ({changes}): use another sweep.name")
        return study

    def _base_trial(self, study: optuna.Study, evaluate: PerplexityEval) -> float:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.user_attrs.get("is_base"):
                return trial.value
        with warnings.catch_warnings():  # trial 0 runs outside optimize(): no heartbeat needed
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        trial.set_user_attr("is_base", True)
        plan = LayerPlan.identity(self.n_base_layers)
        log.info("trial %d: base model %s (%d layers)", trial.number, self.base_path.name, self.n_base_layers)
        try:
            result = evaluate(self.base_path, progress=self.config.sweep.progress)
            if not math.isfinite(result.ppl):
                raise ValueError(f"perplexity is {result.ppl}")
        except Exception as err:
            study.tell(trial, state=TrialState.FAIL)
            raise SelfMergeError(f"the base model could not be evaluated: {err}") from None
        self._record(trial, plan, result, merge_seconds=0.0, file_bytes=self.base_path.stat().st_size, base_ppl=result.ppl)
        study.tell(trial, result.ppl)
        return result.ppl

    # -- one trial --------------------------------------------------------------------------
    def _record(self, trial, plan: LayerPlan, result, merge_seconds: float, file_bytes: int, base_ppl: float) -> None:
        attrs = {
            "plan": str(plan),
            "n_layers": plan.n_layers,
            "ppl": result.ppl,
            "ppl_vs_base": result.ppl / base_ppl,
            "tokens_per_second": round(result.tokens_per_second, 1),
            "n_tokens_scored": result.n_tokens_scored,
            "eval_seconds": round(result.seconds, 2),
            "merge_seconds": round(merge_seconds, 3),
            "file_mb": round(file_bytes / 2**20, 1),
            "worker": socket.gethostname(),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    def _objective(self, base_ppl: float, evaluate: PerplexityEval):
        def objective(trial: optuna.Trial) -> float:
            plan = self.space.suggest(trial)
            for key, value in self.space.derived(plan).items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("plan", str(plan))
            trial.set_user_attr("n_layers", plan.n_layers)
            earlier = self._scored_plan(trial.study, str(plan))
            if earlier is not None:
                for key, value in earlier.user_attrs.items():
                    if key not in ("is_base",):
                        trial.set_user_attr(key, value)
                trial.set_user_attr("cache_hit_of", earlier.number)
                trial.set_user_attr("eval_seconds", 0.0)
                trial.set_user_attr("merge_seconds", 0.0)
                return earlier.value
            path = model_file(self.directory, trial.number)
            try:
                start = time.perf_counter()
                merge_gguf(self.base_path, plan, path)
                merge_seconds = time.perf_counter() - start
                result = evaluate(path, progress=False)
                if not math.isfinite(result.ppl):
                    raise ValueError(f"perplexity is {result.ppl}")
                self._record(trial, plan, result, merge_seconds, path.stat().st_size, base_ppl)
            except Exception as err:
                path.unlink(missing_ok=True)
                trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                raise TrialFailed(str(err)) from err
            return result.ppl

        return objective

    @staticmethod
    def _scored_plan(study: optuna.Study, plan: str) -> FrozenTrial | None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.user_attrs.get("plan") == plan and "cache_hit_of" not in trial.user_attrs:
                return trial
        return None

    # -- bookkeeping after each trial -------------------------------------------------------
    def _keep_top_k(self, study: optuna.Study) -> None:
        ranked = sorted(
            (t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("is_base")),
            key=lambda t: t.value,
        )
        keep = {model_file(self.directory, t.number) for t in ranked[: self.config.sweep.keep_top_k]}
        for path in models_dir(self.directory).glob("trial_*.gguf"):
            if path not in keep:
                path.unlink(missing_ok=True)

    def _n_done(self, study: optuna.Study) -> int:
        """Plan trials finished, not counting failures that were retried."""
        trials = study.get_trials(deepcopy=False)
        retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        return sum(
            1
            for t in trials
            if t.state in FINISHED and not t.user_attrs.get("is_base") and not (t.state == TrialState.FAIL and t.number in retried)
        )

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        run = self.config.sweep
        lock = SweepLock(self.directory)
        try:
            study = self._open()
            if lock.alone():
                orphans = retry_orphaned_trials(study)
                for trial in study.get_trials(deepcopy=False):
                    if trial.number in orphans:
                        log.warning("trial %d was running when its sweep died: marked failed, retried once", trial.number)
                        write_trial_record(self.directory, trial)
            evaluate = PerplexityEval.from_config(self.base_path, self.config.eval.ppl)
            base_ppl = self._base_trial(study, evaluate)
            write_leaderboard(study, self.directory)
            done = self._n_done(study)
            if done >= run.n_trials:
                log.info("sweep %s already has %d trials: nothing to do", run.name, done)
                return study
            self._optimize(study, base_ppl, evaluate, done)
            return study
        finally:
            lock.close()

    def _optimize(self, study: optuna.Study, base_ppl: float, evaluate: PerplexityEval, done: int) -> None:
        run = self.config.sweep
        timeout = run.timeout_seconds
        started = time.monotonic()
        bar = tqdm(total=run.n_trials, initial=done, desc=f"sweep {run.name}", unit="trial", disable=not run.progress, dynamic_ncols=True)

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            write_trial_record(self.directory, trial)
            self._keep_top_k(study)
            write_leaderboard(study, self.directory)
            n_done = self._n_done(study)
            bar.n = n_done
            failed = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
            postfix = {"best_ppl": f"{study.best_value:.3f}", "failed": failed}
            if timeout:
                postfix["time_left"] = f"{max(0.0, timeout - (time.monotonic() - started)) / 60:.0f}m"
            bar.set_postfix(postfix)
            bar.refresh()
            status = trial.state.name.lower() + (f" ppl={trial.value:.3f}" if trial.value is not None else "")
            log.info("trial %d %s: %s", trial.number, trial.user_attrs.get("plan"), status + (f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else ""))
            if n_done >= run.n_trials:
                study.stop()

        try:
            study.optimize(
                self._objective(base_ppl, evaluate), timeout=timeout, callbacks=[after_trial], catch=(TrialFailed,), gc_after_trial=False
            )
        finally:
            bar.close()
