"""GGUF merge speed vs a plain file copy of the same size, and perplexity tokens/s, on the bundled model.
Plans named ``a:..,b:..`` merge from two files: the bundled model (a) and its layers requantized to
Q8_0 (b, written once here), as a frankenmerge of two fine-tunes does.

    python benchmarks/merge_speed.py [--repeats 7] [--windows 8]

Prints a table and writes results/benchmarks/merge_speed.json. Both the merge and the copy read
from the page cache (the base is read once before timing), so the figure compares the work each
does, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from evals.ppl_eval import PerplexityEval
from merge_core.gguf_merge import merge_gguf
from merge_core.gguf_quantize import quantize_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import bundled_model_path

PLANS = ["0-30", "0-16,8-30", "0-10,6-16,12-22,18-30", "0-12,8-20,16-30",
         "a:0-16,b:8-30", "a:0-10,b:6-16,a:12-22,b:18-30"]  # fmt: skip


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="results/benchmarks/merge_speed.json")
    args = parser.parse_args()

    base = bundled_model_path()
    base.read_bytes()  # warm the page cache for both contenders
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"a": base, "b": quantize_gguf(base, tmp / "b.Q8_0.gguf", "Q8_0", allow_requantize=True)}
        sources["b"].read_bytes()
        for text in PLANS:
            plan = LayerPlan.parse(text)
            out = tmp / "merged.gguf"
            source = sources if plan.sources else base
            merge_s = median_seconds(lambda: merge_gguf(source, plan, out), args.repeats)
            size = out.stat().st_size
            copy_s = median_seconds(lambda: shutil.copyfile(out, tmp / "copy.gguf"), args.repeats)
            rows.append(
                {"plan": text, "n_layers": plan.n_layers, "mb": round(size / 2**20, 1), "merge_s": round(merge_s, 4),
                 "copy_s": round(copy_s, 4), "merge_vs_copy_speed": round(copy_s / merge_s, 3),
                 "merge_mb_per_s": round(size / 2**20 / merge_s)}  # fmt: skip
            )

        evaluate = PerplexityEval(base, "stdlib-docstrings", n_ctx=512, windows=args.windows)
        ppl_rows = []
        for text in ["0-30", "0-16,8-30"]:
            path = merge_gguf(base, LayerPlan.parse(text), tmp / f"{text}.gguf")
            result = evaluate(path)
            ppl_rows.append({"plan": text, "ppl": round(result.ppl, 4), "tokens": result.n_tokens_evaluated,
                             "seconds": round(result.seconds, 2), "tokens_per_second": round(result.tokens_per_second, 1)})  # fmt: skip

    print(f"{'plan':<24}{'layers':>7}{'MiB':>8}{'merge s':>10}{'copy s':>10}{'merge/copy speed':>18}")
    for r in rows:
        print(f"{r['plan']:<24}{r['n_layers']:>7}{r['mb']:>8}{r['merge_s']:>10.3f}{r['copy_s']:>10.3f}{r['merge_vs_copy_speed']:>18.2f}")
    print(f"\n{'plan':<24}{'ppl':>10}{'tokens':>8}{'seconds':>9}{'tok/s':>8}   (n_ctx 512, stdlib docstrings, {os.cpu_count()} threads)")
    for r in ppl_rows:
        print(f"{r['plan']:<24}{r['ppl']:>10.4f}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_second']:>8.1f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "merge": rows, "perplexity": ppl_rows}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
