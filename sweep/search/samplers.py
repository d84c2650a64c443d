"""Samplers by config, all behind Optuna's one interface.

| kind | use |
| --- | --- |
| tpe | default: multivariate, grouped (define-by-run spaces), constant liar (parallel workers) |
| random | baseline |
| cmaes | CMA-ES; best on the fixed spaces (uniform, growing, repeat_block) |
| grid | every plan of the space once, in a seeded random order |
| nsga2 | genetic; several objectives |
"""

from __future__ import annotations

import random

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from merge_core.errors import SelfMergeError
from sweep.search.windowed import WindowedSampler
from sweep.study.optuna_private import set_system_attr, speedups
from sweep.search.spaces import SearchSpace

SAMPLERS = ("tpe", "random", "cmaes", "grid", "nsga2")


class PlanGridSampler(optuna.samplers.BaseSampler):
    """Exhaustive search over the distinct plans of a space, in an order shuffled by ``seed``.

    Each new trial takes the first plan of that order no trial has taken yet (the pick is stored
    on the trial, so a resumed sweep goes on where it stopped); the sweep stops when all are done.
    """

    def __init__(self, space: SearchSpace, seed: int, limit: int = 1_000_000) -> None:
        plans, complete = space.enumerate_plans(limit)
        if not complete:
            raise SelfMergeError(f"sampler=grid needs a space of at most {limit} plans; this one has more")
        self._order = [dict(params) for params in plans.values()]
        random.Random(seed).shuffle(self._order)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.params or "fixed_params" in trial.system_attrs:  # an enqueued trial brings its own
            return
        taken = {t.system_attrs.get("grid_index") for t in study.get_trials(deepcopy=False)}
        for index, params in enumerate(self._order):
            if index not in taken:
                set_system_attr(study, trial, "grid_index", index)
                set_system_attr(study, trial, "grid_params", params)
                return

    def sample_independent(self, study, trial, param_name, param_distribution):
        params = trial.system_attrs.get("grid_params") or {}
        if param_name in params:
            return params[param_name]
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        taken = {t.system_attrs.get("grid_index") for t in study.get_trials(deepcopy=False)}
        if len(taken - {None}) >= len(self._order):
            study.stop()


def make_sampler(kind: str, space: SearchSpace, seed: int, n_startup_trials: int, window: int = 0,
                 minimize: bool = True) -> optuna.samplers.BaseSampler:  # fmt: skip
    """``window`` > 0: TPE models the best ``window`` trials and the latest ``window`` (bounded cost per
    ask in long sweeps) where the Optuna guard allows; ``minimize`` is the first objective's direction,
    which "best" follows."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        tpe = optuna.samplers.TPESampler(
            n_startup_trials=n_startup_trials, multivariate=True, group=True, constant_liar=True, seed=seed
        )
        return WindowedSampler(tpe, window, minimize) if window and speedups() is None else tpe
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(n_startup_trials=n_startup_trials, seed=seed, warn_independent_sampling=False)
    if kind == "grid":
        return PlanGridSampler(space, seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise SelfMergeError(f"unknown sampler {kind!r}; choose one of {list(SAMPLERS)}")
