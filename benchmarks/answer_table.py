"""Did any plan beat the base on a real benchmark, by more than noise? The real `selfmerge sweep`, end to end.

    python benchmarks/answer_table.py --model bundled --device cuda [--tasks piqa sciq] [--n-items 100]
        [--min-items 25] [--plans 60] [--landscape 60] [--transfer 14]
        [--steps halving answer transfer compare]

Four sweeps of one model (eval=bench on --tasks, the search part; nothing here is hand-scored):
- landscape: --landscape plans drawn at random (sampler=random, seed 0), each scored on all --n-items items
  per task: the full budget, the reference for the next two.
- halving: the same plans in the same order (the random sampler ignores scores), with successive halving from
  --min-items (prune.min_items): items and seconds spent, and whether the plan the full budget ranks best is
  among the plans scored in full. The same rule is replayed on the landscape's per-item rows for other
  settings (min_items x reduction_factor), so the choice of default rests on measurements.
- answer: the product's way, TPE with halving over --plans distinct plans, then the top 5 and the base
  re-scored on 500 held-out items per task (sweep.validate): each plan's paired difference to the base, its
  95% interval, Holm's correction over the 5, and the smallest difference the items could detect.
- transfer: --transfer plans spread over the landscape's range (its worst two included) scored by the probes
  (math, eq) beside the bench, all validated on held-out items: Spearman of each probe, and of the bench's
  own search part, against the validated held-out score (95% intervals by Fisher's z).
- compare: halving's tables again from the sweeps already in --results (a halving sweep cut short by a lease
  is compared on the landscape's plans it reached), and RYS's (i, j) map of the landscape, running nothing.
Prints the tables and writes results/benchmarks/answer_table_<model>_<device>.json (--results R: R.json),
the sweeps in the folder beside it.
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

from evals.schema import Field, StudyKey  # noqa: E402
from sweep.results.validation import spearman  # noqa: E402
from sweep.study.open import load_study  # noqa: E402

OUT = ROOT / "results" / "benchmarks"
METRIC = "acc_norm"


def sweep(name: str, args, extra: list[str]) -> tuple[Path, float]:
    """One real `selfmerge sweep`; its folder and wall seconds."""
    tasks = f"[{','.join(args.tasks)}]"
    common = [f"model={args.model_conf}", f"backend={args.backend}", f"eval.bench.tasks={tasks}",
              f"eval.bench.n_items={args.n_items}", f"sweep.name={name}", f"sweep.results_dir={args.results}",
              "sweep.progress=false"]  # fmt: skip
    if args.model_conf == "gguf":
        common.append(f"model.path={args.model}")
    if args.backend == "torch":
        common.append(f"backend.device={args.device}")
    if args.held_out:
        held_out = f"{{tasks:{tasks},part:held_out,n_items:{args.held_out}}}"
        common.append(f"sweep.validate.evals={{bench:{held_out}}}")
    start = time.perf_counter()
    command = [sys.executable, "-m", "sweep.cli", "sweep", *common, *extra, *args.overrides]
    run = subprocess.run(command, cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    seconds = time.perf_counter() - start
    (args.results / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"sweep {name} failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    print(f"# sweep {name}: {seconds:.0f} s", flush=True)
    return args.results / name, seconds


def study_of(folder: Path):
    return load_study(f"sqlite:///{folder / 'study.db'}", folder.name)


def trials_of(study) -> list:
    """The trials that scored a plan on items themselves (no cache hits)."""
    scored = lambda attrs: Field.BENCH_ITEMS in attrs and Field.CACHE_HIT_OF not in attrs  # noqa: E731
    return [t for t in study.get_trials() if scored(t.user_attrs)]


def score_at(rows: list[dict], step: int, tasks: list[str]) -> float:
    """The objective on the first ``step`` items of each task, as the staged evaluation scores them."""
    first = lambda task: [r[METRIC] for r in rows if r["task"] == task][:step]  # noqa: E731
    return float(np.mean([np.mean(first(task)) for task in tasks]))


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
    label = f"replay min_items={min_items} factor={factor} ({len(trials)} plans)"
    return summarize_search(trials, full, items, tasks, n_items, label)


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
    same = ["eval=[bench]", "sampler=random", f"sweep.n_trials={args.landscape}", "sweep.seed=0",
            "prune.max_ppl_ratio=null", "sweep.validate.top_k=0"]  # fmt: skip
    _, land_s = sweep("landscape", args, same)
    _, halv_s = sweep("halving", args, [*same, f"prune.min_items={args.min_items}"])
    return {"landscape_wall_s": round(land_s, 1), "halving_wall_s": round(halv_s, 1), **compare(args)}


def rys_map(args, land: list, base: dict, png: Path) -> list[dict]:
    """RYS's (i, j) map, sparse: the landscape's plans of RYS's shape ``0-j,i-N`` (layers i..j-1 run twice),
    per task, their paired difference to the base with its 95% interval; drawn one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evals.stats import paired_difference
    from merge_core.layer_plan import LayerPlan

    base_items = {row["id"]: row[METRIC] for row in base[Field.BENCH_ITEMS]}
    cells = []
    for trial in land:
        plan = LayerPlan.parse(trial.user_attrs[Field.PLAN])
        if len(plan.slices) != 2 or plan.slices[0][0] != 0 or not plan.slices[1][0] < plan.slices[0][1]:
            continue
        (_, j), (i, n) = plan.slices
        for task in args.tasks:
            rows = [r for r in trial.user_attrs[Field.BENCH_ITEMS] if r["task"] == task]
            rows = [r for r in rows if r["id"] in base_items]
            d = paired_difference([r[METRIC] for r in rows], [base_items[r["id"]] for r in rows])
            cells.append({"plan": str(plan), "i": i, "j": j, "task": task, "diff": round(d.diff, 4),
                          "low": round(d.low, 4), "high": round(d.high, 4), "n": d.n})  # fmt: skip
    if not cells:
        return cells
    n = max(c["j"] for c in cells) + 1
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(5 * len(args.tasks), 4.4), squeeze=False)
    scale = max(abs(c["diff"]) for c in cells) or 1
    for ax, task in zip(axes[0], args.tasks):
        grid = np.full((n, n), np.nan)
        for c in (c for c in cells if c["task"] == task):
            grid[c["j"], c["i"]] = c["diff"]
            if c["low"] > 0 or c["high"] < 0:  # the interval excludes 0: outlined
                ax.add_patch(plt.Rectangle((c["i"] - 0.5, c["j"] - 0.5), 1, 1, fill=False, lw=2))
        image = ax.imshow(grid, origin="lower", cmap="RdBu", vmin=-scale, vmax=scale)
        ax.set(title=f"{task}: {METRIC} minus the base's", xlabel="i (first repeated layer)",
               ylabel="j (end of the repeat, exclusive)")  # fmt: skip
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"plans 0-j,i-N of the landscape ({len(cells) // len(args.tasks)}); outlined: the 95% CI "
                 f"excludes 0 (uncorrected: ~{0.05 * len(cells):.0f} of {len(cells)} cells by chance alone)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return cells


