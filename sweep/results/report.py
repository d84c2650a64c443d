"""``selfmerge report results/<sweep>``: report.html and the PNG plots beside it.

progress.png     the first objective per trial, with the running best and the base model
depth.png        perplexity (or EQ-Bench) against the merged model's depth
pareto.png       the two first objectives against each other, the front joined (several objectives)
importance.png   which search parameters matter (Optuna's fANOVA on the completed trials)
layer_maps.png   the best plans drawn as which base layer sits at each output position
repeat_map.png   RYS's picture: the score of every plan that repeats one block (i, j) once, over start
                 and end layer, coloured around the base's score; repeat_map.html the same with hover
validation.png   the sweep's score against the held-out benchmark's (selfmerge validate), with Spearman
differences.png  each plan's paired difference to the base with its 95% interval, the base as the line at 0:
                 the best plans of the sweep, and the validated ones (Holm-corrected verdict)
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from evals.registry import EVALS
from evals.schema import Field, StudyKey
from merge_core.layer_plan import LayerPlan
from sweep.results.records import VALIDATION_DIR, distinct_plans, leaderboard_frame

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


def repeated_block(plan: LayerPlan, n_base: int) -> tuple[int, int] | None:
    """(i, j) when ``plan`` is the base with layers i..j-1 run twice (``0-j,i-n``), as RYS writes it."""
    if len(plan.slices) != 2:
        return None
    (start1, end1), (start2, end2) = plan.slices
    return (start2, end1) if start1 == 0 and end2 == n_base and start2 < end1 else None


def repeat_map(frame: pd.DataFrame, name: str, direction: str, n_base: int) -> pd.DataFrame:
    """The distinct scored plans that repeat one block, with their (i, j)."""
    merged = distinct_plans(frame[frame["state"] == "COMPLETE"])
    blocks = [repeated_block(LayerPlan.parse(plan), n_base) for plan in merged[Field.PLAN]]
    rows = [(i, j, plan, value) for (plan, value), block in zip(zip(merged[Field.PLAN], merged[name]), blocks)
            if block is not None for i, j in [block]]  # fmt: skip
    table = pd.DataFrame(rows, columns=["i", "j", Field.PLAN, name])
    return table.sort_values(name, ascending=direction == "minimize", kind="stable").reset_index(drop=True)


def _repeat_norm(values: np.ndarray, base: float, direction: str):
    """Colours diverge at the base's score; a gibberish tail (100x) must not wash the good plans out."""
    from matplotlib.colors import TwoSlopeNorm

    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if direction == "minimize":
        high = min(high, float(np.nanpercentile(values, 90)))
    else:
        low = max(low, float(np.nanpercentile(values, 10)))
    return TwoSlopeNorm(vcenter=base, vmin=min(low, base - 1e-9), vmax=max(high, base + 1e-9))


def plot_repeat_map(frame: pd.DataFrame, name: str, direction: str, n_base: int, base: float | None,
                    directory: Path, best: int = 3) -> Path | None:  # fmt: skip
    """repeat_map.png and repeat_map.html; None when fewer than two scored plans repeat one block."""
    table = repeat_map(frame, name, direction, n_base)
    if len(table) < 2 or base is None:
        return None
    grid = np.full((n_base, n_base + 1), np.nan)  # [i, j]: start layer i, end layer j
    grid[table["i"], table["j"]] = table[name]
    norm = _repeat_norm(grid, base, direction)
    cmap = "RdBu_r" if direction == "minimize" else "RdBu"  # better than the base is blue either way
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
    top = table.head(best)
    ax.scatter(top["j"], top["i"], s=90, facecolors="none", edgecolors="black", linewidths=1.5,
               label=f"best {len(top)} ({', '.join(top[Field.PLAN])})")  # fmt: skip
    ax.set_xlabel("j: end of the repeated block (exclusive)")
    ax.set_ylabel("i: start of the repeated block")
    ax.set_title(f"{name} of each plan that runs layers i..j-1 twice (white: the base's {base:.4g})")
    fig.colorbar(image, ax=ax, label=name, extend="max" if direction == "minimize" else "min")
    ax.legend(fontsize=8, loc="upper left")
    _repeat_map_html(table, grid, norm, plt.get_cmap(cmap), name, base, directory / "repeat_map.html")
    return _save(fig, directory / "repeat_map.png")


