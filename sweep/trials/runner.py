"""Run a sweep: score the base model once, then ask Optuna for plans until a budget ends.

One trial (``run_trial``) reads top to bottom: ask the sampler for a plan; reuse a scored plan or
claim it; make room on disk; build and score (in a child process for the llama.cpp backend,
sweep/trials/isolation.py); record. What follows each trial (record file, best files kept, leaderboard,
progress, stop) are callbacks (sweep/trials/callbacks.py). A trial whose merge or evaluation fails, hangs
past trial.timeout or dies is recorded as failed with its reason and the sweep goes on. Ctrl-C
stops after the running trial.

Several workers may run the same sweep through a shared storage (PostgreSQL, a journal file):
a plan another worker is evaluating is waited for (sweep/study/twins.py), a dead worker's trial is
failed by the heartbeat and retried once (Optuna's, or sweep/study/heartbeat.py for a journal file).

The base model's score is kept beside the trials (a study attribute), not as a trial: a trial
without parameters would break the samplers that model a fixed search space (CMA-ES, NSGA-II).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evals.registry import EVALS
from evals.schema import Field, StudyKey
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from sweep.trials import callbacks, workers
from sweep.results import validation
from sweep.trials.backends import Backend, make_backend
from sweep.config import SweepConfig
from sweep.study.heartbeat import fail_stale_trials, trial_heartbeat
from sweep.trials.isolation import TrialCrashed, run_isolated
from sweep.trials.model_store import DiskFull, ModelStore
from sweep.trials.pruning import BaseRatioPruner, EarlyStop, make_pruner, pruned, replay
from sweep.results.records import write_leaderboard, write_study_record, write_trial_record
from sweep.search.samplers import make_sampler
from sweep.trials.scoring import TrialScorer, scoring_fingerprint
from sweep.search.seeding import enqueue, plan_to_enqueue
from sweep.search.spaces import SearchSpace, build_space
from sweep.study.optuna_private import read_trial, set_user_attrs
from sweep.study.retries import retry_once
from sweep.study.open import open_sweep_study, sweep_lock
from sweep.study.retries import retry_orphaned_trials
from sweep.study.storage import is_journal
from sweep.study.index import StudyIndex
from sweep.trials.trial_work import TrialWork, merge_record
from sweep.study.twins import TwinPlans, base_once

log = logging.getLogger("selfmerge")
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialFailed(Exception):
    """A trial's merge or evaluation failed; the sweep records it and goes on."""