def compare(args) -> dict:
    """The searches on the landscape in --results: every plan in full, the halving sweep (on as many of the
    landscape's plans as it reached, should a lease end first), and the rule replayed for other settings."""
    landscape = study_of(args.results / "landscape")
    land = trials_of(landscape)
    halv = trials_of(study_of(args.results / "halving")) if (args.results / "halving").is_dir() else []
    seconds = lambda ts: round(sum(t.user_attrs.get(Field.BENCH_SECONDS, 0) for t in ts), 1)  # noqa: E731
    plans = lambda ts: [t.user_attrs[Field.PLAN] for t in ts]  # noqa: E731
    everything = lambda ts: len(ts) * args.n_items * len(args.tasks)  # noqa: E731
    rows = [summarize_search(land, land, everything(land), args.tasks, args.n_items,
                             "every plan in full (landscape sweep)", seconds(land))]  # fmt: skip
    report = {}
    if halv:
        prefix, by_plan = land[: len(halv)], {t.user_attrs[Field.PLAN]: t for t in land}
        items = sum(sum(task["n"] for task in t.user_attrs[Field.BENCH_TASKS].values()) for t in halv)
        full = [by_plan[t.user_attrs[Field.PLAN]] for t in halv if t.state.name == "COMPLETE"]
        rows.append(summarize_search(prefix, full, items, args.tasks, args.n_items,
                                     f"halving sweep min_items={args.min_items} factor=2 ({len(halv)} plans)",
                                     seconds(halv)))  # fmt: skip
        rows[-1]["in_full_seconds"] = seconds(prefix)
        rows.append(replay(prefix, args.tasks, args.n_items, args.min_items, 2))
        report["halving_plans_are_the_landscapes"] = plans(halv) == plans(prefix)
    settings = [(m, f) for m in (10, 25, 50) for f in (2, 3, 4) if m < args.n_items]
    rows += [replay(land, args.tasks, args.n_items, m, f) for m, f in settings]
    per_plan = np.mean([t.user_attrs[Field.BENCH_SECONDS] for t in land])
    png = args.results.with_name(f"{args.results.name}_rys.png")
    report["rys_map"] = rys_map(args, land, landscape.user_attrs[StudyKey.BASE], png)
    return {**report, "scoring_s_per_plan_in_full": round(float(per_plan), 2), "searches": rows,
            "landscape": [(t.user_attrs[Field.PLAN], t.user_attrs[Field.BENCH]) for t in land]}  # fmt: skip


def answer_step(args) -> dict:
    folder, wall = sweep("answer", args, ["eval=[ppl,bench]", "sweep.objectives=[bench]",
                                         f"sweep.n_trials={args.plans}", f"prune.min_items={args.min_items}",
                                         "sweep.validate.top_k=5"])  # fmt: skip
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    trials = trials_of(study_of(folder))
    return {"wall_s": round(wall, 1), "distinct_plans_scored": len(trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials), "verdict": summary["verdict"],
            "validated": summary["models"], "records": validated_records(folder)}  # fmt: skip


