"""``selfmerge report results/<sweep>``: report.html and the PNG plots beside it.

progress.png     the first objective per trial, with the running best and the base model
depth.png        perplexity (or EQ-Bench) against the merged model's depth
pareto.png       the two first objectives against each other, the front joined (several objectives)
importance.png   which search parameters matter (Optuna's fANOVA on the completed trials)
layer_maps.png   the best plans drawn as which base layer sits at each output position
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from evals.schema import Field, StudyKey
from merge_core.layer_plan import LayerPlan
from sweep.records import distinct_plans, leaderboard_frame

log = logging.getLogger("selfmerge")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a headless server
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_progress(study: optuna.Study, name: str, direction: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    trials = sorted(study.trials, key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE and name in t.user_attrs]
    ax.scatter([t.number for t in done], [t.user_attrs[name] for t in done], s=18, label="completed")
    base_record = study.user_attrs.get(StudyKey.BASE, {})
    if name == Field.PPL and base_record.get(Field.PPL_EARLY):  # early ppl is on fewer windows: put it on the full scale
        scale = base_record[Field.PPL] / base_record[Field.PPL_EARLY]
        pruned = [t for t in trials if t.state == TrialState.PRUNED and np.isfinite(t.user_attrs.get(Field.PPL_EARLY, np.nan))]
        ax.scatter([t.number for t in pruned], [scale * t.user_attrs[Field.PPL_EARLY] for t in pruned], marker="x", color="tab:orange",
                   label="pruned (early ppl x base ppl / base early ppl)")  # fmt: skip
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    for number in failed:
        ax.axvline(number, color="tab:red", alpha=0.25, lw=1)
    best, running = [], None
    for t in done:
        value = t.user_attrs[name]
        running = value if running is None else (min(running, value) if direction == "minimize" else max(running, value))
        best.append((t.number, running))
    if best:
        ax.step(*zip(*best), where="post", color="black", lw=1.5, label="best so far")
    base = base_record.get(name)
    if base is not None:
        ax.axhline(base, color="gray", ls="--", label="base model")
    shown = [y for collection in ax.collections for y in collection.get_offsets()[:, 1]]
    if name == Field.PPL and shown and max(shown) > 5 * min(shown):  # gibberish plans are 100x: keep the good ones readable
        ax.set_yscale("log")
    ax.set_xlabel("trial" + (f"  (red lines: {len(failed)} failed)" if failed else ""))
    ax.set_ylabel(name)
    ax.set_title(f"{name} per trial ({direction})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_depth(frame: pd.DataFrame, name: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    merged = frame[frame["state"] == "COMPLETE"]
    on_front = merged["pareto"].fillna(False).astype(bool)
    ax.scatter(merged.loc[~on_front, Field.N_LAYERS], merged.loc[~on_front, name], s=18, label="merge")
    ax.scatter(merged.loc[on_front, Field.N_LAYERS], merged.loc[on_front, name], s=30, color="tab:green", label="on the Pareto front (leaderboard column)")
    base = frame[frame["state"] == "BASE"]
    ax.scatter(base[Field.N_LAYERS], base[name], marker="*", s=160, color="black", label="base model")
    ax.set_xlabel("output depth (layers)")
    ax.set_ylabel(name)
    ax.set_title(f"{name} against depth")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pareto(frame: pd.DataFrame, names: list[str], directions: list[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    merged = frame[frame["state"] == "COMPLETE"]
    ax.scatter(merged[names[0]], merged[names[1]], s=18, alpha=0.6, label="merge")
    front = merged[merged["pareto"].fillna(False).astype(bool)].sort_values(names[0])
    ax.plot(front[names[0]], front[names[1]], "o-", color="tab:green", label="Pareto front")
    base = frame[frame["state"] == "BASE"]
    if names[0] in base and names[1] in base:
        ax.scatter(base[names[0]], base[names[1]], marker="*", s=160, color="black", label="base model")
    ax.set_xlabel(f"{names[0]} ({directions[0]})")
    ax.set_ylabel(f"{names[1]} ({directions[1]})")
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_importance(study: optuna.Study, path: Path) -> Path | None:
    """fANOVA over the completed trials' parameters; None when too few trials or no shared parameter."""
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=lambda t: t.values[0]
        )  # fmt: skip
    except (RuntimeError, ValueError) as err:
        log.info("no parameter importances: %s", err)
        return None
    if not importances:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of the first objective's variance)")
    ax.set_title("which search parameters matter")
    return _save(fig, path)


