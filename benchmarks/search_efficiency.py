"""How fast each sampler finds the best plans, replayed on a fully scored landscape.

    python benchmarks/search_efficiency.py landscape   # score every plan of the space once (cached, resumable)
    python benchmarks/search_efficiency.py replay      # replay samplers on the cached scores; table, JSON, plots
    python benchmarks/search_efficiency.py replay --samplers tpe --window 1000   # one sampler, another window

The landscape: every plan of the ``uniform`` space with ``n_middle`` in [0, 2] on the bundled model,
scored by a cheap objective (perplexity, one window of 256 tokens of stdlib docstrings). Scores
go to results/benchmarks/landscape.csv as they come, so an interrupted run picks up where it was.
The replay runs each sampler against those cached scores (no merge, no eval) for several seeds
and reports the median number of distinct plans scored before the best plan and the top 1% are
first reached (a plan proposed again is a free cache hit, as in a sweep).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from evals.ppl_eval import PerplexityEval
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import bundled_model_path
from merge_core.model_shape import ModelShape
from sweep.config import SamplerConfig
from sweep.search.prior import prior_plans
from sweep.search.spaces import UniformSpaceConfig, build_space

OUT = Path("results/benchmarks")
KINDS = ("random", "tpe", "tpe+importance", "cmaes", "grid")
LANDSCAPE = OUT / "landscape.csv"
SPACE = UniformSpaceConfig(n_middle=(0, 2))


def make_space():
    shape = ModelShape.from_gguf_header(read_gguf_header(bundled_model_path()))
    return build_space("uniform", shape, SPACE)


def build_landscape(n_ctx: int, windows: int) -> None:
    space = make_space()
    plans, _ = space.enumerate_plans()
    done = set()
    if LANDSCAPE.exists():
        with open(LANDSCAPE) as f:
            done = {row["plan"] for row in csv.DictReader(f)}
    OUT.mkdir(parents=True, exist_ok=True)
    base = bundled_model_path()
    evaluate = PerplexityEval(base, "stdlib-docstrings", n_ctx=n_ctx, windows=windows)
    todo = [p for p in plans if p not in done]
    print(f"{len(plans)} plans, {len(done)} cached, {len(todo)} to score")
    new_file = not LANDSCAPE.exists()
    with open(LANDSCAPE, "a", newline="") as f, tempfile.TemporaryDirectory() as tmp:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(["plan", "n_layers", "ppl", "seconds"])
        for i, text in enumerate(todo, 1):
            start = time.perf_counter()
            path = merge_gguf(base, LayerPlan.parse(text), Path(tmp) / "m.gguf")
            ppl = evaluate(path).ppl
            writer.writerow(
                [text, LayerPlan.parse(text).n_layers, f"{ppl:.6f}", f"{time.perf_counter() - start:.2f}"]
            )
            f.flush()
            if i % 25 == 0:
                print(f"{i}/{len(todo)}", flush=True)


def layer_importance():
    """The importance prior's analysis of the bundled model (cached beside the landscape)."""
    from evals.layer_importance import LayerImportance
    from sweep.search.prior import analyze

    csv_path = OUT / "layer_importance.csv"
    if csv_path.is_file():
        return LayerImportance.read(csv_path)
    importance = analyze("bundled", "stdlib-docstrings", 512, windows=8, max_block=8, device="cpu")
    importance.write(OUT)
    return importance


def load_landscape() -> dict[str, float]:
    with open(LANDSCAPE) as f:
        return {row["plan"]: float(row["ppl"]) for row in csv.DictReader(f)}


def replay(space, landscape: dict[str, float], sampler_kind: str, seed: int, budget: int, targets: dict[str, set[str]], prior=None,
           window: int = SamplerConfig.window):  # fmt: skip
    """Evaluations (distinct plans scored, cache hits free) until each target set is first hit.
    ``prior``: (plan, params) pairs scored first, as space.prior=importance does."""
    from sweep.search.samplers import make_sampler

    sampler = make_sampler(
        sampler_kind, space, seed, SamplerConfig.n_startup_trials, window
    )  # the sweep defaults
    study = optuna.create_study(sampler=sampler)
    for _, params in prior or []:
        study.enqueue_trial(params)
    seen: set[str] = set()
    reached = {name: None for name in targets}
    trials = 0
    while len(seen) < budget and trials < 20 * budget:
        trials += 1
        trial = study.ask()
        plan = str(space.suggest(trial))
        if plan not in seen:
            seen.add(plan)
            for name, target in targets.items():
                if reached[name] is None and plan in target:
                    reached[name] = len(seen)
        study.tell(trial, landscape[plan])
        if all(v is not None for v in reached.values()):
            break
    return reached


