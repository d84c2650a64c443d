"""Run a sweep: score the base model once, then ask Optuna for plans until a budget ends.

Each trial, in a child process (sweep/isolation.py) for the llama.cpp backend, in this process for
the torch one: plan from the space -> the backend builds it (a merged GGUF, or an in-memory model)
-> early perplexity on a few windows (pruned there when hopeless) -> full perplexity -> EQ-Bench; then
attributes in the study and the leaderboard rewritten. A plan already scored is not merged again
(cache hit). A trial whose merge or evaluation fails, hangs past trial.timeout or dies is
recorded as failed with its reason and the sweep goes on. Ctrl-C stops after the running trial.

Several workers may run the same sweep through a shared storage (PostgreSQL, a journal file):
a plan another worker is evaluating is waited for (sweep/twins.py), a dead worker's trial is
failed by the heartbeat and retried once (Optuna's, or sweep/heartbeat.py for a journal file).

The base model's score is kept beside the trials (a study attribute), not as a trial: a trial
without parameters would break the samplers that model a fixed search space (CMA-ES, NSGA-II).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import read_mergekit_yaml
from sweep.backends import make_backend
from sweep.config import SweepConfig
from sweep.records import model_file, models_dir, write_leaderboard, write_trial_record
from sweep.isolation import TrialCrashed, run_isolated
from sweep.pruning import EARLY_STEP, BaseRatioPruner, beyond
from sweep.samplers import make_sampler
from sweep.scoring import TrialScorer, scoring_fingerprint
from sweep.trial_work import TrialWork, merge_record
from sweep.spaces import SearchSpace, build_space
from sweep.heartbeat import TrialHeartbeat, fail_stale_trials
from sweep.twins import TwinPlans
from sweep.study import SweepLock, is_journal, open_study, retry_orphaned_trials

log = logging.getLogger("selfmerge")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialFailed(Exception):
    """A trial's merge or evaluation failed; the sweep records it and goes on."""


def _differences(stored, wanted, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix.rstrip('.')} was {stored}, now {wanted}"]


