"""Export a LayerPlan as mergekit's passthrough YAML and read one back.

The recipe mergekit users write for a self-merge::

    slices:
      - sources:
          - model: HuggingFaceTB/SmolLM2-135M-Instruct
            layer_range: [0, 16]
    merge_method: passthrough
    dtype: bfloat16
"""

from __future__ import annotations

from pathlib import Path

import yaml

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan


def plan_to_mergekit_yaml(plan: LayerPlan, model: str, dtype: str | None = "bfloat16") -> str:
    """``dtype`` None leaves it out: mergekit then keeps each tensor's own dtype."""
    recipe = {
        "slices": [{"sources": [{"model": model, "layer_range": [start, end]}]} for start, end in plan.slices],
        "merge_method": "passthrough",
    }
    if dtype:
        recipe["dtype"] = dtype
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def plan_from_mergekit_yaml(text: str) -> tuple[LayerPlan, str]:
    """Return the plan and the (single) model of a passthrough self-merge recipe."""
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SelfMergeError(f"mergekit recipe is not valid YAML: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("slices"), list):
        raise SelfMergeError("mergekit recipe has no 'slices' list")
    method = recipe.get("merge_method", "passthrough")
    if method != "passthrough":
        raise SelfMergeError(f"mergekit recipe uses merge_method {method!r}; only 'passthrough' is a self-merge")
    slices, models = [], set()
    for i, entry in enumerate(recipe["slices"], 1):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise SelfMergeError(f"slice {i} of the mergekit recipe needs exactly one source")
        source = sources[0]
        layer_range = source.get("layer_range")
        if not (isinstance(layer_range, list) and len(layer_range) == 2):
            raise SelfMergeError(f"slice {i} of the mergekit recipe has no layer_range [start, end]")
        slices.append((int(layer_range[0]), int(layer_range[1])))
        models.add(str(source.get("model")))
    if len(models) != 1:
        raise SelfMergeError(f"a self-merge recipe stacks one model; this one names {sorted(models)}")
    return LayerPlan(tuple(slices)), models.pop()


def read_mergekit_yaml(path: str | Path) -> tuple[LayerPlan, str]:
    return plan_from_mergekit_yaml(Path(path).read_text())
