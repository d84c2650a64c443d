"""Do probes rank plans as the held-out benchmark does? The bundled model, 12 plans of different
depth and the base, two of the plans gibberish (they drop the last layers).

    python benchmarks/probe_transfer.py [--eq-items 8] [--math-items 16] [--heldout-eq 64]

Probes (the sweep's objective, eval=probe): ``math`` (a subset of the shipped 64) and ``eq`` (a
subset of the shipped 32 EQ-Bench items, rated 0-10 per emotion), logits mode, coverage gate
relative to the base. Validation (held out, none of the probes' items): ``math_heldout`` (64 more
problems) and the official EQ-Bench v2 questions (a subset of the 171, shipped), in logits mode: the
bundled 135M model never writes EQ-Bench's answer format, and answers no held-out math problem
right when it generates (both published modes score every plan 0, which ranks nothing; measured
here on the base and printed). Prints a table and writes results/benchmarks/probe_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.eqbench_eval import EQBenchEval  # noqa: E402
from evals.probe_eval import PER_METRIC, ProbeConfig, ProbeEval  # noqa: E402
from evals.schema import Field  # noqa: E402
from merge_core.gguf_merge import merge_gguf  # noqa: E402
from merge_core.layer_plan import LayerPlan  # noqa: E402
from merge_core.model_files import bundled_model_path  # noqa: E402
from sweep.results.validation import spearman  # noqa: E402

OUT = ROOT / "results" / "benchmarks"
BASE = "0-30"
GIBBERISH = ("0-26", "0-20,16-24")  # the last 4 and 6 layers dropped: the output is no longer language
METRICS = ("logprob", "accuracy", "score")  # what a probe can be ranked by
PLANS = [
    BASE, "0-20,14-30", "0-16,8-30", "0-12,6-30", "0-24,18-30", "0-12,8-20,16-30", "0-10,6-16,12-22,18-30",
    "0-14,10-18,14-30", "0-8,4-12,8-16,12-20,16-24,20-30", "0-18,10-22,12-30", "0-28", *GIBBERISH,
]  # fmt: skip


def timed(evaluation, model, base):
    start = time.perf_counter()
    record = evaluation.record(model, base)
    return record, time.perf_counter() - start


def transfer(rows: list[dict], name: str, metric: str) -> dict:
    """How the probe ``name`` ranked by ``metric`` agrees with its held-out benchmark."""
    column, validated = f"probe_{name}_{metric}", f"validated_{name}"
    sane = [r for r in rows if not r["gibberish"]]
    gibberish = [r for r in rows if r["gibberish"]]
    return {
        "spearman": spearman([r[column] for r in rows], [r[validated] for r in rows]),
        "spearman_without_gibberish": spearman([r[column] for r in sane], [r[validated] for r in sane]),
        "gibberish_last": all(r[column] <= min(o[column] for o in sane) for r in gibberish),
        "gibberish_below_base": all(r[column] < rows[0][column] for r in gibberish),
        "ranked": [r["plan"] for r in sorted(rows, key=lambda r: -r[column])],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--math-items", type=int, default=16)
    parser.add_argument("--eq-items", type=int, default=4, help="shipped EQ-Bench items probed (x 4 emotions)")
    parser.add_argument("--heldout-eq", type=int, default=48, help="official EQ-Bench items validated (of 171)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", help="the plans' rows as an earlier run printed them (JSON lines): summarize those")
    args = parser.parse_args()
    source, threads = bundled_model_path(), args.threads
    probes = {
        "math": ProbeEval(ProbeConfig(probes=("math",), n_items=args.math_items, threads=threads), source),
        "eq": ProbeEval(ProbeConfig(probes=("eq",), n_items=args.eq_items, threads=threads), source),
    }
    held_out = {
        "math": ProbeEval(ProbeConfig(probes=("math_heldout",), threads=threads), source),
        "eq": EQBenchEval("official", n_items=args.heldout_eq, mode="logits", threads=threads),
    }
    validated_field = {"math": Field.PROBE, "eq": Field.EQBENCH}
    published_math = ProbeConfig(("math_heldout",), "accuracy", mode="generate", n_items=16, threads=threads)
    published = {  # the published modes, on the base only: every plan of this model scores 0 in them
        "math (generate)": (ProbeEval(published_math, source), Field.PROBE),
        "eq (generate, 512 tokens)": (EQBenchEval("official", n_items=2, threads=threads), Field.EQBENCH),
    }
    rows, base_records = [], {}
    if args.rows:
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
    with tempfile.TemporaryDirectory() as tmp:
        for plan_text in PLANS[len(rows) :]:
            plan = LayerPlan.parse(plan_text)
            path = source if plan_text == BASE else Path(tmp) / "plan.gguf"
            if path != source:
                path.unlink(missing_ok=True)
                merge_gguf(source, plan, path)
            row = {"plan": plan_text, "n_layers": plan.n_layers, "gibberish": plan_text in GIBBERISH}
            for name in probes:
                record, seconds = timed(probes[name], path, base_records.get(("probe", name)))
                base_records.setdefault(("probe", name), record)
                row[f"probe_{name}"] = record[Field.PROBE]
                for metric, field in PER_METRIC.items():
                    row[f"probe_{name}_{metric}"] = record[field]
                row[f"probe_{name}_seconds"] = round(seconds, 2)
                record, seconds = timed(held_out[name], path, base_records.get(("held", name)))
                base_records.setdefault(("held", name), record)
                row[f"validated_{name}"] = record[validated_field[name]]
                row[f"validated_{name}_seconds"] = round(seconds, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    base_published = {}
    for label, (evaluation, field) in published.items():
        record, seconds = timed(evaluation, source, None)
        items = len(evaluation.items)
        base_published[label] = {"score": record[field], "seconds": round(seconds, 2), "items": items}
    summary = {}
    for name in probes:
        probe_seconds = sum(r[f"probe_{name}_seconds"] for r in rows) / len(rows)
        validated_seconds = sum(r[f"validated_{name}_seconds"] for r in rows) / len(rows)
        summary[name] = {
            "probe_seconds_per_plan": round(probe_seconds, 2),
            "validated_seconds_per_plan": round(validated_seconds, 2),
            "cost_ratio": round(probe_seconds / validated_seconds, 3),
            **{metric: transfer(rows, name, metric) for metric in METRICS},
        }
    print(f"\n{'plan':34s} {'layers':>6s} {'math':>8s} {'math_ho':>8s} {'eq':>8s} {'eq_ho':>8s}")
    for r in rows:
        values = f"{r['probe_math']:8.3f} {r['validated_math']:8.3f} {r['probe_eq']:8.3f} {r['validated_eq']:8.2f}"
        print(f"{r['plan']:34s} {r['n_layers']:6d} {values}{'  (gibberish)' if r['gibberish'] else ''}")
    for name, s in summary.items():
        seconds = f"probe {s['probe_seconds_per_plan']} s vs validated {s['validated_seconds_per_plan']} s per plan"
        print(f"{name}: {seconds} (ratio {s['cost_ratio']})")
        for metric in METRICS:
            m = s[metric]
            print(f"  by {metric:8s}: Spearman {m['spearman']:.2f} (without gibberish "
                  f"{m['spearman_without_gibberish']:.2f}), gibberish last {m['gibberish_last']}, "
                  f"below the base {m['gibberish_below_base']}")  # fmt: skip
    print("published modes on the base:", base_published)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args), "rows": rows,
              "summary": summary, "published_on_base": base_published}  # fmt: skip
    (OUT / "probe_transfer.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