def run_replay(seeds: int, budget: int, kinds: list[str], window: int) -> None:
    space = make_space()
    landscape = load_landscape()
    plans, _ = space.enumerate_plans()
    missing = set(plans) - set(landscape)
    if missing:
        raise SystemExit(f"{len(missing)} plans not scored yet: run `landscape` first")
    ranked = sorted(plans, key=landscape.get)
    n = len(ranked)
    targets = {"best": {ranked[0]}, "top_1pct": set(ranked[: max(1, n // 100)])}
    results = {}
    prior = prior_plans(space, layer_importance(), 5)
    for kind in kinds:
        sampler, _, with_prior = kind.partition("+")
        runs = [replay(space, landscape, sampler, seed, budget, targets, prior if with_prior else None, window)
                for seed in range(seeds)]  # fmt: skip
        results[kind] = {
            name: {
                "median_evals": statistics.median([r[name] if r[name] is not None else budget for r in runs]),
                "found_in": sum(r[name] is not None for r in runs),
                "per_seed": [r[name] for r in runs],
            }
            for name in targets
        }
    print(
        f"space: uniform n_middle [0,2], {n} plans; objective: ppl, 1 window of 256 tokens; {seeds} seeds, budget {budget} evaluations; "
        f"sampler.window={window}"
    )
    print(f"best plan {ranked[0]} ppl {landscape[ranked[0]]:.3f}; top 1% = {len(targets['top_1pct'])} plans")
    print(
        f"prior's first plans: {[str(p) for p, _ in prior]}; ranks in the landscape: {[ranked.index(str(p)) + 1 for p, _ in prior]}"
    )
    print(f"{'sampler':<16}{'evals to top 1% (median)':>27}{'evals to best (median)':>25}{'best found':>12}")
    for kind, r in results.items():
        print(
            f"{kind:<16}{r['top_1pct']['median_evals']:>27}{r['best']['median_evals']:>25}{r['best']['found_in']:>9}/{seeds}"
        )
    report = {"space": "uniform n_middle [0,2]", "n_plans": n, "seeds": seeds, "budget": budget, "window": window, "best_plan": ranked[0],
              "top_1pct": sorted(targets["top_1pct"]), "samplers": results,
              "prior_plans": [str(p) for p, _ in prior], "prior_plan_ranks": [ranked.index(str(p)) + 1 for p, _ in prior]}  # fmt: skip
    everything = kinds == list(KINDS) and window == SamplerConfig.window
    out = OUT / (
        "search_efficiency.json" if everything else f"search_efficiency_{'_'.join(kinds)}_w{window}.json"
    )
    out.write_text(json.dumps(report, indent=2))
    plot_landscape(space, landscape, ranked)
    print(f"wrote {out} and {OUT / 'landscape.png'}")


def plot_landscape(space, landscape: dict[str, float], ranked: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for params, plan in space.iter_params():
        p = dict(params)
        rows.append((p, plan, landscape[str(plan)]))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes[0, 0].plot(range(1, len(ranked) + 1), [landscape[p] for p in ranked], ".", ms=3)
    axes[0, 0].set(xlabel="plan rank", ylabel="perplexity", yscale="log", title="ppl of every plan, sorted")
    for ax, (key, label) in zip(
        [axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]],
        [
            ("first_size", "first slice size"),
            ("jump", "backward jump"),
            ("middle_size", "middle slice size"),
            ("n_middle", "middle slices"),
        ],
    ):
        ax.scatter([p[key] for p, _, _ in rows], [v for _, _, v in rows], s=6, alpha=0.4)
        ax.set(xlabel=label, ylabel="perplexity", yscale="log")
    axes[1, 2].scatter(
        [plan.slice_sizes[-1] for _, plan, _ in rows],
        [v for _, _, v in rows],
        s=6,
        alpha=0.4,
        c=[plan.n_layers for _, plan, _ in rows],
    )
    axes[1, 2].set(xlabel="last slice size", ylabel="perplexity", yscale="log", title="colour: output depth")
    fig.suptitle(f"SmolLM2-135M self-merge landscape: {len(ranked)} plans of the uniform space")
    fig.tight_layout()
    fig.savefig(OUT / "landscape.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["landscape", "replay"])
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=200, help="evaluations before a sampler gives up")
    parser.add_argument("--samplers", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument(
        "--window", type=int, default=SamplerConfig.window, help="sampler.window (TPE; 0: every trial)"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.step == "landscape":
        build_landscape(args.n_ctx, args.windows)
    else:
        run_replay(args.seeds, args.budget, args.samplers, args.window)


if __name__ == "__main__":
    main()
