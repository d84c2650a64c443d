"""The real benchmarks of eval=bench on a base model: accuracy with its 95% interval, and what 100 items
cost per plan on each backend (the base stands in for a plan: a merge of similar depth costs alike).

    python benchmarks/bench_tasks.py [--tasks arc_easy piqa sciq basic_arithmetic] [--items 100]
                                     [--backends llama_cpp torch] [--part held_out] [--model PATH]

Prints a table and writes results/benchmarks/bench_tasks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.bench import BenchConfig, BenchEval, chosen_items  # noqa: E402
from evals.stats import bootstrap_means  # noqa: E402
from merge_core.model_files import bundled_model_path  # noqa: E402
from sweep.config import BackendConfig  # noqa: E402
from sweep.trials.backends import make_backend  # noqa: E402

OUT = ROOT / "results" / "benchmarks"


def interval(hits: list[int]) -> tuple[float, float]:
    means = bootstrap_means(np.asarray(hits, dtype=float))
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "sciq", "basic_arithmetic"])
    parser.add_argument("--items", type=int, default=100, help="items per task")
    parser.add_argument("--backends", nargs="+", default=["llama_cpp", "torch"])
    parser.add_argument("--part", default="held_out")
    parser.add_argument("--model", default=None, help="a GGUF or HF folder (default: the bundled model)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else bundled_model_path()
    rows = []
    for kind in args.backends:
        config = BackendConfig(kind=kind, device="cpu", dtype="float32")
        backend = make_backend(model, config, OUT / "bench_work")
        for task in args.tasks:
            config = BenchConfig(tasks=(task,), n_items=args.items, part=args.part)
            evaluation = BenchEval(config, backend.open_model)
            start = time.perf_counter()
            scored = evaluation.rows(backend.base, chosen_items(config))
            seconds = time.perf_counter() - start
            row = {"backend": kind, "task": task, "n": len(scored),
                   "s_per_100_items": round(100 * seconds / len(scored), 1)}  # fmt: skip
            for metric in ("acc", "acc_norm"):
                hits = [r[metric] for r in scored]
                low, high = interval(hits)
                row.update({metric: round(float(np.mean(hits)), 4), f"{metric}_low": round(low, 4),
                            f"{metric}_high": round(high, 4)})  # fmt: skip
            rows.append(row)
            said = " ".join(f"{m} {row[m]:.3f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]"
                            for m in ("acc", "acc_norm"))  # fmt: skip
            cost = f"{row['s_per_100_items']:6.1f} s/100 items"
            print(f"{kind:>9s} {task:>16s} n={row['n']:4d} {said} {cost}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "bench_tasks.json"
    out.write_text(json.dumps({"model": str(model), "part": args.part, "machine": platform.machine(),
                               "cores": len(os.sched_getaffinity(0)), "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
