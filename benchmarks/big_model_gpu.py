"""A 72B-class base on one GPU, its layers quantized in memory (backend.load_in): build, memory,
perplexity trials/hour of self-merge plans that share the quantized layers.

    python benchmarks/big_model_gpu.py [--load-in nf4 int8] [--layers 80] [--windows 16] [--n-ctx 2048]

A Qwen2-72B-shaped model (hidden 8192, MLP 29568, 64 heads / 8 KV heads, vocab 152064) with random
weights is built on the GPU one layer at a time, each layer's linear weights quantized with
bitsandbytes as ``from_pretrained(quantization_config=...)`` does for ``backend.load_in`` (the bf16
checkpoint would be 136 GB: no disk here holds it, nothing can be downloaded). Each plan then runs
what a torch trial runs: ``merged_model`` (layers shared, no copy) and ``TorchModel.windows_nll`` on
``--windows`` windows of ``--n-ctx`` tokens. Prints a table, writes results/benchmarks/big_model_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evals.torch_model import TorchModel
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import merged_model

RESULTS = Path("results/benchmarks")
PLANS = ["0-80", "0-52,45-80", "0-60,40-80"]  # the base; RYS's (layers 45-51 twice); a 100-layer plan
GIB = 2**30


def _quantized(linear: torch.nn.Linear, load_in: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if load_in == "nf4":
        out = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta"
        )  # on meta: bitsandbytes would otherwise initialise a full-size weight on the CPU first (5 s a layer)
        out.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4"
        )  # quantized on .cuda()
    else:
        out = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias, has_fp16_weights=False, device="meta"
        )
        out.weight = bnb.nn.Int8Params(
            linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
        )  # from CPU only
    if bias:
        out.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return out.cuda()  # bitsandbytes quantizes as the weight moves to the GPU


def build(n_layers: int, load_in: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=8192, intermediate_size=29568, num_hidden_layers=n_layers, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    torch.manual_seed(0)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head, model.model.rotary_emb):
        module.to_empty(device="cuda")
    model.model.rotary_emb.__init__(config, device="cuda")  # its inverse frequencies are computed, not loaded
    start = time.perf_counter()
    for index, layer in enumerate(model.model.layers):
        if index % 20 == 0:
            print(f"building layer {index} of {n_layers} ({load_in}), {time.perf_counter() - start:.0f} s", flush=True)
        layer.to_empty(device="cuda")
        for name, child in list(layer.named_modules()):
            if isinstance(child, torch.nn.Linear):
                torch.nn.init.normal_(child.weight, std=0.02)
                if child.bias is not None:
                    torch.nn.init.zeros_(child.bias)
                parent = layer.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], _quantized(child, load_in))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            torch.nn.init.ones_(norm.weight)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.02)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    torch.nn.init.ones_(model.model.norm.weight)
    return model.eval().requires_grad_(False), config


class _NoTokenizer:  # windows are token ids already; TorchModel asks only for the BOS
    bos_token_id = None


def run(load_in: str, n_layers: int, n_windows: int, n_ctx: int, batch: int) -> list[dict]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    base, config = build(n_layers, load_in)
    build_s = time.perf_counter() - start
    base_bytes = torch.cuda.memory_allocated()
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config.vocab_size, (n_windows, n_ctx), generator=generator).tolist()
    rows = []
    for text in PLANS:
        plan = LayerPlan.parse(text.replace("80", str(n_layers)))
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        model = merged_model(base, plan)
        merge_s = time.perf_counter() - t0
        extra = torch.cuda.memory_allocated() - before
        scorer = TorchModel(model, _NoTokenizer(), n_ctx=n_ctx, batch_windows=batch)
        scorer.windows_nll(windows[:batch], n_ctx // 2)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nll = scorer.windows_nll(windows, n_ctx // 2)
        torch.cuda.synchronize()
        score_s = time.perf_counter() - t0
        tokens = n_windows * n_ctx
        rows.append({"load_in": load_in, "plan": str(plan), "layers": plan.n_layers, "build_base_s": round(build_s, 1),
                     "base_gib": round(base_bytes / GIB, 2),
                     "plan_extra_bytes": extra, "merge_ms": round(merge_s * 1000, 2), "score_s": round(score_s, 2),
                     "tok_per_s": round(tokens / score_s), "trials_per_hour": round(3600 / (score_s + merge_s)),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 1),
                     "mean_nll": round(float(sum(x.mean() for x in nll) / len(nll)), 3)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del model, scorer
    del base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load-in", nargs="+", default=["nf4", "int8"])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    args = parser.parse_args()
    rows = [
        row
        for load_in in args.load_in
        for row in run(load_in, args.layers, args.windows, args.n_ctx, args.batch)
    ]
    print(f"\n{torch.cuda.get_device_name()}, {args.windows} x {args.n_ctx} tokens a trial")
    print(
        "| load_in | plan | layers | base GiB | extra bytes for the plan | score s | tok/s | ppl trials/h | peak GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['load_in']} | `{r['plan']}` | {r['layers']} | {r['base_gib']} | {r['plan_extra_bytes']} | {r['score_s']} | "
              f"{r['tok_per_s']:,} | {r['trials_per_hour']} | {r['peak_gib']} |")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "big_model_gpu.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
