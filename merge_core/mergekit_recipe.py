"""Export a LayerPlan as mergekit's passthrough YAML and read one back.

The recipe mergekit users write for a self-merge::

    slices:
      - sources:
          - model: HuggingFaceTB/SmolLM2-135M-Instruct
            layer_range: [0, 16]
    merge_method: passthrough
    dtype: bfloat16

A frankenmerge whose tensors outside the layers all come from one model (``model.base``) is
written the one way mergekit can say it: ``base_model`` (config and tokenizer) and two empty
slices of that model, ``layer_range: [0, 0]``, first (embeddings) and last (final norm, head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import yaml

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan


class MergekitRecipe(NamedTuple):
    plan: LayerPlan
    models: dict[str, str]  # by source name; {"": model} for a plan of one model
    base_source: Optional[str] = None  # the source of every tensor outside the layers (model.base)


def plan_to_mergekit_yaml(plan: LayerPlan, model: str | Mapping[str, str], dtype: str | None = "bfloat16",
                          base_source: str | None = None) -> str:  # fmt: skip
    """``model``: the base's id or path, or for a plan whose slices name their models a map of name ->
    id or path. ``dtype`` None leaves it out: mergekit then keeps each tensor's own dtype.
    ``base_source``: the model of every tensor outside the layers, else the plan's ends give them."""
    models = model if isinstance(model, Mapping) else {"": model}
    sources = plan.source_of_slices("")
    needed = dict.fromkeys(sources + ((base_source,) if base_source else ()))
    missing = [name for name in needed if name not in models]
    if missing:
        raise SelfMergeError(f"plan {plan} names source {missing[0]!r}, which has no model among {sorted(models)}")
    slices = [{"sources": [{"model": models[name], "layer_range": [start, end]}]}
              for name, (start, end) in zip(sources, plan.slices)]  # fmt: skip
    recipe: dict = {}
    if base_source:
        bookend = {"sources": [{"model": models[base_source], "layer_range": [0, 0]}]}
        slices = [bookend, *slices, bookend]
        recipe["base_model"] = models[base_source]
    recipe.update(slices=slices, merge_method="passthrough")
    if dtype:
        recipe["dtype"] = dtype
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def recipe_from_mergekit_yaml(text: str) -> MergekitRecipe:
    """The plan of a passthrough recipe and its models by source name: ``{"": model}`` and a plan
    without names for one model; for several, names a, b, c, ... in order of first use. Two empty
    slices of one model, first and last, name the base source (as ``plan_to_mergekit_yaml`` writes)."""
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SelfMergeError(f"mergekit recipe is not valid YAML: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("slices"), list):
        raise SelfMergeError("mergekit recipe has no 'slices' list")
    method = recipe.get("merge_method", "passthrough")
    if method != "passthrough":
        raise SelfMergeError(f"mergekit recipe uses merge_method {method!r}; only 'passthrough' is a self-merge")
    slices, models = [], []
    for i, entry in enumerate(recipe["slices"], 1):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise SelfMergeError(f"slice {i} of the mergekit recipe needs exactly one source")
        source = sources[0]
        layer_range = source.get("layer_range")
        if not (isinstance(layer_range, list) and len(layer_range) == 2):
            raise SelfMergeError(f"slice {i} of the mergekit recipe has no layer_range [start, end]")
        slices.append((int(layer_range[0]), int(layer_range[1])))
        models.append(str(source.get("model")))
    base_model = _bookends(slices, models)
    if base_model is not None:
        slices, models = slices[1:-1], models[1:-1]
    distinct = list(dict.fromkeys(models + ([base_model] if base_model else [])))
    if len(distinct) == 1:
        return MergekitRecipe(LayerPlan(tuple(slices)), {"": distinct[0]})
    names = {model: chr(ord("a") + i) if i < 26 else f"m{i}" for i, model in enumerate(distinct)}
    plan = LayerPlan(tuple(slices), tuple(names[m] for m in models))
    return MergekitRecipe(plan, {names[m]: m for m in distinct}, names[base_model] if base_model else None)


def _bookends(slices: list[tuple[int, int]], models: list[str]) -> Optional[str]:
    """The model of a recipe's empty first and last slices (the base source), None without them."""
    empty = [i for i, (start, end) in enumerate(slices) if end == start]
    if not empty:
        return None
    if empty != [0, len(slices) - 1] or len(slices) < 3 or models[0] != models[-1]:
        raise SelfMergeError(
            f"slice {empty[0] + 1} of the mergekit recipe is empty: selfmerge reads empty slices only as "
            "a pair of one model, first and last (the source of the embeddings and head)"
        )
    return models[0]


def plan_from_mergekit_yaml(text: str) -> tuple[LayerPlan, str]:
    """The plan and the (single) model of a passthrough self-merge recipe."""
    plan, models, _ = recipe_from_mergekit_yaml(text)
    if plan.sources:
        raise SelfMergeError(f"a self-merge recipe stacks one model; this one names {sorted(models.values())} "
                             "(several models: model.sources, or selfmerge merge a=A b=B)")  # fmt: skip
    return plan, models[""]


def read_mergekit_yaml(path: str | Path) -> tuple[LayerPlan, str]:
    return plan_from_mergekit_yaml(Path(path).read_text())
