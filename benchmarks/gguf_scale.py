"""GGUF merges with attenuated repeats: speed against copying the output, and how exact the scaled blocks are.

    python benchmarks/gguf_scale.py [--plan 0-16,8-30@qk=0.7071067812,out=0.5] [--repeats 3]

The bundled SmolLM2 (Q4_1), and the same model quantized here to Q8_0 and Q4_K_M by llama.cpp (from its
f16 conversion). For each: the merge's wall time with and without the plan's scales, and ``cp`` of the
output (page cache flushed before each run), as a ratio; then, over every tensor the scales multiply, the
largest difference of the merged tensor to the exact product (factor x the source's dequantized values)
and to dequantize-scale-requantize (gguf-py's quantizer, for the types it has), each relative to the
tensor's largest value. Prints a table and writes results/benchmarks/gguf_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from merge_core.gguf_convert import convert_hf_to_gguf
from merge_core.gguf_merge import merge_gguf, merged_tensor_order, scaled_factors
from merge_core.gguf_quantize import quantize_gguf
from merge_core.gguf_to_hf import export_hf_folder
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import bundled_model_path
from merge_core.sources import gguf_sources

RESULTS = Path("results/benchmarks")


def timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        os.sync()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deviations(source: Path, merged: Path, plan: LayerPlan) -> dict:
    """Largest relative difference of the scaled tensors to the exact product and to requantizing."""
    headers = gguf_sources(source, plan)
    order = merged_tensor_order(headers, plan)
    factors = scaled_factors(headers, plan, order)
    origin = {name: tensor.name for name, _, tensor in order}
    source_tensors = {t.name: t for t in GGUFReader(source).tensors}
    out = {t.name: t for t in GGUFReader(merged).tensors}
    worst = {
        "vs_exact": 0.0,
        "vs_requantized": None,
        "requantized_vs_exact": None,
        "tensors": len(factors),
        "types": set(),
    }
    for name, factor in factors.items():
        src, got = source_tensors[origin[name]], out[name]
        values = dequantize(src.data, src.tensor_type)
        exact, merged_values = factor * values, dequantize(got.data, got.tensor_type)
        scale = float(np.abs(exact).max()) or 1.0
        worst["vs_exact"] = max(worst["vs_exact"], float(np.abs(merged_values - exact).max()) / scale)
        worst["types"].add(src.tensor_type.name)
        try:
            requantized = dequantize(quantize(exact.astype(np.float32), src.tensor_type), src.tensor_type)
        except NotImplementedError:  # gguf-py has no quantizer for the k-quants
            continue
        for key, value in (("vs_requantized", np.abs(merged_values - requantized).max()),
                           ("requantized_vs_exact", np.abs(requantized - exact).max())):  # fmt: skip
            worst[key] = max(worst[key] or 0.0, float(value) / scale)
    worst["types"] = sorted(worst["types"])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="0-16,8-30@qk=0.7071067812,out=0.5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plan = LayerPlan.parse(args.plan)
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the disk results/ is on
        tmp = Path(tmp)
        f16 = convert_hf_to_gguf(export_hf_folder(bundled_model_path(), tmp / "hf"), tmp / "base.f16.gguf")
        models = {
            "Q4_1": bundled_model_path(),
            **{q: quantize_gguf(f16, tmp / f"base.{q}.gguf", q) for q in ("Q8_0", "Q4_K_M")},
        }
        for name, source in models.items():
            out, plain, copy = tmp / "scaled.gguf", tmp / "plain.gguf", tmp / "copy.gguf"
            scaled_s = timed(
                lambda: (out.unlink(missing_ok=True), merge_gguf(source, plan, out)), args.repeats
            )
            plain_s = timed(
                lambda: (plain.unlink(missing_ok=True), merge_gguf(source, plan.unscaled(), plain)),
                args.repeats,
            )
            cp_s = timed(lambda: (copy.unlink(missing_ok=True), subprocess.run(["cp", str(out), str(copy)], check=True)),
                         args.repeats)  # fmt: skip
            rows.append({"base": name, "plan": str(plan), "output_mb": round(out.stat().st_size / 2**20, 1),
                         "scaled_merge_s": round(scaled_s, 3), "unscaled_merge_s": round(plain_s, 3),
                         "cp_s": round(cp_s, 3), "scaled_over_cp": round(scaled_s / cp_s, 2),
                         **deviations(source, out, plan)})  # fmt: skip
    columns = list(rows[0])
    print("  ".join(f"{c:>20s}" for c in columns))
    for row in rows:
        print("  ".join(f"{str(row[c]):>20s}" for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf_scale.json").write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'gguf_scale.json'}")


if __name__ == "__main__":
    main()
