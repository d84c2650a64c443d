"""Many workers on one study: trials/hour and the storage's overhead per trial, for SQLite, a
journal file and PostgreSQL (a throwaway server on loopback), with 1, 2 and 3 workers; and whether
the storage held up: workers that exited with an error, failed trials, plans evaluated twice.

    python benchmarks/distributed_overhead.py [--trials 30] [--workers 1 2 3] [--storages sqlite ...]
        [--delay 0]     # seconds a trial's evaluation takes (0: the worst case for the storage)

The objective is the tests' cheap one (no model, no delay), so a trial's time is the sweep's own
bookkeeping: Optuna's ask/tell through the storage, the cross-worker plan check, the trial record
and leaderboard files. Time runs from the first trial's start to the last one's end (the base
model, scored once by each worker before its first trial, is left out). On 2 cores the point is the
overhead, not speed-up. Prints a table and writes results/benchmarks/distributed_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the repository first: tests/sweep/ would shadow sweep/

from pg_server import PostgresServer, find_bin_dir  # noqa: E402
from sweep.study.open import load_study  # noqa: E402

RESULTS = Path("results/benchmarks")


def run(url: str, root: Path, name: str, n_workers: int, n_trials: int, delay: float = 0.0) -> dict:
    evaluations = root / name / "evaluations"
    evaluations.mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "tests" / "worker_driver.py"), url, str(root / name / f"w{i}"), name, str(n_trials), str(evaluations), str(i), str(delay)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(n_workers)
    ]
    errors = [err.strip().splitlines()[-1] for proc in procs if (err := proc.communicate()[1]) and proc.returncode]
    all_trials = load_study(url, name).get_trials()
    trials = [t for t in all_trials if t.state.is_finished()]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    evaluated = Counter(marker.name.split("@")[0] for marker in evaluations.iterdir())
    return {"workers": n_workers, "trials": len(trials), "seconds": round(span, 2), "trials_per_hour": round(3600 * len(trials) / span),
            "seconds_per_trial_per_worker": round(span * n_workers / len(trials), 3),
            "workers_failed": len(errors), "failed_trials": sum(t.state.name == "FAIL" for t in all_trials),
            "plans_evaluated_twice": sum(n > 1 for n in evaluated.values()), "errors": errors[:3]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgresql"])
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    rows = []
    server = PostgresServer(find_bin_dir()) if find_bin_dir() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            storages = {"sqlite": lambda n: f"sqlite:///{root / n / 'study.db'}", "journal": lambda n: f"journal:{root / n / 'journal.log'}"}
            if server is not None and "postgresql" in args.storages:
                pg = server.start()
                storages["postgresql"] = lambda n: pg
            for storage in args.storages:
                for n in args.workers:
                    name = f"{storage}{n}"
                    rows.append({"storage": storage, **run(storages[storage](name), root, name, n, args.trials, args.delay)})
                    print(rows[-1])
    finally:
        if server is not None:
            server.stop()
    columns = list(rows[0])
    print("  ".join(f"{c:>28s}" for c in columns))
    for row in rows:
        print("  ".join(f"{str(row[c]):>28s}" for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("distributed_overhead.json" if args.storages == parser.get_default("storages")
                     else f"distributed_overhead_{'_'.join(args.storages)}.json")  # fmt: skip
    out.write_text(json.dumps({"n_trials": args.trials, "delay": args.delay, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
