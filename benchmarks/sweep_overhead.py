"""Per-trial time outside the evaluation as a study grows: the real sweep loop (sampler, cache hits,
records, leaderboard, callbacks, storage) around a stub evaluation of ~0 s, on `space=free` (55,179
plans) with TPE, on SQLite and (when a server binary is here) PostgreSQL.

    python benchmarks/sweep_overhead.py [--at 100 1000 5000 20000] [--storages sqlite postgresql] [--window 1000]
    python benchmarks/sweep_overhead.py --optuna-only   # the floor: Optuna alone, no selfmerge code
    python benchmarks/sweep_overhead.py --plain-optuna  # the sweep on Optuna's own storage and TPE (the
                                                        # guard's fallback, sweep/study/optuna_private.py)

The study is filled to each checkpoint with finished trials of random plans (added in bulk, as a long
sweep leaves them), then the sweep resumes for ``--measure`` trials there; a trial's time runs from
its start to the next one's (the stub takes microseconds). Median and p95 per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "benchmarks"
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the repository first: tests/sweep/ would shadow sweep/

import optuna  # noqa: E402

from evals.schema import Field  # noqa: E402
from pg_server import PostgresServer, find_bin_dir  # noqa: E402
from sweep.config import SamplerConfig, compose, load_config  # noqa: E402
from sweep.trials.runner import Sweep  # noqa: E402
from sweep.search.samplers import make_sampler  # noqa: E402
from sweep.study.optuna_private import PLAIN_ENV  # noqa: E402
from sweep.trials.trial_work import TrialWork, merge_record  # noqa: E402



class StubWork(TrialWork):
    """No merge, no model: a fixed pseudo-score per plan (deeper plans worse, plus plan-seeded noise)."""

    @staticmethod
    def score(plan) -> float:
        return 10.0 + 0.05 * abs(plan.n_layers - 36) + zlib.crc32(str(plan).encode()) % 1000 / 1000

    def __call__(self, plan, out, stop_early) -> dict:
        return {**merge_record(plan, 0.0, 0), Field.PPL: self.score(plan)}


def _fill(study: optuna.Study, space, n: int, seed: int) -> None:
    """Add finished trials of random plans until the study holds ``n`` trials."""
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    batch = []
    for _ in range(n - len(study.trials)):
        trial = draw.ask()
        plan = space.suggest(trial)
        ppl = StubWork.score(plan)
        attrs = {**merge_record(plan, 0.0, 0), Field.PPL: ppl}
        batch.append(optuna.trial.create_trial(value=ppl, params=trial.params, distributions=trial.distributions, user_attrs=attrs))
    study.add_trials(batch)


def _sweep(url: str, root: Path, n_trials: int, window: int) -> Sweep:
    overrides = [
        "sweep.name=overhead", f"sweep.n_trials={n_trials}", f"sweep.results_dir={root}", "sweep.progress=false",
        f"storage.url={url}", "space=free", "sampler=tpe", f"sampler.window={window}", "trial.isolate=false",
        "prune.max_ppl_ratio=null", "eval.ppl.n_ctx=128", "eval.ppl.windows=1", "sweep.keep_top_k=0",
    ]  # fmt: skip
    sweep = Sweep(load_config(compose(overrides)), work_type=StubWork)
    sweep.backend.writes_files = False  # the stub writes nothing, as the torch backend
    return sweep


def run(url: str, root: Path, checkpoints: list[int], measure: int, window: int) -> dict:
    rows = {}
    for at in checkpoints:
        opened = _sweep(url, root, 0, window)
        study = opened.run()  # n_trials=0: opens the study (the base is scored once), runs no trial
        _fill(study, opened.space, at, seed=at)
        distinct = sum(t.state.is_finished() and Field.CACHE_HIT_OF not in t.user_attrs for t in study.get_trials(deepcopy=False))
        started = time.perf_counter()
        study = _sweep(url, root, distinct + measure // 4, window).run()  # repeats come on top: ~`measure` trials
        starts = [t.datetime_start.timestamp() for t in study.get_trials(deepcopy=False)[at:][-measure:] if t.datetime_start]
        per_trial = sorted(1000 * (b - a) for a, b in zip(starts, starts[1:]))
        rows[at] = {"median_ms": round(statistics.median(per_trial), 2), "p95_ms": round(per_trial[int(0.95 * (len(per_trial) - 1))], 2),
                    "trials": len(study.trials), "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(at, rows[at], flush=True)
    return rows


def optuna_only(root: Path, n: int = 2000) -> dict:
    """Optuna with no selfmerge code: ask, four ``suggest_int``, tell, on a SQLite file in WAL mode,
    with RandomSampler and with TPE as the sweep configures it (multivariate, grouped, constant liar)
    over the whole history. Median / p95 ms of the 100 trials before each of 100, 1,000 and 2,000."""
    rows = {}
    for kind in ("random", "tpe"):
        storage = optuna.storages.RDBStorage(f"sqlite:///{root / f'optuna_{kind}.db'}")
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        sampler = make_sampler(kind, None, 0, SamplerConfig.n_startup_trials)  # window 0: Optuna's own TPE
        study = optuna.create_study(storage=storage, sampler=sampler)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            trial = study.ask()
            study.tell(trial, float(sum(trial.suggest_int(name, 0, 20) for name in "abcd")))
            times.append(1000 * (time.perf_counter() - started))
        for at in (100, 1000, 2000):
            window = sorted(times[at - 100 : at])
            rows[f"{kind}@{at}"] = {"median_ms": round(statistics.median(window), 2), "p95_ms": round(window[94], 2)}
            print(kind, at, rows[f"{kind}@{at}"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, nargs="+", default=[100, 1000, 5000, 20000], help="study sizes to measure at")
    parser.add_argument("--measure", type=int, default=100, help="sweep trials timed at each size")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--window", type=int, default=1000, help="sampler.window (0: TPE over every trial)")
    parser.add_argument("--optuna-only", action="store_true", help="time Optuna alone: the floor under a trial")
    parser.add_argument("--plain-optuna", action="store_true", help="the sweep as outside the tested Optuna range")
    args = parser.parse_args()
    if args.plain_optuna:
        os.environ[PLAIN_ENV] = "1"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.optuna_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = optuna_only(Path(tmp))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sweep_overhead_optuna_only.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote {RESULTS / 'sweep_overhead_optuna_only.json'}")
        return
    results = {}
    server = PostgresServer(find_bin_dir()) if "postgresql" in args.storages and find_bin_dir() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for storage in args.storages:
                if storage == "postgresql" and server is None:
                    print("postgresql: no server binary here, skipped")
                    continue
                url = server.start() if storage == "postgresql" else f"sqlite:///{root / storage / 'study.db'}"
                results[storage] = run(url, root / storage, sorted(args.at), args.measure, args.window)
    finally:
        if server is not None:
            server.stop()
    print(f"{'storage':>10s} " + " ".join(f"{'@' + str(at) + ' med / p95 ms':>24s}" for at in sorted(args.at)))
    for storage, rows in results.items():
        print(f"{storage:>10s} " + " ".join(f"{rows[at]['median_ms']:>11.1f} / {rows[at]['p95_ms']:>8.1f}" for at in sorted(args.at)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sweep_overhead_w{args.window}{'_plain_optuna' if args.plain_optuna else ''}.json"
    summary = {"measure": args.measure, "window": args.window, "plain_optuna": args.plain_optuna, "storages": results}
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