def plot_layer_maps(frame: pd.DataFrame, name: str, n_base: int, path: Path, top: int = 10) -> Path | None:
    merged = distinct_plans(frame[frame["state"] == "COMPLETE"]).head(top)
    if merged.empty:
        return None
    rows = [("base", LayerPlan.identity(n_base), frame[frame["state"] == "BASE"][name].iloc[0] if (frame["state"] == "BASE").any() else None)]
    rows += [(f"#{int(r['rank'])} trial {r['trial']}", LayerPlan.parse(r[Field.PLAN]), r[name]) for _, r in merged.iterrows()]
    width = max(plan.n_layers for _, plan, _ in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, (_, plan, _) in enumerate(rows):
        grid[i, : plan.n_layers] = plan.layer_indices
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, width * 0.18), 0.45 * len(rows) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=n_base - 1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{label}  {plan}  ({name} {value:.3g})" if value is not None else f"{label}  {plan}" for label, plan, value in rows], fontsize=7)
    ax.set_xlabel("output position")
    ax.set_title("best plans: the base layer at each output position")
    fig.colorbar(image, ax=ax, label="base layer")
    return _save(fig, path)


def prior_agreement(frame: pd.DataFrame, name: str, direction: str, directory: Path) -> str:
    """With a layer-importance analysis in the sweep's folder (space.prior=importance): do the best
    plans agree with it? Spearman correlation of the prior's cost with the score, and where the
    best plan stands in the prior's order."""
    from evals.layer_importance import LayerImportance
    from merge_core.layer_plan import LayerPlan

    csv = directory / "layer_importance.csv"
    scored = distinct_plans(frame)
    scored = scored[(scored["state"] == "COMPLETE") & scored[name].notna()]
    if not csv.is_file() or len(scored) < 3:
        return ""
    importance = LayerImportance.read(csv)
    cost = scored[Field.PLAN].map(lambda text: importance.plan_cost(LayerPlan.parse(text)))
    signed = scored[name] if direction == "minimize" else -scored[name]
    rho = cost.rank().corr(signed.rank())
    best = signed.idxmin()
    place = int((cost < cost[best]).sum()) + 1
    return (f'<h2>importance prior</h2>\n<p>Layer importance (<a href="layer_importance.png">layer_importance.png</a>): '
            f"Spearman correlation of the prior's cost with {html.escape(name)} (better = lower) over {len(scored)} scored plans: "
            f"<b>{rho:+.2f}</b> (positive: the prior agrees). The best plan, {html.escape(str(scored.loc[best, 'plan']))}, "
            f"is number {place} of {len(scored)} in the prior's order.</p>\n")  # fmt: skip


def write_report(study: optuna.Study, directory: Path) -> Path:
    names = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])
    directions = [d.name.lower() for d in study.directions]
    frame = leaderboard_frame(study, directory)
    plots = {"progress": plot_progress(study, names[0], directions[0], directory / "progress.png")}
    depth_metric = Field.PPL if frame[Field.PPL].notna().any() else names[0]
    if (frame["state"] == "COMPLETE").any():
        plots["depth"] = plot_depth(frame, depth_metric, directory / "depth.png")
        if len(names) > 1:
            plots["pareto"] = plot_pareto(frame, names[:2], directions[:2], directory / "pareto.png")
    for key, made in (("importance", plot_importance(study, directory / "importance.png")),
                      ("layer_maps", plot_layer_maps(frame, names[0], study.user_attrs.get("n_base_layers", 0) or 1, directory / "layer_maps.png"))):  # fmt: skip
        if made is not None:
            plots[key] = made
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    summary = ", ".join(f"{n} {s.lower()}" for s, n in states.items())
    scoring = study.user_attrs.get(StudyKey.SCORING, {})
    distinct = distinct_plans(frame).drop(columns=["model_file", Field.CACHE_HIT_OF]).dropna(axis=1, how="all")
    table = distinct.head(25).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")
    images = "\n".join(f'<h2>{key.replace("_", " ")}</h2>\n<img src="{p.name}" alt="{key}">' for key, p in plots.items())
    prior = prior_agreement(frame, names[0], directions[0], directory)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>selfmerge: {html.escape(directory.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} img{{max-width:100%}}</style></head><body>
<h1>Sweep {html.escape(directory.name)}</h1>
<p>{len(study.trials)} trials: {html.escape(summary)}. Objectives: {html.escape(", ".join(f"{n} ({d})" for n, d in zip(names, directions)))}.</p>
<p>Base model: <code>{html.escape(str(scoring.get("model", "?")))}</code>; scoring: <code>{html.escape(str(scoring.get("eval", {})))}</code></p>
{prior}<h2>leaderboard (top 25 distinct plans)</h2>
{table}
{images}
</body></html>
"""
    out = directory / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
