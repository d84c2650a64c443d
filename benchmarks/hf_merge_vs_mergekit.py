"""Safetensors self-merge: selfmerge vs mergekit-yaml on the same recipe and model.

    python benchmarks/hf_merge_vs_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml [--shard 120MB]

The model is the bundled SmolLM2 written out as an HF folder (dequantized, float32, sharded at
--shard). Plans that name sources (``a:0-16,b:8-30``) are frankenmerges of several "fine-tunes":
``a`` is that folder, ``b`` and ``c`` copies of it with every weight nudged by seeded noise; a
suffix ``|c`` takes every tensor outside the layers from c (model.base, ``--base c``). Plans with scales
(``0-16,8-30@qk=0.7071,out=0.5``, attenuated repeats) give mergekit its ``parameters: scale`` filters. Each tool
runs in its own process; wall time and peak RSS of that process are measured,
then every tensor of the two outputs is compared (names, dtypes, shapes, bytes). mergekit is not a
dependency: install it in a separate virtualenv (``pip install torch==2.13.0 mergekit``).
Prints a table and writes results/benchmarks/hf_merge_vs_mergekit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from merge_core.architectures import of_model
from merge_core.gguf_to_hf import export_hf_folder
from merge_core.hf_checkpoint import HFCheckpoint
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.model_files import bundled_model_path
from sweep.config import parse_size

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]
from tiny_models import build_finetune  # noqa: E402

RESULTS = Path("results/benchmarks")
# run a command, print its own wall time and peak RSS (its children's, from this wrapper's view)
MEASURE = "import resource,subprocess,sys,time; t=time.perf_counter(); r=subprocess.run(sys.argv[1:]).returncode; print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r)"


def measured(command: list[str], out: Path, repeats: int) -> tuple[float, float]:
    """Median wall time and peak RSS (MiB) over ``repeats`` runs; dirty pages of the run before are
    flushed first (os.sync) so that no run pays for another's writes."""
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        fields = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True).stdout.split()
        if int(fields[-1]) != 0:
            raise SystemExit(f"{command[0]} failed with status {fields[-1]}")
        runs.append((float(fields[-3]), int(fields[-2]) / 1024))
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def differences(a: Path, b: Path) -> list[str]:
    left, right = HFCheckpoint.open(a).tensors, HFCheckpoint.open(b).tensors
    problems = [f"only in one output: {name}" for name in sorted(set(left) ^ set(right))]
    for name in sorted(set(left) & set(right)):
        x, y = left[name], right[name]
        with open(x.file, "rb") as fx, open(y.file, "rb") as fy:
            fx.seek(x.offset)
            fy.seek(y.offset)
            if (x.dtype, x.shape) != (y.dtype, y.shape) or fx.read(x.n_bytes) != fy.read(y.n_bytes):
                problems.append(f"differs: {name}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="the mergekit-yaml executable (in its own virtualenv)")
    parser.add_argument("--plans", nargs="+", default=["0-16,8-30", "0-10,6-16,12-22,18-30", "a:0-16,b:8-30",
                                                        "b:0-20,c:10-30", "a:0-10,b:6-16,c:12-22,a:18-30",
                                                        "a:0-16,b:8-30|c",
                                                        # attenuated repeats: mergekit #198's factors, a scale on
                                                        # the repeated part of a slice only, two sources
                                                        "0-16,8-30@qk=0.7071067812,mlp_out=0.5",
                                                        "0-10,5-12,10-20@out=0.5",
                                                        "a:0-16,a:8-20,b:16-30@qk=0.7071067812,out=0.5"])  # fmt: skip
    parser.add_argument("--shard", default="120MB", help="shard size of the source and of both outputs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shard_bytes = parse_size(args.shard, "--shard")
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # beside the repo: the same disk as results/
        tmp = Path(tmp).resolve()
        from transformers import AutoModelForCausalLM  # the source, sharded as hub checkpoints are

        folder = export_hf_folder(bundled_model_path(), tmp / "whole")
        AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp / "source", max_shard_size=shard_bytes)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (folder / name).is_file():
                (tmp / "source" / name).write_bytes((folder / name).read_bytes())
        source = tmp / "source"
        sources = {"a": source, **{name: build_finetune(source, tmp / name, seed) for name, seed in (("b", 1), ("c", 2))}}
        largest_shard = max(p.stat().st_size for p in source.glob("*.safetensors"))
        for text in args.plans:
            plan_text, _, base = text.partition("|")
            plan = LayerPlan.parse(plan_text)
            used = {name: str(sources[name]) for name in plan.source_names + ((base,) if base else ())}
            recipe = tmp / "recipe.yml"
            yaml = plan_to_mergekit_yaml(plan, used or str(source), "float32", base or None, of_model(source))
            recipe.write_text(yaml)
            ours, theirs = tmp / f"ours-{len(rows)}", tmp / f"mergekit-{len(rows)}"
            models = [f"{name}={path}" for name, path in used.items()] or [str(source)]
            selfmerge_cmd = [sys.executable, "-m", "sweep.cli", "merge", *models, "--plan", plan_text,
                             "--out", str(ours), "--out-shard-size", str(shard_bytes),
                             *(["--base", base] if base else [])]  # fmt: skip
            ours_s, ours_mb = measured(selfmerge_cmd, ours, args.repeats)
            theirs_s, theirs_mb = measured([args.mergekit, str(recipe), str(theirs), "--out-shard-size", f"{shard_bytes // 10**6}M", "--copy-tokenizer"], theirs, args.repeats)
            problems = differences(ours, theirs)
            rows.append({
                "plan": text, "n_layers": plan.n_layers, "selfmerge_s": round(ours_s, 2), "mergekit_s": round(theirs_s, 2),
                "speedup": round(theirs_s / ours_s, 1), "selfmerge_peak_rss_mb": round(ours_mb), "mergekit_peak_rss_mb": round(theirs_mb),
                "rss_over_largest_shard": round(ours_mb * 2**20 / largest_shard, 2), "tensors_differing": len(problems),
            })  # fmt: skip
            print(*(problems[:5] or ["identical tensors"]))
    result = {"model": "SmolLM2-135M-Instruct (float32, dequantized)", "largest_source_shard_mb": round(largest_shard / 2**20), "rows": rows}
    columns = list(rows[0])
    print("  ".join(f"{c:>22s}" for c in columns))
    for row in rows:
        print("  ".join(f"{str(row[c]):>22s}" for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hf_merge_vs_mergekit.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'hf_merge_vs_mergekit.json'}")


if __name__ == "__main__":
    main()
