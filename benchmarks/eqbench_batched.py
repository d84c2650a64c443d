"""EQ-Bench generation on the torch backend, one item at a time vs all items batched (chat_batch).

    python benchmarks/eqbench_batched.py gpu --tokenizer DIR --questions eq_bench_v2_questions_171.json [--with-generate]
    python benchmarks/eqbench_batched.py cpu

gpu: a 7B-shaped Mistral (hidden 4096, 32 layers, 8 KV heads, vocab 49152) with random bf16 weights is
built on the GPU and saved as an HF folder with the given tokenizer, loaded by the torch backend as a
sweep loads it, and a 48-layer plan (0-24,8-32) answers the questions with the official prompts at
``--max-tokens`` (random weights never stop early: the worst case). Batched: every item, as a trial
runs them; one at a time: ``--unbatched-items`` items, the per-trial time extrapolated.
cpu: the bundled SmolLM2 dequantized (fp32), 8 offline items at 64 tokens: times and whether batched
and one-at-a-time greedy text are identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evals.eqbench_eval import EQBenchEval, _messages
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import merged_model
from sweep.trials.backends import TorchBackend
from sweep.config import BackendConfig

RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def build_7b(folder: Path, tokenizer: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=49152, max_position_embeddings=32768, sliding_window=None,
                           initializer_range=0.02, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    del model
    torch.cuda.empty_cache()
    return folder


def measure(backend: TorchBackend, plan: LayerPlan, questions: str, n_items: int, max_tokens: int, unbatched: int,
            with_generate: bool = False) -> dict:  # fmt: skip
    model = merged_model(backend.base, plan)
    evaluation = EQBenchEval(questions, n_items=n_items, max_tokens=max_tokens, n_ctx=2048, open_model=backend.open_model)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with backend.open_model(model, n_ctx=2048) as chat_model:
        prompts = [len(chat_model.chat_prompt_tokens(_messages(item))) for item in evaluation.items]
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        sync()
        start = time.perf_counter()
        batched = chat_model.chat_batch([_messages(item) for item in evaluation.items], max_tokens)
        sync()
        batched_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        generate_s = None
        if with_generate:  # the same batches through transformers' generate (static cache), same process
            chat_model._static_decoding = lambda: False
            sync()
            start = time.perf_counter()
            chat_model.chat_batch([_messages(item) for item in evaluation.items], max_tokens)
            sync()
            generate_s = time.perf_counter() - start
            del chat_model._static_decoding
        start = time.perf_counter()
        one_by_one = [chat_model.chat(_messages(item), max_tokens) for item in evaluation.items[:unbatched]]
        sync()
        unbatched_s = time.perf_counter() - start
    new_tokens = [len(chat_model.tokenize(text)) for text in batched]
    return {
        "plan": str(plan), "n_layers": plan.n_layers, "items": len(evaluation.items), "max_tokens": max_tokens,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1), "batched_seconds": round(batched_s, 2),
        "batched_tokens_per_second": round(len(evaluation.items) * max_tokens / batched_s, 1),
        "reply_tokens_mean": round(sum(new_tokens) / len(new_tokens), 1),
        "unbatched_items": unbatched, "unbatched_seconds_per_item": round(unbatched_s / unbatched, 2),
        "unbatched_seconds_per_trial": round(unbatched_s / unbatched * len(evaluation.items), 1),
        "speedup": round(unbatched_s / unbatched * len(evaluation.items) / batched_s, 1),
        "identical_where_compared": sum(a == b for a, b in zip(one_by_one, batched)), "peak_gib": peak and round(peak, 1),
        **({"generate_batched_seconds": round(generate_s, 2)} if generate_s is not None else {}),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("where", choices=["gpu", "cpu"])
    parser.add_argument("--tokenizer", type=Path, help="gpu: a folder with tokenizer.json, tokenizer_config.json, chat_template.jinja")
    parser.add_argument("--questions", default="offline")
    parser.add_argument("--items", type=int, default=0, help="0 = all")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--unbatched-items", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/selfmerge-7b"))
    parser.add_argument("--with-generate", action="store_true", help="also time the batches through generate (A/B)")
    args = parser.parse_args()
    if args.where == "gpu":
        start = time.perf_counter()
        source = args.model_dir if (args.model_dir / "config.json").exists() else build_7b(args.model_dir, args.tokenizer)
        built = time.perf_counter() - start
        backend = TorchBackend(source, BackendConfig(kind="torch", dtype="bfloat16"))
        row = {"device": torch.cuda.get_device_name(), "build_and_save_seconds": round(built, 1),
               **measure(backend, LayerPlan.parse("0-24,8-32"), args.questions, args.items, args.max_tokens, args.unbatched_items,
                          args.with_generate)}  # fmt: skip
    else:
        from merge_core.model_files import bundled_model_path

        backend = TorchBackend(bundled_model_path(), BackendConfig(kind="torch", dtype="float32", device="cpu"))
        row = {"device": "cpu", **measure(backend, LayerPlan.parse("0-16,8-30"), "offline", args.items or 8, args.max_tokens, args.items or 8)}
    for key, value in row.items():
        print(f"{key:>32s}  {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"eqbench_batched_{args.where}.json"
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