def _repeat_map_html(table: pd.DataFrame, grid: np.ndarray, norm, cmap, name: str, base: float, path: Path) -> None:
    """The heat map as an HTML table: each cell's colour as in the PNG, its plan and score on hover."""
    from matplotlib.colors import to_hex

    plans = {(i, j): plan for i, j, plan in zip(table["i"], table["j"], table[Field.PLAN])}
    ranks = {(i, j): rank for rank, (i, j) in enumerate(zip(table["i"], table["j"]), 1)}
    rows = []
    for i in range(grid.shape[0] - 1, -1, -1):
        cells = [f"<th>{i}</th>"]
        for j in range(grid.shape[1]):
            value = grid[i, j]
            if np.isnan(value):
                cells.append("<td></td>")
                continue
            tip = f"plan {plans[i, j]} (repeat {i}..{j - 1}): {name} {value:.4g}, {value / base:.3f}x the base; rank {ranks[i, j]}"
            cells.append(f'<td style="background:{to_hex(cmap(norm(value)))}" title="{html.escape(tip)}"></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "<tr><th>i \\ j</th>" + "".join(f"<th>{j}</th>" for j in range(grid.shape[1])) + "</tr>"
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>repeat map: {html.escape(name)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse;font-size:10px}}
td{{width:16px;height:16px;border:1px solid #eee}} td[title]:hover{{outline:2px solid black}}</style></head><body>
<h1>{html.escape(name)} of plans that run layers i..j-1 twice</h1>
<p>Rows: start layer i; columns: end layer j. White is the base's {base:.4g}; blue is better, red worse.
Hover a cell for its plan and score.</p>
<table>{header}{"".join(rows)}</table></body></html>
""", encoding="utf-8")


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


def plot_validation(directory: Path) -> tuple[Path | None, str]:
    """The sweep's objective against the first validated score, one point per validated model."""
    summary_path = directory / VALIDATION_DIR / "summary.json"
    if not summary_path.is_file():
        return None, ""
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    frame = pd.DataFrame(summary["models"])
    objective, validated = summary["objective"], Field.VALIDATED + summary["validated"][0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    plans = frame[frame["trial"] != "base"]
    ax.scatter(plans[objective], plans[validated], color="tab:blue", label="validated plans")
    for _, row in plans.iterrows():
        ax.annotate(str(row[Field.PLAN]), (row[objective], row[validated]), fontsize=7, alpha=0.7)
    base = frame[frame["trial"] == "base"]
    ax.scatter(base[objective], base[validated], color="tab:red", marker="*", s=150, label="base")
    ax.set_xlabel(f"{objective} (sweep)")
    ax.set_ylabel(f"{validated} (held out)")
    ax.set_title(f"Spearman {summary['spearman']:.2f}" if summary["spearman"] == summary["spearman"] else "Spearman undefined")
    ax.legend()
    text = f'<h2>validation</h2>\n<p><b>{html.escape(summary["verdict"])}</b></p>\n'
    return _save(fig, directory / "validation.png"), text


def plot_differences(directory: Path, frame: pd.DataFrame, top: int = 15) -> Path | None:
    """Intervals of the paired difference to the base (evals/stats.py): the sweep's ``top`` best plans by
    it, and the validated plans (filled where Holm's correction says they beat the base)."""
    panels = []
    for name, spec in EVALS.items():
        diff, low, high = spec.paired[:3] if spec.paired else (None, None, None)
        if diff in frame and frame[diff].notna().any():
            rows = frame[frame[diff].notna()].drop_duplicates(Field.PLAN)
            rows = rows.assign(**{c: pd.to_numeric(rows[c]) for c in (diff, low, high)}).nlargest(top, diff)
            panels.append((f"{name}: sweep (items of the search part)", rows, diff, low, high, None))
    summary_path = directory / VALIDATION_DIR / "summary.json"
    if summary_path.is_file():
        models = pd.DataFrame(json.loads(summary_path.read_text(encoding="utf-8"))["models"])
        for column in [c for c in models.columns if c.startswith(Field.VALIDATED) and c.endswith("_diff")]:
            stem = column[: -len("diff")]
            rows = models[models[column].notna()]
            rows = rows.assign(**{c: pd.to_numeric(rows[c]) for c in (column, stem + "low", stem + "high")})
            panels.append((f"{stem[len(Field.VALIDATED):-1]}: validated (held-out items)", rows, column,
                           stem + "low", stem + "high", stem + "beats_base"))  # fmt: skip
    if not panels:
        return None
    plt = _pyplot()
    height = 1.2 + 0.35 * sum(len(rows) for _, rows, *_ in panels) + len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, height), squeeze=False)
    for ax, (title, rows, diff, low, high, beats) in zip(axes[:, 0], panels):
        y = np.arange(len(rows))[::-1]
        errors = [rows[diff] - rows[low], rows[high] - rows[diff]]
        ax.errorbar(rows[diff], y, xerr=errors, fmt="none", ecolor="tab:blue", capsize=3)
        filled = rows[beats].astype(bool) if beats else pd.Series(False, index=rows.index)
        colours = ["tab:green" if f else "white" for f in filled]
        ax.scatter(rows[diff], y, c=colours, edgecolors="tab:blue", zorder=3)
        ax.axvline(0, color="tab:red", label="the base")
        ax.set_yticks(y, [str(plan) for plan in rows[Field.PLAN]], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("plan - base, 95% interval (filled: beats the base after Holm's correction)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, directory / "differences.png")


def write_report(study: optuna.Study, directory: Path) -> Path:
    names = study.user_attrs.get(StudyKey.OBJECTIVES, [Field.PPL])
    directions = [d.name.lower() for d in study.directions]
    frame = leaderboard_frame(study, directory)
    plots = {"progress": plot_progress(study, names[0], directions[0], directory / "progress.png")}
    depth_metric = Field.PPL if Field.PPL in frame and frame[Field.PPL].notna().any() else names[0]
    if (frame["state"] == "COMPLETE").any():
        plots["depth"] = plot_depth(frame, depth_metric, directory / "depth.png")
        if len(names) > 1:
            plots["pareto"] = plot_pareto(frame, names[:2], directions[:2], directory / "pareto.png")
    n_base = study.user_attrs.get(StudyKey.N_BASE_LAYERS, 0) or 1
    base_value = study.user_attrs.get(StudyKey.BASE, {}).get(names[0])
    for key, made in (("differences", plot_differences(directory, frame)),
                      ("importance", plot_importance(study, directory / "importance.png")),
                      ("layer_maps", plot_layer_maps(frame, names[0], n_base, directory / "layer_maps.png")),
                      ("repeat_map", plot_repeat_map(frame, names[0], directions[0], n_base, base_value, directory))):  # fmt: skip
        if made is not None:
            plots[key] = made
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    summary = ", ".join(f"{n} {s.lower()}" for s, n in states.items())
    scoring = study.user_attrs.get(StudyKey.SCORING, {})
    distinct = distinct_plans(frame).drop(columns=["model_file", Field.CACHE_HIT_OF]).dropna(axis=1, how="all")
    table = distinct.head(25).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")
    images = "\n".join(f'<h2>{key.replace("_", " ")}</h2>\n<img src="{p.name}" alt="{key}">' for key, p in plots.items())
    if "repeat_map" in plots:
        images += '\n<p><a href="repeat_map.html">the repeat map with each plan and score on hover</a></p>'

    prior = prior_agreement(frame, names[0], directions[0], directory)
    validation_plot, validation = plot_validation(directory)
    if validation_plot is not None:
        images = f'{validation}<img src="{validation_plot.name}" alt="validation">\n{images}'
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
