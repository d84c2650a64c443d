"""Several GPUs of one host: workers on one study, and one base over several GPUs.

    python benchmarks/multi_gpu.py workers --model DIR [--workers 1 2] [--minutes 3] [--kill-after S]
    python benchmarks/multi_gpu.py spread --model DIR [--plan 0-52,45-80]
    python benchmarks/multi_gpu.py split-check

workers: the real ``selfmerge sweep`` (``backend=torch backend.dtype=bfloat16 sweep.gpus=all
sweep.workers=N``, perplexity on 64 windows of 512 tokens) for ``--minutes`` per worker count:
scored trials/hour (cache hits and the base left out), plans scored twice, trials per worker. With
``--kill-after S`` one worker is SIGKILLed S seconds after the first trial and the retry of its trial
is looked for. With fewer GPUs than workers, workers share GPUs (worker i on GPU i mod GPUs).
spread: the base loaded with ``backend.device_map=auto`` over every visible GPU (needs 2 or more),
a plan built on it: perplexity tokens/s and memory per GPU.
split-check: on one GPU, a tiny fp32 base with half its layers on the CPU under the
hooks accelerate puts on a multi-GPU map: an in-memory plan with repeated layers scores and
generates as on the GPU alone (the tensors cross devices as they would between GPUs).
Prints a table and writes results/benchmarks/multi_gpu_<command>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the repository first: tests/sweep/ would shadow sweep/
RESULTS = REPO / "results" / "benchmarks"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from sweep.cli import main; sys.exit(main())", *args]


def run_workers(model: Path, n: int, minutes: float, root: Path, kill_after: float | None) -> dict:
    """One sweep of ``n`` workers for ``minutes``: its study read back."""
    from sweep.study.open import load_study

    name = f"w{n}{'k' if kill_after else ''}"
    args = [
        "sweep", "model=hf", f"model.path={model}", "backend=torch", "backend.dtype=bfloat16",
        "backend.batch_windows=16", "eval.ppl.windows=64", "sweep.gpus=all", f"sweep.workers={n}",
        "sweep.n_trials=100000", f"sweep.timeout={minutes}m", f"sweep.name={name}",
        f"sweep.results_dir={root}", "sweep.progress=false", "storage.heartbeat_seconds=10",
    ]  # fmt: skip
    start = time.time()
    launcher = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    if kill_after:
        url = f"sqlite:///{root / name / 'study.db'}"
        while killed is None and launcher.poll() is None:
            time.sleep(1)
            try:
                trials = load_study(url, name).get_trials()
            except Exception:
                continue
            first = min((t.datetime_start.timestamp() for t in trials if t.datetime_start), default=None)
            running = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
            if first and time.time() - first > kill_after and running:
                killed = running[-1]
                os.kill(int(killed.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    err = launcher.communicate()[1]
    trials = load_study(f"sqlite:///{root / name / 'study.db'}", name).get_trials()
    scored = [t for t in trials if t.state.name == "COMPLETE" and "cache_hit_of" not in t.user_attrs]
    span = (
        max(t.datetime_complete for t in scored).timestamp()
        - min(t.datetime_start for t in scored).timestamp()
    )
    twice = sum(n > 1 for n in Counter(t.user_attrs["plan"] for t in scored).values())
    row = {"workers": n, "wall_s": round(time.time() - start), "scored": len(scored), "span_s": round(span),
           "scored_trials_per_hour": round(3600 * len(scored) / span), "plans_scored_twice": twice,
           "per_worker": dict(Counter(t.user_attrs["worker"] for t in scored)), "exit": launcher.returncode,
           "stderr_tail": err.strip().splitlines()[-3:]}  # fmt: skip
    if killed is not None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

        retry = [t for t in trials if Retry.retried_trial_number(t) == killed.number]
        state = next(t.state.name for t in trials if t.number == killed.number)
        same_plan = [
            (t.number, t.state.name, t.user_attrs.get("plan") == killed.user_attrs["plan"]) for t in retry
        ]
        row["killed_trial"] = {"number": killed.number, "state": state, "retried_as": same_plan}
    return row


def spread(model: Path, plan: str) -> dict:
    import torch

    from merge_core.layer_plan import LayerPlan
    from merge_core.torch_merge import load_causal_lm, merged_model
    from evals.torch_model import TorchModel

    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        raise SystemExit(f"spread needs 2 or more GPUs; torch sees {n_gpus}")
    start = time.perf_counter()
    base, tokenizer = load_causal_lm(model, "bfloat16", "auto", device_map="auto")
    loaded = time.perf_counter() - start
    before = [torch.cuda.memory_allocated(i) for i in range(n_gpus)]
    merged = merged_model(base, LayerPlan.parse(plan))
    extra = [torch.cuda.memory_allocated(i) - b for i, b in enumerate(before)]
    scorer = TorchModel(merged, tokenizer, n_ctx=2048, batch_windows=4)
    windows = torch.randint(0, base.config.vocab_size, (16, 2048)).tolist()
    scorer.windows_nll(windows[:4], 1023)  # warm-up
    for i in range(n_gpus):
        torch.cuda.synchronize(i)
    start = time.perf_counter()
    scorer.windows_nll(windows, 1023)
    for i in range(n_gpus):
        torch.cuda.synchronize(i)
    seconds = time.perf_counter() - start
    layers = Counter(str(v) for k, v in base.hf_device_map.items() if ".layers." in k)
    return {
        "gpus": n_gpus, "load_s": round(loaded, 1), "plan": plan, "plan_layers": LayerPlan.parse(plan).n_layers,
        "tokens_per_s": round(16 * 2048 / seconds),
        "gib_per_gpu": [round(torch.cuda.max_memory_allocated(i) / 2**30, 1) for i in range(n_gpus)],
        "merge_extra_bytes_per_gpu": extra, "layers_per_gpu": dict(layers),
    }  # fmt: skip


def split_check() -> dict:
    """accelerate's dispatch would offload a "cpu" entry (weights streamed to the GPU), so the hooks of
    a multi-GPU map are put on by hand: layers 3-5 on the CPU, the rest (and the head, which may be
    tied to the embeddings) on GPU 0, each module with the AlignDevicesHook a map gives it."""
    import tempfile

    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from evals.eqbench_eval import EQBenchEval, _messages
    from evals.torch_model import TorchModel
    from merge_core.layer_plan import LayerPlan
    from merge_core.torch_merge import load_causal_lm, merged_model
    from tiny_models import build_tiny

    plan, rows = LayerPlan.parse("0-4,2-6,3-6"), {}
    for kind in ("llama", "qwen2"):
        folder = build_tiny(kind, Path(tempfile.mkdtemp()) / kind, n_layers=6, dtype=torch.float32)
        whole, tokenizer = load_causal_lm(folder, "float32", "cuda")
        split, _ = load_causal_lm(folder, "float32", "cuda")
        inner = split.model
        modules = {f"model.{name}": m for name, m in inner.named_children() if name != "layers"}
        modules.update(
            {f"model.layers.{i}": layer for i, layer in enumerate(inner.layers)}, lm_head=split.lm_head
        )
        for name, module in modules.items():
            device = "cpu" if name.startswith("model.layers.") and int(name.split(".")[-1]) >= 3 else 0
            add_hook_to_module(module.to("cpu" if device == "cpu" else "cuda:0"),
                               AlignDevicesHook(execution_device=device, place_submodules=True))  # fmt: skip
        a, b = (TorchModel(merged_model(m, plan), tokenizer, n_ctx=128) for m in (whole, split))
        windows = [list(range(i, i + 128)) for i in range(1, 257, 64)]
        nll = max(
            float(abs(x - y).max()) for x, y in zip(a.windows_nll(windows, 63), b.windows_nll(windows, 63))
        )
        chats = [_messages(item) for item in EQBenchEval("offline", n_items=6, seed=3).items]
        same = sum(x == y for x, y in zip(a.chat_batch(chats, 24), b.chat_batch(chats, 24)))
        rows[kind] = {
            "devices": sorted({str(p.device) for p in split.parameters()}),
            "max_nll_difference": nll,
            "identical_replies": f"{same} of {len(chats)}",
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["workers", "spread", "split-check"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--kill-after", type=float)
    parser.add_argument("--plan", default="0-52,45-80")
    parser.add_argument("--root", type=Path, default=Path("/tmp/multi_gpu"))
    args = parser.parse_args()
    if args.command == "workers":
        rows = [run_workers(args.model, n, args.minutes, args.root, args.kill_after) for n in args.workers]
    elif args.command == "spread":
        rows = [spread(args.model, args.plan)]
    else:
        rows = [split_check()]
    for row in rows:
        print(json.dumps(row))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"multi_gpu_{args.command.replace('-', '_')}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