class Sweep:
    """``work_type`` is what runs a trial (TrialWork: merge, then score); tests swap in faulty ones."""

    def __init__(self, config: SweepConfig, work_type: type[TrialWork] = TrialWork) -> None:
        self.config = config
        self.work_type = work_type
        self._stopping = False
        self.base: dict = {}  # the base model's record, once scored
        ratio = config.prune.max_ppl_ratio
        self.pruner = BaseRatioPruner(ratio) if ratio else None
        self.directory = config.sweep.directory
        self.journal = is_journal(config.storage_url)
        self.twins = TwinPlans(self._fail_stale, config.storage.heartbeat_seconds)
        self.backend = make_backend(config.model.path, config.backend, self.directory)
        self.shape = self.backend.shape
        self.space: SearchSpace = build_space(config.space_kind, self.shape, config.space)
        self.enqueue = [self._plan_to_enqueue(entry) for entry in config.sweep.enqueue]
        self.sampler = make_sampler(config.sampler.kind, self.space, config.sweep.seed, config.sampler.n_startup_trials)

    # -- study set-up -----------------------------------------------------------------------
    def _open(self) -> optuna.Study:
        study = open_study(self.config, self.sampler, self.pruner)
        fingerprint = scoring_fingerprint(self.config, self.backend.source)
        stored = study.user_attrs.get("scoring")
        if stored is None:  # "scoring" last: a worker joining at this moment reads it as "all written"
            study.set_user_attr("model_hf_id", self.config.model.hf_id)
            study.set_user_attr("n_base_layers", self.shape.n_layers)
            study.set_user_attr("objectives", self.config.objective_names)
            study.set_user_attr("scoring", fingerprint)
        elif stored != fingerprint:
            changes = "; ".join(_differences(stored, fingerprint))
            raise SelfMergeError(f"sweep {self.config.sweep.name!r} cannot resume with other scoring ({changes}): use another sweep.name")
        objectives = study.user_attrs["objectives"]
        if objectives != self.config.objective_names:
            raise SelfMergeError(f"sweep {self.config.sweep.name!r} optimises {objectives}, not {self.config.objective_names}: use another sweep.name")
        return study

    def _plan_to_enqueue(self, entry: str) -> tuple[LayerPlan, dict[str, int]]:
        """A plan from text or a mergekit YAML, checked against the model, the rules and the space."""
        plan = read_mergekit_yaml(entry)[0] if entry.endswith((".yml", ".yaml")) else LayerPlan.parse(entry)
        plan.validate(self.shape.n_layers)
        problems = self.space.constraints.violations(plan, self.shape)
        if problems:
            raise SelfMergeError(f"sweep.enqueue: plan {plan} breaks the space's rules: {'; '.join(problems)}")
        params = self.space.params_for(plan)
        if params is None:
            raise SelfMergeError(f"sweep.enqueue: plan {plan} is not in space '{self.config.space_kind}' (space=free holds any chain of slices)")
        return plan, params

    def _enqueue(self, study: optuna.Study) -> None:
        for plan, params in self.enqueue:
            study.enqueue_trial(params, user_attrs={"enqueued": str(plan)}, skip_if_exists=True)
        if self.config.space_prior == "importance" and not study.user_attrs.get("prior_enqueued"):
            from sweep.prior import importance_for, prior_plans

            ppl = self.config.eval.ppl
            text, n_ctx = (ppl.text, ppl.n_ctx) if ppl else ("stdlib-docstrings", 512)
            importance = importance_for(self.directory, self.config.model.path, text, n_ctx)
            n = self.config.sampler.n_startup_trials or 5
            for rank, (plan, params) in enumerate(prior_plans(self.space, importance, n), 1):
                study.enqueue_trial(params, user_attrs={"prior_rank": rank, "prior_cost": importance.plan_cost(plan)}, skip_if_exists=True)
            study.set_user_attr("prior_enqueued", True)

    def _base(self, study: optuna.Study, score: TrialScorer) -> dict:
        """Scored in the sweep's own process: if the base cannot be evaluated, no trial can."""
        if "base" in study.user_attrs:
            return study.user_attrs["base"]
        plan = LayerPlan.identity(self.shape.n_layers)
        log.info("base model %s (%d layers): scoring %s", self.backend.source.name, self.shape.n_layers, "+".join(self.config.eval.kinds))
        try:
            scores = score(self.backend.base, progress=self.config.sweep.progress)
        except Exception as err:
            raise SelfMergeError(f"the base model could not be evaluated: {err}") from None
        base = {**merge_record(plan, 0.0, self.backend.n_bytes(self.backend.base)), **scores}
        study.set_user_attr("base", base)
        return base

    # -- one trial --------------------------------------------------------------------------
    def _values(self, record: dict) -> list[float]:
        return [float(record[name]) for name in self.config.objective_names]

    def _should_prune(self, trial: optuna.Trial, early_ppl: float) -> bool:
        base_early = self.base.get("ppl_early")
        if not self.config.prune.max_ppl_ratio or base_early is None:
            return False
        trial.set_user_attr("ppl_early", early_ppl)
        if len(self.config.objectives) == 1:  # Optuna reports intermediate values for one objective only
            trial.report(early_ppl if math.isfinite(early_ppl) else 1e30, EARLY_STEP)
            return trial.should_prune()
        return beyond(early_ppl, base_early, self.config.prune.max_ppl_ratio)

    def _pruned(self, trial: optuna.Trial, early_ppl: float) -> optuna.TrialPruned:
        ratio = self.base["ppl_early"] * self.config.prune.max_ppl_ratio
        return optuna.TrialPruned(f"early ppl {early_ppl:.4g} > {ratio:.4g} ({self.config.prune.max_ppl_ratio} x the base's)")

    def _run_work(self, trial: optuna.Trial, work: TrialWork, plan: LayerPlan, path) -> dict:
        limits = self.config.trial
        if not (limits.isolate and self.backend.isolatable):
            return work(plan, path, lambda early: self._should_prune(trial, early))
        timeout = limits.timeout_seconds(sum(self.base.get(k, 0) for k in ("eval_seconds", "eqbench_seconds", "lm_eval_seconds")))
        record, peak_mb = run_isolated(work, (plan, path), lambda early: self._should_prune(trial, early), timeout, limits.max_memory_bytes)
        return {**record, "peak_rss_mb": round(peak_mb)}

    def _fail_stale(self, study: optuna.Study) -> None:
        """Fail (and retry once) trials whose worker died: Optuna's heartbeat for RDB storages, ours
        for a journal file."""
        if self.journal:
            fail_stale_trials(study, 2 * self.config.storage.heartbeat_seconds)
        else:
            optuna.storages.fail_stale_trials(study)

    def _objective(self, work: TrialWork):
        def objective(trial: optuna.Trial):
            if not self.journal:
                return evaluate(trial)
            self._fail_stale(trial.study)
            beat = TrialHeartbeat(trial.study, trial._trial_id, self.config.storage.heartbeat_seconds)
            try:
                return evaluate(trial)
            finally:
                beat.stop()

        def evaluate(trial: optuna.Trial):
            plan = self.space.suggest(trial)
            for key, value in {**self.space.derived(plan), "plan": str(plan), "n_layers": plan.n_layers, "worker": WORKER}.items():
                trial.set_user_attr(key, value)
            earlier = (  # scored before; being scored by another worker; or scored between those two reads
                self._scored_plan(trial.study, str(plan)) or self.twins.result_for(trial, str(plan)) or self._scored_plan(trial.study, str(plan))
            )
            if earlier is not None:
                for key, value in earlier.user_attrs.items():
                    if key not in ("claim", "worker"):
                        trial.set_user_attr(key, value)
                trial.set_user_attr("cache_hit_of", earlier.user_attrs.get("cache_hit_of", earlier.number))
                for key in ("eval_seconds", "eqbench_seconds", "lm_eval_seconds", "merge_seconds"):
                    if key in earlier.user_attrs:
                        trial.set_user_attr(key, 0.0)
                if earlier.state == TrialState.PRUNED:
                    self._should_prune(trial, earlier.user_attrs["ppl_early"])
                    raise self._pruned(trial, earlier.user_attrs["ppl_early"])
                return earlier.values
            path = model_file(self.directory, trial.number)
            try:
                self._make_room(plan, trial.study)
                record = self._run_work(trial, work, plan, path)
            except Exception as err:
                path.unlink(missing_ok=True)
                reason = str(err) if isinstance(err, TrialCrashed) else f"{type(err).__name__}: {err}"
                trial.set_user_attr("error", reason)
                raise TrialFailed(reason) from err
            for key, value in record.items():
                if key != "worker":  # the child process's; WORKER names the sweep process
                    trial.set_user_attr(key, value)
            if path.exists():  # which worker (machine) holds the file, as long as it is kept
                trial.set_user_attr("model_path", str(path.resolve()))
            if record.get("pruned"):
                path.unlink(missing_ok=True)
                raise self._pruned(trial, record["ppl_early"])
            return self._values(record)

        return objective

    @staticmethod
    def _scored_plan(study: optuna.Study, plan: str) -> FrozenTrial | None:
        """An earlier trial that scored (or pruned) this plan itself."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if trial.user_attrs.get("plan") == plan and "cache_hit_of" not in trial.user_attrs:
                return trial
        return None

    # -- bookkeeping after each trial -------------------------------------------------------
    def _rank_key(self, trial: FrozenTrial) -> float:
        """Best first by the first objective."""
        name, direction = self.config.objectives[0]
        return trial.user_attrs[name] if direction == "minimize" else -trial.user_attrs[name]

    def _ranked_files(self, trials: list[FrozenTrial]) -> list:
        """The merged files of completed trials, best first."""
        scored = (t for t in trials if t.state == TrialState.COMPLETE and "cache_hit_of" not in t.user_attrs)
        return [model_file(self.directory, t.number) for t in sorted(scored, key=self._rank_key)]

    def _finished_files(self, trials: list[FrozenTrial]) -> set:
        """Files of finished trials: another worker's running trial may be writing or reading its own."""
        return {model_file(self.directory, t.number) for t in trials if t.state.is_finished()}

    def _keep_top_k(self, trials: list[FrozenTrial]) -> None:
        keep = set(self._ranked_files(trials)[: self.config.sweep.keep_top_k])
        finished = self._finished_files(trials)
        for path in models_dir(self.directory).glob("trial_*.gguf"):
            if path not in keep and path in finished:
                path.unlink(missing_ok=True)

    def _make_room(self, plan: LayerPlan, study: optuna.Study) -> None:
        """Under sweep.disk_budget, delete kept files, worst first, until the next merge fits."""
        budget = self.config.sweep.disk_budget_bytes
        if budget is None:
            return
        needed = self.backend.size_bound(plan)
        if needed > budget:
            raise SelfMergeError(f"plan {plan} makes a {needed / 2**20:.0f} MiB file, more than sweep.disk_budget={self.config.sweep.disk_budget}")
        trials = study.get_trials(deepcopy=False)
        files = [p for p in reversed(self._ranked_files(trials)) if p.exists()]
        finished = self._finished_files(trials)
        files += [p for p in models_dir(self.directory).glob("trial_*.gguf") if p not in files and p in finished]  # strays first
        used = sum(p.stat().st_size for p in models_dir(self.directory).glob("*.gguf*"))
        while used + needed > budget and files:
            victim = files.pop()
            used -= victim.stat().st_size
            victim.unlink()
            log.info("disk budget: deleted %s to make room", victim.name)

    @staticmethod
    def _n_done(trials: list[FrozenTrial]) -> int:
        """Trials finished, not counting failures that were retried."""
        retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        return sum(1 for t in trials if t.state in FINISHED and not (t.state == TrialState.FAIL and t.number in retried))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        run = self.config.sweep
        lock = SweepLock.for_url(self.config.storage_url)
        try:
            study = self._open()
            if lock is not None and lock.alone():
                orphans = retry_orphaned_trials(study)
                for trial in study.get_trials(deepcopy=False):
                    if trial.number in orphans:
                        log.warning("trial %d was running when its sweep died: marked failed, retried once", trial.number)
                        write_trial_record(self.directory, trial)
            budget = self.config.sweep.disk_budget_bytes
            base_size = self.backend.size_bound(LayerPlan.identity(self.shape.n_layers))
            if budget is not None and budget < base_size:
                raise SelfMergeError(f"sweep.disk_budget={self.config.sweep.disk_budget} is smaller than one merged file ({base_size / 2**20:.0f} MiB or more)")
            if self.config.trial.isolate and not self.backend.isolatable:
                log.info("backend=%s: trials run in this process; trial.timeout and trial.max_memory do not apply", self.config.backend.kind)
            prune = self.config.prune
            early_windows = prune.early_windows if prune.max_ppl_ratio and self.config.eval.ppl else 0
            score = TrialScorer(self.config.eval, self.backend.base, early_windows, self.backend.open_model)
            self.base = self._base(study, score)
            if self.pruner is not None:
                self.pruner.base_early_ppl = self.base.get("ppl_early")
            self._enqueue(study)
            write_leaderboard(study, self.directory)
            done = self._n_done(study.get_trials(deepcopy=False))
            if done >= run.n_trials:
                log.info("sweep %s already has %d trials: nothing to do", run.name, done)
                return study
            self._optimize(study, self.work_type(self.backend, score, self.base), done)
            return study
        finally:
            if lock is not None:
                lock.close()

    def _on_ctrl_c(self, signum, frame) -> None:
        if self._stopping:
            raise KeyboardInterrupt
        self._stopping = True
        log.warning("Ctrl-C: the sweep stops once the running trial is saved (Ctrl-C again to abort it)")

    def _optimize(self, study: optuna.Study, work: TrialWork, done: int) -> None:
        run = self.config.sweep
        timeout = run.timeout_seconds
        started = time.monotonic()
        bar = tqdm(total=run.n_trials, initial=done, desc=f"sweep {run.name}", unit="trial", disable=not run.progress, dynamic_ncols=True)

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            write_trial_record(self.directory, trial)
            if self.journal:  # before the next ask, so a retry of a dead worker's trial is taken next
                self._fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            self._keep_top_k(trials)
            write_leaderboard(study, self.directory)
            n_done = self._n_done(trials)
            bar.n = n_done
            scored = [t for t in trials if t.state == TrialState.COMPLETE]
            failed = sum(t.state == TrialState.FAIL for t in trials)
            pruned = sum(t.state == TrialState.PRUNED for t in trials)
            first = self.config.objective_names[0]
            best = min(scored, key=self._rank_key).user_attrs[first] if scored else None
            postfix = {f"best_{first}": f"{best:.3f}" if best is not None else "-", "base": f"{self.base.get(first, float('nan')):.3f}", "pruned": pruned, "failed": failed}
            if timeout:
                postfix["time_left"] = f"{max(0.0, timeout - (time.monotonic() - started)) / 60:.0f}m"
            bar.set_postfix(postfix)
            bar.refresh()
            outcome = trial.state.name.lower()
            if trial.state == TrialState.COMPLETE:
                scores = " ".join(f"{k}={trial.user_attrs[k]:.3f}" for k in ("ppl", "eqbench", "lm_eval") if k in trial.user_attrs)
                outcome += f" {scores}" + (" (cache hit)" if "cache_hit_of" in trial.user_attrs else "")
            elif trial.state == TrialState.PRUNED:
                outcome += f" at early ppl={trial.user_attrs.get('ppl_early', float('nan')):.4g}"
            elif "error" in trial.user_attrs:
                outcome += f" ({trial.user_attrs['error']})"
            log.info("trial %d %s: %s", trial.number, trial.user_attrs.get("plan"), outcome)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # e.g. a dead worker's trial, retried
            if (n_done >= run.n_trials and not waiting) or self._stopping:
                study.stop()

        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_ctrl_c) if in_main else None
        try:
            study.optimize(self._objective(work), timeout=timeout, callbacks=[after_trial], catch=(TrialFailed,), gc_after_trial=False)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
            bar.close()
