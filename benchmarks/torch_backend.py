"""The in-memory torch backend: merge time, perplexity tokens/s, memory, trials/hour.

    python benchmarks/torch_backend.py cpu                 # bundled SmolLM2: torch vs llama.cpp, same plan
    python benchmarks/torch_backend.py gpu [--batch 8 16]  # 7B-shaped Mistral, random bf16 weights, 48-layer plan

``gpu`` builds the model on the device (no download), scores 64 windows of 512 tokens (32k tokens,
one perplexity-only trial) per batch size and reports trials/hour against the bf16 matrix-multiply
limit (6 x params x tokens FLOPs at the GPU's peak is not reached by any framework; the issue's
yardstick of ~4,000 trials/hour for the H100 is used as the limit). Prints a table and writes
results/benchmarks/torch_backend_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from evals.perplexity import make_windows, perplexity
from evals.torch_model import TorchModel, compiled_layer_fn, run_layer
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import merged_model

RESULTS = Path("results/benchmarks")
LIMIT_TRIALS_PER_HOUR = 4000  # bf16 matrix-multiply bound for this shape and token count on one H100


def _median_ms(fn, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cpu(args) -> dict:
    from evals.llama_cpp_model import LlamaCppModel
    from evals.corpus import load_text
    from merge_core.gguf_merge import merge_gguf
    from merge_core.model_files import bundled_model_path
    from merge_core.torch_merge import load_causal_lm
    import tempfile

    plan = LayerPlan.parse(args.plan)
    gguf = bundled_model_path()
    base, tokenizer = load_causal_lm(gguf, "float32", "cpu")
    model = TorchModel(merged_model(base, plan), tokenizer, n_ctx=512, batch_windows=args.batch[0])
    windows = make_windows(model.tokenize(load_text("stdlib-docstrings", max_chars=args.windows * 512 * 8)), 512, args.windows, model.bos_for_windows)
    merge_ms = _median_ms(lambda: merged_model(base, plan))
    torch_result = perplexity(model, windows)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        merged = merge_gguf(gguf, plan, Path(tmp) / "m.gguf")
        gguf_merge_ms = (time.perf_counter() - start) * 1000
        with LlamaCppModel(merged, n_ctx=512) as llama:
            llama_result = perplexity(llama, windows)
    rows = [
        {"backend": "torch fp32 (in memory)", "merge_ms": round(merge_ms, 2), "ppl": round(torch_result.ppl, 4), "tokens_per_s": round(torch_result.tokens_per_second)},
        {"backend": "llama.cpp Q4_1 (GGUF file)", "merge_ms": round(gguf_merge_ms, 1), "ppl": round(llama_result.ppl, 4), "tokens_per_s": round(llama_result.tokens_per_second)},
    ]
    return {"plan": str(plan), "windows": args.windows, "threads": torch.get_num_threads(), "rows": rows}


def gpu(args) -> dict:
    from transformers import AutoModelForCausalLM, MistralConfig

    device = torch.device("cuda")
    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval().requires_grad_(False)
    plan = LayerPlan.parse(args.plan)
    compile_seconds = None
    layer_fn = compiled_layer_fn() if args.compile else run_layer
    if args.compile:  # the one-off compilation, timed apart from the trials
        start = time.perf_counter()
        for batch in args.batch:
            warm = TorchModel(merged_model(base, plan), tokenizer=None, n_ctx=512, batch_windows=batch, layer_fn=layer_fn)
            perplexity(warm, torch.randint(0, config.vocab_size, (batch, 512)).tolist())
        compile_seconds = round(time.perf_counter() - start, 1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    merged = merged_model(base, plan)
    extra_bytes = torch.cuda.memory_allocated() - before
    merge_ms = _median_ms(lambda: merged_model(base, plan))
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config.vocab_size, (args.windows, 512), generator=generator).tolist()
    rows = []
    for batch in args.batch:
        model = TorchModel(merged_model(base, plan), tokenizer=None, n_ctx=512, batch_windows=batch, layer_fn=layer_fn)  # a fresh plan object: no recompilation
        perplexity(model, windows[: batch * 2])  # warm-up: kernels chosen, memory pooled
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.repeats):
            result = perplexity(model, windows)
            torch.cuda.synchronize()
            seconds.append(result.seconds)
        trial_seconds = statistics.median(seconds) + merge_ms / 1000
        rows.append({
            "batch_windows": batch, "ppl_seconds": round(statistics.median(seconds), 3), "tokens_per_s": round(len(windows) * 512 / statistics.median(seconds)),
            "trials_per_hour": round(3600 / trial_seconds), "fraction_of_limit": round(3600 / trial_seconds / LIMIT_TRIALS_PER_HOUR, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        })  # fmt: skip
    return {
        "device": torch.cuda.get_device_name(), "shape": "Mistral-7B (random bf16)", "plan": str(plan), "n_layers": plan.n_layers,
        "base_gib": round(before / 2**30, 2), "extra_bytes_for_merge": extra_bytes, "merge_ms": round(merge_ms, 3),
        "tokens_per_trial": len(windows) * 512, "compiled": args.compile, "compile_seconds": compile_seconds, "rows": rows,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--plan", help="default: 0-16,8-30 (cpu), 0-24,8-32 = 48 layers (gpu)")
    parser.add_argument("--windows", type=int, help="windows of 512 tokens (default: 8 cpu, 64 gpu)")
    parser.add_argument("--batch", type=int, nargs="+", help="windows per forward pass (default: 4 cpu; 8 16 32 gpu)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layer (backend.compile=true)")
    args = parser.parse_args()
    gpu_mode = args.mode == "gpu"
    args.plan = args.plan or ("0-24,8-32" if gpu_mode else "0-16,8-30")
    args.windows = args.windows or (64 if gpu_mode else 8)
    args.batch = args.batch or ([8, 16, 32] if gpu_mode else [4])
    result = {"machine": platform.node(), "torch": torch.__version__, **(gpu(args) if gpu_mode else cpu(args))}
    print(f"plan {result['plan']}" + (f" on {result['device']}, merge {result['merge_ms']} ms, extra memory {result['extra_bytes_for_merge']} B" if gpu_mode else ""))
    columns = list(result["rows"][0])
    print("  ".join(f"{c:>22s}" for c in columns))
    for row in result["rows"]:
        print("  ".join(f"{str(row[c]):>22s}" for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"torch_backend_{args.mode}{'_compiled' if args.compile else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
