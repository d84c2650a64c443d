"""How fast each sampler finds the best plans, replayed on a fully scored landscape.

    python benchmarks/search_efficiency.py landscape   # score every plan of the space once (cached, resumable)
    python benchmarks/search_efficiency.py replay      # replay samplers on the cached scores; table, JSON, plots

The landscape: every plan of the ``uniform`` space with ``n_middle`` in [0, 2] on the bundled model,
scored by a cheap objective (perplexity, one window of 256 tokens of stdlib docstrings). Scores
go to results/benchmarks/landscape.csv as they come, so an interrupted run picks up where it was.
The replay runs each sampler against those cached scores (no merge, no eval) for several seeds
and reports the median number of evaluations to reach the best plan and the top 1%.
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
from sweep.spaces import UniformSpaceConfig, build_space

OUT = Path("results/benchmarks")
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
            writer.writerow([text, LayerPlan.parse(text).n_layers, f"{ppl:.6f}", f"{time.perf_counter() - start:.2f}"])
            f.flush()
            if i % 25 == 0:
                print(f"{i}/{len(todo)}", flush=True)