class StopSweep(KeyboardInterrupt):
    """Stop the sweep now (SIGTERM, a full disk). Optuna fails the running trial (it does so for a
    KeyboardInterrupt), the sweep enqueues its retry, so a resumed sweep runs it first, and the
    user reads ``message`` on one line; the process exits with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status
        self.trial_number: Optional[int] = None  # the trial it stopped, if one was running


@dataclass
class TrialEnv:
    """What one trial needs, made once per sweep."""

    space: SearchSpace
    store: ModelStore
    twins: TwinPlans
    build_and_score: Callable[[optuna.Trial, LayerPlan], dict]  # plan -> record; raises on failure
    objectives: list[str]
    index: StudyIndex


def run_trial(trial: optuna.Trial, env: TrialEnv) -> list[float]:
    try:
        return _run_trial(trial, env)
    except StopSweep as stop:  # its file goes; the reason stays on the trial, which is retried
        env.store.path(trial.number).unlink(missing_ok=True)
        trial.set_user_attr(Field.ERROR, stop.message)
        stop.trial_number = trial.number
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # not Optuna's "Trial N failed" and its traceback
        raise


def _run_trial(trial: optuna.Trial, env: TrialEnv) -> list[float]:
    # 1. ask the sampler for a plan
    plan = env.space.suggest(trial)
    set_user_attrs(trial, {**env.space.derived(plan), Field.PLAN: str(plan), Field.N_LAYERS: plan.n_layers,
                           Field.WORKER: WORKER})  # fmt: skip

    # 2. reuse a scored plan, or claim it: scored before (the index as of the last trial); being scored
    # by another worker; or finished since (the index brought up to date)
    study, key = trial.study, str(plan)
    earlier = (_scored(key, env.index) or env.twins.result_for(trial, key)
               or _scored(key, env.index.refresh(study)))  # fmt: skip
    if earlier is not None:
        return _reuse(trial, earlier, env)

    # 3. make room on disk, 4. build and score
    path = env.store.path(trial.number)
    try:
        env.store.make_room(plan, env.index.trials)
        record = env.build_and_score(trial, plan)
    except DiskFull as err:
        raise StopSweep(str(err), status=2) from None
    except Exception as err:
        path.unlink(missing_ok=True)
        reason = str(err) if isinstance(err, TrialCrashed) else f"{type(err).__name__}: {err}"
        trial.set_user_attr(Field.ERROR, reason)
        raise TrialFailed(reason) from err

    # 5. record: the child's worker field names the child; WORKER names the sweep process
    kept = {Field.MODEL_PATH: str(path.resolve())} if path.exists() else {}  # which worker holds the file
    set_user_attrs(trial, {**{k: v for k, v in record.items() if k != Field.WORKER}, **kept})
    if record.get(Field.PRUNED):
        path.unlink(missing_ok=True)
        raise pruned(record)
    return [float(record[name]) for name in env.objectives]


def _scored(plan: str, index: StudyIndex) -> Optional[FrozenTrial]:
    """An earlier trial that scored (or pruned) this plan itself, as the index knows it."""
    number = index.scored.get(plan)
    return index.trials[number] if number is not None else None


def _reuse(trial: optuna.Trial, earlier: FrozenTrial, env: TrialEnv) -> list[float]:
    """A cache hit: the earlier trial's record, its timings zeroed (nothing ran), its outcome repeated.
    Only attributes that differ are written, in one commit."""
    own, mine = (Field.CLAIM, Field.WORKER, Field.DRAWN, Field.ENQUEUED), trial.user_attrs  # not inherited; set already
    attrs = {k: v for k, v in earlier.user_attrs.items() if k not in own and (k not in mine or mine[k] != v)}
    timings = [spec.seconds for spec in EVALS.values()] + [Field.MERGE_SECONDS]
    attrs.update({key: 0.0 for key in timings if key in earlier.user_attrs})
    attrs[Field.CACHE_HIT_OF] = earlier.user_attrs.get(Field.CACHE_HIT_OF, earlier.number)
    set_user_attrs(trial, attrs)
    if earlier.state == TrialState.PRUNED:
        raise replay(trial, earlier)
    return earlier.values


class Sweep:
    """``work_type`` is what runs a trial (TrialWork: merge, then score); tests swap in faulty ones."""

    def __init__(self, config: SweepConfig, work_type: type[TrialWork] = TrialWork) -> None:
        self.config, self.work_type = config, work_type
        self.directory = config.sweep.directory
        self.journal = is_journal(config.storage_url)
        self.gpus = workers.gpus_of(config.sweep.worker, workers.groups(config.sweep))  # None: backend.device
        if self.gpus is not None:
            log.info("worker %d on GPU %s", config.sweep.worker or 0, ", ".join(map(str, self.gpus)))
        self.backend: Backend = make_backend(
            config.model.source, config.backend, self.directory, config.model.base or None, self.gpus
        )
        self.shape = self.backend.shape
        self.space = build_space(config.space_kind, self.shape, config.space, tuple(config.model.sources),
                                 config.space_scale)  # fmt: skip
        self.enqueue = [plan_to_enqueue(e, self.space, self.shape, config.space_kind) for e in config.sweep.enqueue]
        self.sampler = make_sampler(config.sampler.kind, self.space, config.sweep.sampler_seed,
                                    config.sampler.n_startup_trials, config.sampler.window,
                                    config.directions[0] == "minimize")  # fmt: skip
        prune = config.prune
        self.pruner = make_pruner(prune.max_ppl_ratio, prune.min_items, prune.reduction_factor,
                                  self._ppl_reports)  # fmt: skip
        run = config.sweep
        self.store = ModelStore(self.directory, run.keep_top_k, run.disk_budget_bytes, run.disk_budget,
                                self._rank_key, self.backend.size_bound)  # fmt: skip
        self.validation = validation.configured(config)  # (top_k, evals): refused now, not after the night
        self._stopping = False
        self.started = False  # True once the sweep has stored a result (the base's score) in its study

    def run(self) -> optuna.Study:
        try:
            return self._run()
        except optuna.exceptions.StorageInternalError as err:  # e.g. SQLite's "database or disk is full"
            cause = str(err.__cause__ or err).splitlines()[0]
            raise SelfMergeError(f"cannot write the study at {self.config.storage_url}: {cause}") from None

    def _run(self) -> optuna.Study:
        config, run = self.config, self.config.sweep
        self.store.check_budget(LayerPlan.identity(self.shape.n_layers))  # before anything is written
        with sweep_lock(config.storage_url) as lock:
            # open the study, or resume it if it scores the same way
            fingerprint = scoring_fingerprint(config, self.backend.source)
            study = open_sweep_study(config, self.sampler, self.pruner, fingerprint, self.shape.n_layers)
            study.set_user_attr(StudyKey.VALIDATION, {"top_k": self.validation[0], "evals": self.validation[1]})
            # trials a killed run left RUNNING: failed, retried once (at once when no other worker is alive)
            if lock is not None and lock.alone():
                for trial in self._retry_orphans(study):
                    log.warning("trial %d was running when its sweep died: failed, retried once", trial.number)
                    write_trial_record(self.directory, trial)
            if config.trial.isolate and not self.backend.isolatable:
                log.info("backend=%s: trials run in this process; trial.timeout and trial.max_memory do not apply",
                         config.backend.kind)  # fmt: skip
            # score the base once per sweep, then seed the plans asked for
            prune = config.prune
            early_windows = prune.early_windows if prune.max_ppl_ratio and config.eval.get(Field.PPL) else 0
            objective = config.eval.get(config.objectives[0][0])
            item_steps = prune.item_steps(getattr(objective, "n_items", 0))  # () without min_items
            scorer = TrialScorer(config.eval, self.backend.base, early_windows, self.backend.open_model,
                                 item_steps)  # fmt: skip
            base = self._base(study, scorer)
            self.started = True
            if isinstance(self.pruner, BaseRatioPruner):
                self.pruner.base_early_ppl = base.get(Field.PPL_EARLY)
            enqueue(study, self.enqueue, config, self.space, self.directory)
            write_study_record(self.directory, study)
            write_leaderboard(study, self.directory)
            index = StudyIndex(config.objectives[0])
            index.refresh(study)
            if index.n_done >= run.n_trials:
                log.info("sweep %s already has %d distinct plans done: nothing to do", run.name, index.n_done)
                return study
            # the trials
            self._optimize(study, self.work_type(self.backend, scorer, base), base, index)
            return study

    def validate(self, study: optuna.Study):
        """When the search is done: the best plans and the base on held-out items (sweep.validate)."""
        top_k, evals = self.validation
        if not top_k:
            return None
        log.info("validating the base and the %d best plans on %s", top_k, "+".join(evals))
        frame = validation.validate(study, self.directory, self.backend, top_k, evals, progress=self.config.sweep.progress)
        write_leaderboard(study, self.directory)
        return frame

    def _retry_orphans(self, study: optuna.Study) -> list[FrozenTrial]:
        orphans = set(retry_orphaned_trials(study))
        return [t for t in study.get_trials(deepcopy=False) if t.number in orphans]

    def _base(self, study: optuna.Study, score: TrialScorer) -> dict:
        """Scored in the sweep's own process (if the base cannot be evaluated, no trial can), once: of
        several workers (``sweep.worker`` set, or a storage other than SQLite) one scores it."""
        if StudyKey.BASE in study.user_attrs:
            return study.user_attrs[StudyKey.BASE]
        if self.config.sweep.worker is None and self.config.storage_url.startswith("sqlite:///"):
            base = self._score_base(score)
            study.set_user_attr(StudyKey.BASE, base)
            return base
        heartbeat = self.config.storage.heartbeat_seconds
        return base_once(study, WORKER, lambda: self._score_base(score), heartbeat)

    def _score_base(self, score: TrialScorer) -> dict:
        plan = LayerPlan.identity(self.shape.n_layers)
        source = self.backend.source  # several sources: model.base, else the first, is the base
        if isinstance(source, dict):
            name = f"{source[self.config.model.base or next(iter(source))].name} (of {', '.join(source)})"
        else:
            name = source.name
        log.info("base model %s (%d layers): scoring %s", name, self.shape.n_layers, "+".join(self.config.eval.kinds))
        try:
            scores = score(self.backend.base, progress=self.config.sweep.progress)
        except Exception as err:
            raise SelfMergeError(f"the base model could not be evaluated: {err}") from None
        return {**merge_record(plan, 0.0, self.backend.n_bytes(self.backend.base)), **scores}

    @property
    def _ppl_reports(self) -> bool:
        """The early perplexity goes to Optuna's pruner only where perplexity is the one objective."""
        return [name for name, _ in self.config.objectives] == [Field.PPL]

    def _rank_key(self, trial: FrozenTrial) -> float:
        """Best first by the first objective."""
        name, direction = self.config.objectives[0]
        return trial.user_attrs[name] if direction == "minimize" else -trial.user_attrs[name]

    def _fail_stale(self, study: optuna.Study) -> None:
        """Fail (and retry once) trials whose worker died: Optuna's heartbeat for RDB storages, ours
        for a journal file."""
        if self.journal:
            fail_stale_trials(study, 2 * self.config.storage.heartbeat_seconds)
        else:
            optuna.storages.fail_stale_trials(study)

    def _build_and_score(self, work: TrialWork, base: dict, early_stop: EarlyStop):
        limits = self.config.trial

        def build_and_score(trial: optuna.Trial, plan: LayerPlan) -> dict:
            path = self.store.path(trial.number)
            stop = lambda early: early_stop(trial, early)  # noqa: E731 - asked from the child, answered here
            if not (limits.isolate and self.backend.isolatable):
                return work(plan, path, stop)
            base_seconds = sum(base.get(EVALS[name].seconds, 0) for name in self.config.eval.kinds)
            timeout = limits.timeout_seconds(base_seconds)
            record, peak_mb = run_isolated(work, (plan, path), stop, timeout, limits.max_memory_bytes)
            return {**record, Field.PEAK_RSS_MB: round(peak_mb)}

        return build_and_score

    def _objective(self, env: TrialEnv) -> Callable[[optuna.Trial], list[float]]:
        if not self.journal:
            return lambda trial: run_trial(trial, env)
        heartbeat = self.config.storage.heartbeat_seconds

        def objective(trial: optuna.Trial) -> list[float]:  # journal storage: our own heartbeat
            self._fail_stale(trial.study)
            with trial_heartbeat(trial.study, trial, heartbeat):
                return run_trial(trial, env)

        return objective

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """The first Ctrl-C stops the sweep once the running trial is saved; a second aborts it.
        SIGTERM (what SLURM, systemd and Kubernetes send before a kill, often 30 s before) stops it
        at once: the running trial is failed and retried first when the sweep resumes."""
        def on_ctrl_c(signum, frame) -> None:
            if self._stopping:
                raise KeyboardInterrupt
            self._stopping = True
            log.warning("Ctrl-C: the sweep stops once the running trial is saved (Ctrl-C again to abort it)")

        def on_sigterm(signum, frame) -> None:
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # Optuna would log the stopped trial's traceback
            raise StopSweep("stopped by SIGTERM", status=128 + signal.SIGTERM)

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, handler)
                    for signum, handler in ((signal.SIGINT, on_ctrl_c), (signal.SIGTERM, on_sigterm))}  # fmt: skip
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _after_stop(self, study: optuna.Study, stop: StopSweep) -> None:
        """The stopped trial (failed by Optuna) retried first on resume; records and leaderboard written."""
        if stop.trial_number is not None:
            trial = read_trial(study, stop.trial_number)
            write_trial_record(self.directory, trial)
            if Field.PLAN in trial.user_attrs:
                retry_once(study, trial, drop=(Field.ERROR, Field.CLAIM))
                stop.message += f": trial {trial.number} ({trial.user_attrs[Field.PLAN]}) is retried first"
            else:  # stopped while its plan was being drawn: nothing to retry
                stop.message += f": trial {trial.number} had not drawn its plan yet"
        write_leaderboard(study, self.directory)
        stop.message += "; finished trials are saved, rerun the same command to resume"

    def _optimize(self, study: optuna.Study, work: TrialWork, base: dict, index: StudyIndex) -> None:
        config, run = self.config, self.config.sweep
        early_stop = EarlyStop(config.prune.max_ppl_ratio, base.get(Field.PPL_EARLY), self._ppl_reports)
        twins = TwinPlans(self._fail_stale, config.storage.heartbeat_seconds)
        build_and_score = self._build_and_score(work, base, early_stop)
        env = TrialEnv(self.space, self.store, twins, build_and_score, config.objective_names, index)
        bar = tqdm(total=run.n_trials, initial=index.n_done, desc=f"sweep {run.name}", unit="plan",
                   disable=not run.progress, dynamic_ncols=True)  # fmt: skip
        draw = callbacks.DrawUnscored(index, self.space, config.space_kind, run.max_repeats_in_a_row, run.sampler_seed)
        leaderboard = callbacks.WriteLeaderboard(self.directory)
        after_trial = [
            callbacks.WriteRecord(self.directory),
            *([callbacks.FailStale(self._fail_stale)] if self.journal else []),
            callbacks.Refresh(index),
            draw,
            *([callbacks.KeepBest(self.store, index)] if self.backend.writes_files else []),
            leaderboard,
            callbacks.Progress(bar, index, base, run.timeout_seconds),
            callbacks.StopWhenDone(run.n_trials, index, draw, lambda: self._stopping),
        ]
        with self._signals(), bar:
            try:
                study.optimize(self._objective(env), timeout=run.timeout_seconds, callbacks=after_trial,
                               catch=(TrialFailed,), gc_after_trial=False)  # fmt: skip
            except StopSweep as stop:
                self._after_stop(study, stop)
                raise
            finally:
                leaderboard.flush(study)
