"""``space.prior=importance``: start the search where the layer-importance analysis points.

The base model is analysed once (evals/layer_importance.py; kept as ``layer_importance.csv`` and
``.png`` in the sweep's folder). Every plan of the space gets a cost: the summed block influence of
each layer it repeats or skips; the sweep's first ``sampler.n_startup_trials`` trials are the
cheapest plans instead of random ones, and the sampler takes over from there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evals.layer_importance import LayerImportance, measure
from merge_core.layer_plan import LayerPlan

log = logging.getLogger("selfmerge")
PRIORS = ("importance",)
CSV = "layer_importance.csv"


def analyze(model_path: str, text: str, n_ctx: int, windows: int, max_block: int, device: str = "auto") -> LayerImportance:
    """Load the base with transformers (a GGUF is dequantized) and measure it on ``windows`` windows of ``text``."""
    from evals.corpus import load_text
    from evals.perplexity import make_windows
    from evals.torch_model import TorchModel
    from merge_core.model_files import resolve_model_source
    from merge_core.torch_merge import load_causal_lm

    model, tokenizer = load_causal_lm(resolve_model_source(model_path), "float32", device)
    tokens = TorchModel(model, tokenizer).tokenize(load_text(text, max_chars=windows * n_ctx * 8))
    return measure(model, make_windows(tokens, n_ctx, windows), max_block)


def importance_for(directory: Path, model_path: str, text: str, n_ctx: int, windows: int = 8) -> LayerImportance:
    """The sweep's analysis: read from its folder, or measured and written there once."""
    if (directory / CSV).is_file():
        return LayerImportance.read(directory / CSV)
    log.info("importance prior: analysing the base model's layers on %d windows", windows)
    importance = analyze(model_path, text, n_ctx, windows, max_block=8)
    importance.write(directory)
    return importance


def prior_plans(space, importance: LayerImportance, n: int) -> list[tuple[LayerPlan, dict[str, int]]]:
    """The ``n`` plans of the space the prior ranks best (lowest cost; deeper first among equals)."""
    by_plan, _ = space.enumerate_plans()
    plans = sorted((LayerPlan.parse(text) for text in by_plan), key=lambda p: (importance.plan_cost(p), -p.n_layers, str(p)))
    return [(plan, dict(by_plan[str(plan)])) for plan in plans[:n]]
