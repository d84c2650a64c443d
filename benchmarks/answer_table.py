"""Did any plan beat the base on a real benchmark, by more than noise? The real `selfmerge sweep`, end to end.

    python benchmarks/answer_table.py --model bundled --device cuda [--tasks piqa sciq] [--n-items 100]
        [--min-items 25] [--plans 60] [--landscape 60] [--transfer 14] [--steps landscape halving answer transfer]

Four sweeps of one model (eval=bench on --tasks, the search part; nothing here is hand-scored):
- landscape: --landscape plans drawn at random (sampler=random, seed 0), each scored on all --n-items items per
  task: the full budget, the reference for the next two.
- halving: the same plans in the same order (the random sampler ignores scores), with successive halving from
  --min-items (prune.min_items): items and seconds spent, and whether the plan the full budget ranks best is
  among the plans scored in full. The same rule is replayed on the landscape's per-item rows for other
  settings (min_items x reduction_factor), so the choice of default rests on measurements.
- answer: the product's way, TPE with halving over --plans distinct plans, then the top 5 and the base
  re-scored on 500 held-out items per task (sweep.validate): each plan's paired difference to the base, its
  95% interval, Holm's correction over the 5, and the smallest difference the items could detect.
- transfer: --transfer plans spread over the landscape's range (its worst two included) scored by the probes
  (math, eq) beside the bench, all validated on held-out items: Spearman of each probe, and of the bench's
  own search part, against the validated held-out score.
Prints the tables and writes results/benchmarks/answer_table_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.schema import Field  # noqa: E402
from sweep.results.validation import spearman  # noqa: E402
from sweep.study.open import load_study  # noqa: E402

OUT = ROOT / "results" / "benchmarks"
METRIC = "acc_norm"


def sweep(name: str, args, extra: list[str]) -> tuple[Path, float]:
    """One real `selfmerge sweep`; its folder and wall seconds."""
    common = [f"model={args.model_conf}", *([f"model.path={args.model}"] if args.model_conf == "gguf" else []),
              f"backend={args.backend}", *([f"backend.device={args.device}"] if args.backend == "torch" else []),
              f"eval.bench.tasks=[{','.join(args.tasks)}]", f"eval.bench.n_items={args.n_items}",
              f"sweep.name={name}", f"sweep.results_dir={args.results}", "sweep.progress=false",
              *([f"sweep.validate.evals={{bench:{{tasks:[{','.join(args.tasks)}],part:held_out,n_items:{args.held_out}}}}}"]
                if args.held_out else [])]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "sweep.cli", "sweep", *common, *extra], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    seconds = time.perf_counter() - start
    (args.results / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"sweep {name} failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    print(f"# sweep {name}: {seconds:.0f} s", flush=True)
    return args.results / name, seconds


def trials_of(folder: Path) -> list:
    study = load_study(f"sqlite:///{folder / 'study.db'}", folder.name)
    return [t for t in study.get_trials() if Field.BENCH_ITEMS in t.user_attrs and Field.CACHE_HIT_OF not in t.user_attrs]


def score_at(rows: list[dict], step: int, tasks: list[str]) -> float:
    """The objective on the first ``step`` items of each task, as the staged evaluation scores them."""
    return float(np.mean([np.mean([r[METRIC] for r in [r for r in rows if r["task"] == t][:step]]) for t in tasks]))


def replay(trials: list, tasks: list[str], n_items: int, min_items: int, factor: int) -> dict:
    """Optuna's asynchronous successive halving over the landscape's plans in their order, on their rows."""
    steps, step = [], min_items
    while step < n_items:
        steps.append(step)
        step *= factor
    reached: dict[int, list[float]] = {s: [] for s in steps}
    items, full = 0, []
    for trial in trials:
        rows = trial.user_attrs[Field.BENCH_ITEMS]
        for step in steps:
            value = score_at(rows, step, tasks)
            reached[step].append(value)
            k = max(len(reached[step]) // factor, 1)
            if value < sorted(reached[step], reverse=True)[k - 1]:
                items += step * len(tasks)
                break
        else:
            items += n_items * len(tasks)
            full.append(trial)
    return summarize_search(trials, full, items, tasks, n_items, f"replay min_items={min_items} factor={factor}")


def summarize_search(trials: list, full: list, items: int, tasks: list[str], n_items: int, label: str,
                     seconds: float | None = None) -> dict:  # fmt: skip
    best = max(trials, key=lambda t: t.user_attrs[Field.BENCH])
    found = max(full, key=lambda t: t.user_attrs[Field.BENCH])
    everything = len(trials) * n_items * len(tasks)
    return {"how": label, "plans": len(trials), "plans_in_full": len(full), "items": items,
            "items_share": round(items / everything, 3), "seconds": seconds,
            "best_plan": best.user_attrs[Field.PLAN], "best_scored_in_full": best in full,
            "found": found.user_attrs[Field.PLAN], "found_score": found.user_attrs[Field.BENCH],
            "best_score": best.user_attrs[Field.BENCH]}  # fmt: skip


def halving_steps(args) -> dict:
    landscape, land_s = sweep("landscape", args, ["eval=[bench]", "sampler=random", f"sweep.n_trials={args.landscape}",
                                                 "sweep.seed=0", "prune.max_ppl_ratio=null", "sweep.validate.top_k=0"])  # fmt: skip
    halving, halv_s = sweep("halving", args, ["eval=[bench]", "sampler=random", f"sweep.n_trials={args.landscape}",
                                             "sweep.seed=0", "prune.max_ppl_ratio=null", "sweep.validate.top_k=0",
                                             f"prune.min_items={args.min_items}"])  # fmt: skip
    land, halv = trials_of(landscape), trials_of(halving)
    seconds = lambda ts: round(sum(t.user_attrs.get(Field.BENCH_SECONDS, 0) for t in ts), 1)  # noqa: E731
    items = sum(sum(task["n"] for task in t.user_attrs[Field.BENCH_TASKS].values()) for t in halv)
    by_plan = {t.user_attrs[Field.PLAN]: t for t in land}
    full_plans = [by_plan[t.user_attrs[Field.PLAN]] for t in halv if t.state.name == "COMPLETE"]
    rows = [summarize_search(land, land, len(land) * args.n_items * len(args.tasks), args.tasks, args.n_items,
                             "every plan in full (landscape sweep)", seconds(land)),
            summarize_search(land, full_plans, items, args.tasks, args.n_items,
                             f"halving sweep min_items={args.min_items} factor=2", seconds(halv))]  # fmt: skip
    rows += [replay(land, args.tasks, args.n_items, m, f) for m in (10, 25, 50) for f in (2, 3, 4) if m < args.n_items]
    same_order = [t.user_attrs[Field.PLAN] for t in land] == [t.user_attrs[Field.PLAN] for t in halv]
    return {"landscape_wall_s": round(land_s, 1), "halving_wall_s": round(halv_s, 1), "same_plans_in_order": same_order,
            "searches": rows, "landscape": [(t.user_attrs[Field.PLAN], t.user_attrs[Field.BENCH]) for t in land]}


def answer_step(args) -> dict:
    folder, wall = sweep("answer", args, ["eval=[ppl,bench]", "sweep.objectives=[bench]", f"sweep.n_trials={args.plans}",
                                         f"prune.min_items={args.min_items}", "sweep.validate.top_k=5"])  # fmt: skip
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    trials = trials_of(folder)
    return {"wall_s": round(wall, 1), "distinct_plans_scored": len(trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials), "verdict": summary["verdict"],
            "validated": summary["models"], "records": validated_records(folder)}  # fmt: skip


def validated_records(folder: Path) -> dict:
    """Per validated model: per-task accuracy, items, and the smallest detectable difference."""
    out = {}
    for path in sorted((folder / "validation").glob("*/*/record.json")):
        record = json.loads(path.read_text())
        if Field.BENCH_TASKS in record:
            out[path.parent.name] = {k: record.get(k) for k in (Field.BENCH, Field.BENCH_TASKS, Field.BENCH_N,
                                                        Field.BENCH_DETECTABLE, Field.BENCH_DIFF)}  # fmt: skip
    return out


def transfer_step(args, landscape: list) -> dict:
    ranked = sorted(landscape, key=lambda pair: pair[1])
    picks = [ranked[round(i)][0] for i in np.linspace(0, len(ranked) - 1, args.transfer)]
    picks = list(dict.fromkeys(picks))
    folder, wall = sweep("transfer", args, ["eval=[bench,probe]", "sweep.objectives=[bench]", "prune.max_ppl_ratio=null",
                                           f"sweep.n_trials={len(picks)}", f"sweep.validate.top_k={len(picks)}",
                                           f"sweep.enqueue=[{','.join(repr(p) for p in picks)}]"])  # fmt: skip
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    validated = {m[Field.PLAN]: m[Field.VALIDATED + Field.BENCH] for m in summary["models"]}
    trials = {t.user_attrs[Field.PLAN]: t for t in trials_of(folder)}
    plans = [p for p in validated if p in trials]
    held = [validated[p] for p in plans]
    probe = lambda p, name: trials[p].user_attrs[Field.PROBE_BY_NAME][name]["logprob"]  # noqa: E731
    return {"wall_s": round(wall, 1), "plans": len(plans),
            "spearman": {"math probe (logprob)": spearman([probe(p, "math") for p in plans], held),
                         "eq probe (logprob)": spearman([probe(p, "eq") for p in plans], held),
                         f"bench search part ({args.n_items}/task)": spearman([trials[p].user_attrs[Field.BENCH] for p in plans], held)},
            "rows": [{"plan": p, "validated": validated[p], "bench": trials[p].user_attrs[Field.BENCH],
                      "math": probe(p, "math"), "eq": probe(p, "eq")} for p in plans]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help="bundled | gemma3-270m | a GGUF path")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "sciq"])  # both have >= 500 held-out items
    parser.add_argument("--n-items", type=int, default=100)
    parser.add_argument("--min-items", type=int, default=25)
    parser.add_argument("--plans", type=int, default=60)
    parser.add_argument("--landscape", type=int, default=60)
    parser.add_argument("--transfer", type=int, default=14)
    parser.add_argument("--held-out", type=int, default=None, help="held-out items per task (default: validation's 500)")
    parser.add_argument("--steps", nargs="+", default=["halving", "answer", "transfer"])
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    args.model_conf = {"bundled": "smollm2", "gemma3-270m": "gemma3_270m"}.get(args.model, "gguf")
    args.results = (args.results or OUT / f"answer_table_{args.model_conf}").resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "backend": args.backend, "device": args.device, "tasks": args.tasks,
              "n_items": args.n_items, "min_items": args.min_items, "machine": platform.node()}  # fmt: skip
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    out = OUT / f"answer_table_{args.model_conf}.json"
    save = lambda: out.write_text(json.dumps(report, indent=1, default=str))  # noqa: E731 - after each step
    if "halving" in args.steps:
        report["halving"] = halving_steps(args)
        save()
        for row in report["halving"]["searches"]:
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if "answer" in args.steps:
        report["answer"] = answer_step(args)
        save()
        print(report["answer"]["verdict"], flush=True)
    if "transfer" in args.steps:  # the landscape of this run, or of an earlier one in --results
        landscape = [(t.user_attrs[Field.PLAN], t.user_attrs[Field.BENCH]) for t in trials_of(args.results / "landscape")]
        report["transfer"] = transfer_step(args, landscape)
        print(json.dumps(report["transfer"]["spearman"]), flush=True)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
