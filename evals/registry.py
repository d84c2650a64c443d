"""Evaluations by name, as mergekit's merge methods: ``eval=ppl``, ``eval=[ppl,eqbench]``.

Adding an evaluation is one module that implements ``evals.base.Evaluation`` and defines its
``EvalSpec``, one row below, and one config file (``conf/eval/<name>.yaml``). The order of the
rows is the order a trial runs them in: perplexity first, so a hopeless plan stops there, then the cheap probes.
"""

from __future__ import annotations

from evals import bench, eqbench_eval, lm_eval_bridge, ppl_eval, probe_eval
from evals.base import EvalSpec
from merge_core.errors import SelfMergeError

EVALS: dict[str, EvalSpec] = {
    spec.name: spec
    for spec in (
        ppl_eval.SPEC,
        probe_eval.SPEC,
        eqbench_eval.SPEC,
        bench.SPEC,
        lm_eval_bridge.SPEC,
    )
}


def get(name: str) -> EvalSpec:
    if name not in EVALS:
        raise SelfMergeError(f"unknown evaluation {name!r}; choose from {list(EVALS)}")
    return EVALS[name]
