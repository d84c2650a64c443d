"""EQ-Bench on the bundled model: time per item, score and parse rate; and how well the fast logits
mode ranks plans the way the generation mode does.

    python benchmarks/eqbench_modes.py base [--official PATH]   # base model, offline set (+ official 171)
    python benchmarks/eqbench_modes.py rank [--items 12]        # 12 plans, both modes, Spearman

Prints tables and writes results/benchmarks/eqbench_base.json, eqbench_rank.json and
eqbench_rank.png. Besides the official score, ``rank`` reports a lenient parse of the generated
text (the last ``Emotion: number`` of each emotion anywhere, headings not required): a small model
rarely writes the headings, and the official parse then scores every plan 0, which ranks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from evals.eqbench import item_score
from evals.eqbench_eval import EQBenchEval
from evals.ppl_eval import PerplexityEval
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import bundled_model_path

OUT = Path("results/benchmarks")
OFFICIAL = Path(__file__).resolve().parent.parent / "evals" / "data" / "eqbench_v2_official.json"  # shipped, MIT
# From good to broken: the base, rule-abiding merges, heavy repeats, and plans that drop the last layers.
PLANS = [
    "0-30", "0-20,14-30", "0-16,8-30", "0-12,6-30", "0-12,8-20,16-30", "0-10,6-16,12-22,18-30",
    "0-14,10-18,14-30", "0-8,4-12,8-16,12-20,16-24,20-30", "0-18,10-22,12-30", "0-28", "0-26", "0-20,16-24",
]  # fmt: skip


def spearman(a, b) -> float:
    """Rank correlation with tied values sharing their mean rank (NaN when either side is constant)."""
    ranks = [pd.Series(x, dtype=float).rank(method="average").to_numpy() for x in (a, b)]
    if ranks[0].std() == 0 or ranks[1].std() == 0:
        return float("nan")
    return float(np.corrcoef(*ranks)[0, 1])


def lenient_score(items, records) -> tuple[float, float]:
    """Score and parse rate when any ``Emotion: n`` lines count, headings or not (diagnostic only)."""
    scores = []
    for item, record in zip(items, records):
        found = {}
        for emotion in item.emotions:
            hits = re.findall(rf"{re.escape(emotion)}\W{{0,3}}\s*(\d+)", record.raw_answer, flags=re.IGNORECASE)
            if hits and int(hits[-1]) <= 10:
                found[emotion] = int(hits[-1])
        if len(found) == 4:
            scores.append(item_score(item.reference, found))
    return (10 * float(np.mean(scores)) if scores else 0.0), len(scores) / len(items)


def run_modes(model: Path, questions: str, n_items: int, max_tokens: int, argmax: bool = True) -> dict:
    row = {}
    for mode in ("generate", "logits"):
        evaluate = EQBenchEval(questions, n_items=n_items, mode=mode, max_tokens=max_tokens)
        start = time.perf_counter()
        result = evaluate(model, progress=True)
        seconds = time.perf_counter() - start
        row[mode] = {"score": round(result.score, 2), "parse_rate": round(result.parse_rate, 3), "used": result.used,
                     "seconds_per_item": round(seconds / result.n_items, 3), "n_items": result.n_items}  # fmt: skip
        if mode == "generate":
            row[mode]["lenient_score"], row[mode]["lenient_parse_rate"] = (round(v, 3) for v in lenient_score(evaluate.items, result.records))
        elif argmax:
            by_argmax = EQBenchEval(questions, n_items=n_items, mode="logits", logits_score="argmax")(model)
            row[mode]["argmax_score"] = round(by_argmax.score, 2)
    return row


def machine() -> dict:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def cmd_base(args) -> None:
    sets = [("offline", "offline")] + ([("official-171", str(args.official))] if Path(args.official).is_file() else [])
    rows = []
    for name, source in sets:
        row = {"set": name, **run_modes(bundled_model_path(), source, 0, args.max_tokens)}
        rows.append(row)
        g, lg = row["generate"], row["logits"]
        print(f"{name:13s} generate {g['score']:6.2f} (parse {g['parse_rate']:.2f}, {g['seconds_per_item']:.2f} s/item) | "
              f"logits {lg['score']:6.2f} ({lg['seconds_per_item']:.2f} s/item) | lenient {g['lenient_score']:.2f} (parse {g['lenient_parse_rate']:.2f})")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eqbench_base.json").write_text(json.dumps({"machine": machine(), "max_tokens": args.max_tokens, "rows": rows}, indent=2))


def cmd_rank(args) -> None:
    base = bundled_model_path()
    ppl = PerplexityEval(base, "stdlib-docstrings", n_ctx=512, windows=4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in PLANS:
            plan = LayerPlan.parse(text)
            path = Path(tmp) / "merged.gguf"
            merge_gguf(base, plan, path)
            row = {"plan": text, "n_layers": plan.n_layers, "ppl": round(ppl(path).ppl, 3), **run_modes(path, "offline", args.items, args.max_tokens, argmax=False)}
            rows.append(row)
            print(f"{text:34s} ppl {row['ppl']:9.2f} | gen {row['generate']['score']:6.2f} (parse {row['generate']['parse_rate']:.2f}) "
                  f"lenient {row['generate']['lenient_score']:6.2f} (parse {row['generate']['lenient_parse_rate']:.2f}) | logits {row['logits']['score']:6.2f}")  # fmt: skip
    summarize_rank(rows, args)


def summarize_rank(rows, args) -> None:
    logits = [r["logits"]["score"] for r in rows]
    summary = {
        "spearman_logits_vs_generate": spearman(logits, [r["generate"]["score"] for r in rows]),
        # lenient scores only where something parsed (a plan with nothing parsed has no score, not 0)
        "spearman_logits_vs_generate_lenient": spearman(*zip(*[(r["logits"]["score"], r["generate"]["lenient_score"]) for r in rows if r["generate"]["lenient_parse_rate"] > 0])),
        "plans_with_lenient_parses": float(sum(r["generate"]["lenient_parse_rate"] > 0 for r in rows)),
        "spearman_logits_vs_neg_ppl": spearman(logits, [-r["ppl"] for r in rows]),
        "spearman_logits_vs_neg_ppl_without_gibberish": spearman(*zip(*[(r["logits"]["score"], -r["ppl"]) for r in rows if r["ppl"] < 100])),
        "speedup_logits_vs_generate": float(np.median([r["generate"]["seconds_per_item"] / r["logits"]["seconds_per_item"] for r in rows])),
    }
    for key, value in summary.items():
        print(f"{key:40s} {value:.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "items": args.items, "max_tokens": args.max_tokens, "summary": summary, "rows": rows}
    (OUT / "eqbench_rank.json").write_text(json.dumps(result, indent=2))
    plot_rank(rows, OUT / "eqbench_rank.png")


def plot_rank(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "lenient_score", "generation, lenient parse (plans with parses)"), (axes[1], "score", "generation, official parse")):
        shown = [r for r in rows if key == "score" or r["generate"]["lenient_parse_rate"] > 0]  # nothing parsed: no score
        xs = [r["logits"]["score"] for r in shown]
        ys = [r["generate"][key] for r in shown]
        ax.scatter(xs, ys)
        for x, y, r in zip(xs, ys, shown):
            ax.annotate(r["plan"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("logits mode score (expected value)")
        ax.set_ylabel(f"{label} score")
        ax.set_title(f"per plan: logits vs {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("base")
    p.add_argument("--official", default=str(OFFICIAL))
    p.add_argument("--max-tokens", type=int, default=512)
    p = sub.add_parser("rank")
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--from-json", action="store_true", help="recompute the summary and plot from eqbench_rank.json")
    args = parser.parse_args()
    if args.command == "rank" and args.from_json:
        return summarize_rank(json.loads((OUT / "eqbench_rank.json").read_text())["rows"], args)
    {"base": cmd_base, "rank": cmd_rank}[args.command](args)


if __name__ == "__main__":
    main()
