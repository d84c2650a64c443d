"""How many distinct plans a budget of n_trials scores: the real sweep (uniform space, 711 plans for
the bundled model; TPE; the bundled model merged and scored by llama.cpp) with a cheap perplexity
(one window of 256 tokens, as the search-efficiency landscape uses).

    python benchmarks/distinct_plans.py [--n-trials 400] [--seed 0]

A proposal of a plan already scored is told to the sampler with its known value and not counted;
after sweep.max_repeats_in_a_row such proposals an unscored plan is drawn uniformly. Prints the
distinct plans scored, the share of the sampler's asks spent on repeats, the uniform draws, the
best plan and the wall time; writes results/benchmarks/distinct_plans.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evals.schema import Field  # noqa: E402
from sweep.config import compose, load_config  # noqa: E402
from sweep.trials.runner import Sweep  # noqa: E402

OUT = REPO / "results" / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own log says what each trial did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "sweep.name=distinct", f"sweep.n_trials={args.n_trials}", f"sweep.seed={args.seed}", f"sweep.results_dir={tmp}",
            "sweep.progress=false", "sweep.keep_top_k=0", "eval.ppl.windows=1", "eval.ppl.n_ctx=256", "trial.isolate=false",
        ]  # fmt: skip
        start = time.perf_counter()
        study = Sweep(load_config(compose(overrides))).run()
        seconds = time.perf_counter() - start
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    repeats = [t for t in finished if Field.CACHE_HIT_OF in t.user_attrs]
    scored = [t for t in finished if Field.CACHE_HIT_OF not in t.user_attrs]
    drawn = [t for t in scored if t.user_attrs.get(Field.DRAWN) == "uniform"]
    complete = [t for t in scored if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.user_attrs[Field.PPL])
    result = {
        "n_trials": args.n_trials, "seed": args.seed, "asks": len(finished), "distinct_plans": len({t.user_attrs[Field.PLAN] for t in scored}),
        "repeats": len(repeats), "repeat_share": round(len(repeats) / len(finished), 3), "uniform_draws": len(drawn),
        "pruned": sum(t.state == TrialState.PRUNED for t in scored), "best_plan": best.user_attrs[Field.PLAN],
        "best_ppl": best.user_attrs[Field.PPL], "best_found_at_distinct_plan": scored.index(best) + 1, "seconds": round(seconds, 1),
    }  # fmt: skip
    for key, value in result.items():
        print(f"{key:30s} {value}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distinct_plans.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