def validated_records(folder: Path) -> dict:
    """Per validated model: per-task accuracy, items, and the smallest detectable difference."""
    out = {}
    for path in sorted((folder / "validation").glob("*/*/record.json")):
        record = json.loads(path.read_text())
        if Field.BENCH_TASKS in record:
            keys = (Field.BENCH, Field.BENCH_TASKS, Field.BENCH_N, Field.BENCH_DETECTABLE, Field.BENCH_DIFF)
            out[path.parent.name] = {k: record.get(k) for k in keys}
    return out


def transfer_step(args, landscape: list) -> dict:
    ranked = sorted(landscape, key=lambda pair: pair[1])
    picks = [ranked[round(i)][0] for i in np.linspace(0, len(ranked) - 1, args.transfer)]
    picks = list(dict.fromkeys(picks))
    folder, wall = sweep("transfer", args, ["eval=[bench,probe]", "sweep.objectives=[bench]",
                                           "prune.max_ppl_ratio=null", f"sweep.n_trials={len(picks)}",
                                           f"sweep.validate.top_k={len(picks)}",
                                           f"sweep.enqueue=[{','.join(repr(p) for p in picks)}]"])  # fmt: skip
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    validated = {m[Field.PLAN]: m[Field.VALIDATED + Field.BENCH] for m in summary["models"]}
    trials = {t.user_attrs[Field.PLAN]: t for t in trials_of(study_of(folder))}
    plans = [p for p in validated if p in trials]
    held = [validated[p] for p in plans]
    probe = lambda p, name: trials[p].user_attrs[Field.PROBE_BY_NAME][name]["logprob"]  # noqa: E731
    rankers = {"math probe (logprob)": [probe(p, "math") for p in plans],
               "eq probe (logprob)": [probe(p, "eq") for p in plans],
               f"bench search part ({args.n_items}/task)": [trials[p].user_attrs[Field.BENCH] for p in plans]}
    return {"wall_s": round(wall, 1), "plans": len(plans), "verdict": summary["verdict"],
            "spearman": {name: with_interval(spearman(x, held), len(plans)) for name, x in rankers.items()},
            "rows": [{"plan": p, "validated": validated[p], "bench": trials[p].user_attrs[Field.BENCH],
                      "math": probe(p, "math"), "eq": probe(p, "eq")} for p in plans]}  # fmt: skip


def with_interval(rho: float, n: int) -> list[float | None]:
    """Spearman's rho and its 95% interval: Fisher's z with Fieller's standard error, sqrt(1.06 / (n - 3))."""
    if n < 4 or abs(rho) >= 1:
        return [round(rho, 3), None, None]  # too few plans for an interval
    z, se = np.arctanh(rho), np.sqrt(1.06 / (n - 3))
    return [round(rho, 3), round(float(np.tanh(z - 1.96 * se)), 3), round(float(np.tanh(z + 1.96 * se)), 3)]


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
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out items per task (default: validation's 500)")
    parser.add_argument("--steps", nargs="+", default=["halving", "answer", "transfer"])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="more Hydra overrides for every sweep, e.g. prune.max_ppl_ratio=null")
    parser.add_argument("--results", type=Path, default=None,
                        help="the sweeps' folder (default: results/benchmarks/answer_table_<model>_<device>)")
    args = parser.parse_args()
    args.model_conf = {"bundled": "smollm2", "gemma3-270m": "gemma3_270m"}.get(args.model, "gguf")
    name = f"answer_table_{args.model_conf}_{args.device}"
    args.results = (args.results or OUT / name).resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results.with_name(f"{args.results.name}.json")
    report = json.loads(out.read_text()) if out.is_file() else {}  # the steps run earlier stay in it
    report.update({"model": args.model, "backend": args.backend, "device": args.device, "tasks": args.tasks,
                   "n_items": args.n_items, "min_items": args.min_items, "overrides": args.overrides})  # fmt: skip
    if "compare" not in args.steps:
        report["machine"] = platform.node()
        if args.device == "cuda":
            import torch

            report["gpu"] = torch.cuda.get_device_name(0)
    save = lambda: out.write_text(json.dumps(report, indent=1, default=str))  # noqa: E731 - after each step
    if "halving" in args.steps or "compare" in args.steps:  # compare: the tables again, no sweep run
        report["halving"] = halving_steps(args) if "halving" in args.steps else compare(args)
        save()
        for row in report["halving"]["searches"]:
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if "answer" in args.steps:
        report["answer"] = answer_step(args)
        save()
        print(report["answer"]["verdict"], flush=True)
    if "transfer" in args.steps:  # the landscape of this run, or of an earlier one in --results
        land = trials_of(study_of(args.results / "landscape"))
        landscape = [(t.user_attrs[Field.PLAN], t.user_attrs[Field.BENCH]) for t in land]
        report["transfer"] = transfer_step(args, landscape)
        print(json.dumps(report["transfer"]["spearman"]), flush=True)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
