"""One plan, several workers: a plan that another worker is evaluating right now is waited for, and
its result taken when it lands, instead of being evaluated twice; the base model, which workers started
together would each score first, is scored by one of them (``base_once``).

Each trial writes its plan (the runner does, before asking here), then reads the RUNNING trials with
the same plan. One with a lower number seen: this trial waits for it (``claim=wait``). None:
``claim=evaluate``; but a higher-numbered twin that read before this trial's plan was written may
have decided to evaluate too, so this trial reads each higher twin's decision and waits for the
first evaluator. Waits point only down to a lower number or up to an evaluator, which itself
waits for no one: no cycle, no deadlock. Everything goes through the shared Optuna storage.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from evals.schema import Field, StudyKey
from sweep.study.optuna_private import read_trial

log = logging.getLogger("selfmerge")
POLL_SECONDS = 0.5
CONFIRM_SECONDS = 2.0  # a claim is seen by every worker within this (the storage's read cache keeps 0.1 s)


class TwinPlans:
    """``fail_stale(study)`` fails trials of dead workers (called every ``heartbeat_seconds`` while
    waiting, so a twin whose worker died ends as FAIL and this trial evaluates the plan itself)."""

    def __init__(self, fail_stale: Callable[[optuna.Study], None], heartbeat_seconds: float) -> None:
        self.fail_stale, self.heartbeat_seconds = fail_stale, heartbeat_seconds

    def result_for(self, trial: optuna.Trial, plan: str) -> FrozenTrial | None:
        """The finished twin whose result this trial takes, or None: this trial evaluates the plan."""
        study = trial.study
        twins = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.user_attrs.get(Field.PLAN) == plan and t.number != trial.number]  # fmt: skip
        lower = [t.number for t in twins if t.number < trial.number]
        if lower:
            trial.set_user_attr(Field.CLAIM, "wait")
            return self._finished(study, min(lower))
        trial.set_user_attr(Field.CLAIM, "evaluate")
        for twin in sorted(t.number for t in twins if t.number > trial.number):
            if self._decision(study, twin) == "evaluate":
                trial.set_user_attr(Field.CLAIM, "wait")
                return self._finished(study, twin)
        return None

    def _poll(self, study: optuna.Study, number: int, done: Callable[[FrozenTrial], bool]) -> FrozenTrial:
        last_check = time.monotonic()
        while True:
            trial = read_trial(study, number)
            if done(trial):
                return trial
            if time.monotonic() - last_check > self.heartbeat_seconds:
                self.fail_stale(study)  # the awaited worker may have died
                last_check = time.monotonic()
            time.sleep(POLL_SECONDS)

    def _finished(self, study: optuna.Study, number: int) -> FrozenTrial | None:
        """Trial ``number`` once finished: it, if it has a result; None if it failed."""
        log.info("plan already being evaluated by trial %d: waiting for its result", number)
        trial = self._poll(study, number, lambda t: t.state.is_finished())
        return trial if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None

    def _decision(self, study: optuna.Study, number: int) -> str:
        """A twin's claim once written: evaluate | wait; "finished" if it ended first."""
        trial = self._poll(study, number, lambda t: Field.CLAIM in t.user_attrs or t.state.is_finished())
        return "finished" if trial.state.is_finished() else trial.user_attrs[Field.CLAIM]


def base_once(study: optuna.Study, worker: str, score: Callable[[], dict], heartbeat_seconds: float) -> dict:
    """The base model's record (``StudyKey.BASE``), scored by one of the workers that start together;
    the others wait for it. Each worker without a record writes its claim (``base_claim:<worker>``:
    when it claimed, when it last beat, beaten every heartbeat while it waits or scores), waits
    ``CONFIRM_SECONDS`` so every claim made by then is seen, and the earliest live claim scores. A claim
    not beaten for two heartbeats is a dead worker's: the next one takes over."""
    key, claimed = StudyKey.BASE_CLAIM + worker, time.time()
    stop = threading.Event()

    def beat() -> None:
        while True:
            study.set_user_attr(key, [claimed, time.time()])
            if stop.wait(heartbeat_seconds):
                return

    thread = threading.Thread(target=beat, name="selfmerge-base-claim", daemon=True)
    thread.start()
    try:
        time.sleep(CONFIRM_SECONDS)
        said = None
        while StudyKey.BASE not in (attrs := study.user_attrs):
            now = time.time()
            claims = {name[len(StudyKey.BASE_CLAIM):]: value for name, value in attrs.items()
                      if name.startswith(StudyKey.BASE_CLAIM)}  # fmt: skip
            live = sorted((first, name) for name, (first, last) in claims.items()
                          if now - last <= 2 * heartbeat_seconds)  # fmt: skip
            first = live[0][1] if live else worker
            if first == worker:
                record = score()
                study.set_user_attr(StudyKey.BASE, record)
                return record
            if said != first:
                log.info("the base model is being scored by worker %s: waiting for its record", first)
                said = first
            time.sleep(POLL_SECONDS)
        return attrs[StudyKey.BASE]
    finally:
        stop.set()
        thread.join()
