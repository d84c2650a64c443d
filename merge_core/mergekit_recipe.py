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

A plan with scales (``LayerPlan.scales``) is written as mergekit's own ``parameters: scale`` filters
on the slices where layers repeat (a slice is cut where its repeats begin or end), the filters naming
the tensors the architecture table scales, as mergekit issue #198's hand-written recipes do::

          - model: HuggingFaceTB/SmolLM2-135M-Instruct
            layer_range: [8, 16]
            parameters:
              scale: [{filter: q_proj, value: 0.7071}, {filter: k_proj, value: 0.7071}, {value: 1.0}]

Read back, such a recipe gives the same plan; one that scales what a plan cannot say (a first use,
another tensor, q and k apart, repeats scaled unequally) is refused naming the slice and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import yaml

from merge_core.architectures import Architecture, mergekit_scale_filters
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import NO_SCALES, LayerPlan, Scales


class MergekitRecipe(NamedTuple):
    plan: LayerPlan
    models: dict[str, str]  # by source name; {"": model} for a plan of one model
    base_source: Optional[str] = None  # the source of every tensor outside the layers (model.base)


def plan_to_mergekit_yaml(plan: LayerPlan, model: str | Mapping[str, str], dtype: str | None = "bfloat16",
                          base_source: str | None = None, arch: Architecture | None = None) -> str:  # fmt: skip
    """``model``: the base's id or path, or for a plan whose slices name their models a map of name ->
    id or path. ``dtype`` None leaves it out: mergekit then keeps each tensor's own dtype.
    ``base_source``: the model of every tensor outside the layers, else the plan's ends give them.
    ``arch``: the family, which names the tensors a plan with scales multiplies."""
    models = model if isinstance(model, Mapping) else {"": model}
    sources = plan.source_of_slices("")
    needed = dict.fromkeys(sources + ((base_source,) if base_source else ()))
    missing = [name for name in needed if name not in models]
    if missing:
        raise SelfMergeError(f"plan {plan} names source {missing[0]!r}, which has no model among {sorted(models)}")
    scale = _scale_setting(plan, arch)
    slices = []
    for name, start, end, scales in _scaled_runs(plan):
        source: dict = {"model": models[name or ""], "layer_range": [start, end]}
        if not scales.is_identity:
            source["parameters"] = {"scale": scale}
        slices.append({"sources": [source]})
    recipe: dict = {}
    if base_source:
        bookend = {"sources": [{"model": models[base_source], "layer_range": [0, 0]}]}
        slices = [bookend, *slices, bookend]
        recipe["base_model"] = models[base_source]
    recipe.update(slices=slices, merge_method="passthrough")
    if dtype:
        recipe["dtype"] = dtype
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def recipe_beside(plan: LayerPlan, model: str | Mapping[str, str], dtype: str | None = "bfloat16",
                  base_source: str | None = None, arch: Architecture | None = None) -> str:  # fmt: skip
    """The recipe written beside a model file (or in its card): where mergekit cannot say a plan's
    scales (Gemma's norms), a comment saying why, so the model file stands without it."""
    try:
        return plan_to_mergekit_yaml(plan, model, dtype, base_source, arch)
    except SelfMergeError as err:
        if plan.scales.is_identity:
            raise
        return f"# no mergekit recipe: {err}\n"


def _scaled_runs(plan: LayerPlan) -> list[tuple[str, int, int, Scales]]:
    """(source, start, end, scales) of each slice, cut where its layers' scales change."""
    runs: list[tuple[str, int, int, Scales]] = []
    positions = iter(plan.layer_scales)
    for name, (start, end) in zip(plan.source_of_slices(""), plan.slices):
        for layer in range(start, end):
            scales = next(positions)
            if layer > start and runs[-1][3] == scales:
                runs[-1] = (name, runs[-1][1], layer + 1, scales)
            else:
                runs.append((name, layer, layer + 1, scales))
    return runs


def _scale_setting(plan: LayerPlan, arch: Architecture | None) -> list[dict]:
    """mergekit's ``scale`` list for the plan's repeats: one filter per tensor the family scales."""
    if plan.scales.is_identity:
        return []
    if arch is None:
        raise SelfMergeError(f"plan {plan} has scales: its mergekit recipe needs the model's architecture, "
                             "which names the tensors they multiply")  # fmt: skip
    filters = arch.hf_scales.filters()
    if arch.norm_offset:
        normed = [t for t, _, role in filters if "norm" in t and getattr(plan.scales, role) != 1.0]
        if normed:
            raise SelfMergeError(
                f"plan {plan} scales {normed[0].rstrip('.')}, which {arch.name} stores as weight - "
                f"{arch.norm_offset:g}: mergekit's scale would multiply that, not the weight; write the "
                "safetensors folder (selfmerge merge) instead of a mergekit recipe"
            )
    setting = [{"filter": name, "value": getattr(plan.scales, role)} for _, name, role in filters]
    return [*(entry for entry in setting if entry["value"] != 1.0), {"value": 1.0}]


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
    slices, models, scales = [], [], []
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
        # mergekit's precedence: the source's parameters, then the slice's, then the recipe's
        setting = next((level["parameters"]["scale"] for level in (source, entry, recipe)
                        if isinstance(level.get("parameters"), dict) and "scale" in level["parameters"]), None)  # fmt: skip
        scales.append(_read_scale(setting, i))
    base_model = _bookends(slices, models)
    if base_model is not None:
        slices, models, scales = slices[1:-1], models[1:-1], scales[1:-1]
    distinct = list(dict.fromkeys(models + ([base_model] if base_model else [])))
    names = {model: chr(ord("a") + i) if i < 26 else f"m{i}" for i, model in enumerate(distinct)}
    named = [names[m] for m in models] if len(distinct) > 1 else [""] * len(models)
    plan = _scaled_plan(slices, named, scales)
    if len(distinct) == 1:
        return MergekitRecipe(plan, {"": distinct[0]})
    return MergekitRecipe(plan, {names[m]: m for m in distinct}, names[base_model] if base_model else None)


def _read_scale(setting, slice_number: int) -> Scales:
    """The factors a slice's ``scale`` parameter sets, or a one-line refusal of what a plan cannot say."""
    if setting is None:
        return NO_SCALES
    where = f"slice {slice_number} of the mergekit recipe"
    entries = setting if isinstance(setting, list) else [{"value": setting}]
    if entries and all(isinstance(e, (int, float)) for e in entries):
        raise SelfMergeError(f"{where} gives scale as a gradient {setting}: selfmerge reads one factor a tensor")
    roles, factors = mergekit_scale_filters(), {}
    for entry in entries:
        if not isinstance(entry, dict) or "value" not in entry:
            raise SelfMergeError(f"{where} has a scale entry {entry!r} without a value")
        value, name = entry["value"], entry.get("filter")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SelfMergeError(f"{where} scales {name or 'every tensor'} by {value!r}, not a number")
        if name in (None, "*"):
            if value != 1.0:
                raise SelfMergeError(f"{where} scales every tensor by {value}: selfmerge scales q/k and the "
                                     f"outputs only ({', '.join(roles)})")  # fmt: skip
            break  # mergekit takes the first entry that matches: nothing after a catch-all counts
        key = str(name).rstrip(".").removesuffix(".weight").rsplit(".", 1)[-1]
        role = roles.get(key)
        if role is None:
            if value == 1.0:
                continue
            raise SelfMergeError(f"{where} scales {name!r} by {value}: selfmerge scales only "
                                 f"{', '.join(roles)}")  # fmt: skip
        if factors.get(role, value) != value:
            raise SelfMergeError(f"{where} scales {name!r} by {value} but another {role} tensor by "
                                 f"{factors[role]}: one factor per {role}")  # fmt: skip
        factors[role] = value
    return Scales(**factors)


def _scaled_plan(slices: list[tuple[int, int]], names: list[str], scales: list[Scales]) -> LayerPlan:
    """The plan of a recipe's slices: its scales must fall on every repeat alike and on no first use.
    Neighbouring slices of one model cut where the scales change (as ``_scaled_runs`` cuts) are joined."""
    sources = tuple(names) if any(names) else ()
    given = [(i, factors) for i, (factors, (start, end)) in enumerate(zip(scales, slices), 1)
             for _ in range(start, end)]  # fmt: skip
    repeat = next((factors for _, factors in given if not factors.is_identity), NO_SCALES)
    seen: set[tuple[str, int]] = set()
    for (slice_number, factors), key in zip(given, LayerPlan(tuple(slices), sources).layer_sources):
        where = f"slice {slice_number} of the mergekit recipe"
        if key not in seen and not factors.is_identity:
            raise SelfMergeError(f"{where} scales the first use of layer {key[1]} ({factors}): a plan scales a "
                                 "layer's second and later uses only")  # fmt: skip
        if key in seen and factors != repeat:
            what = f"scales a repeat of layer {key[1]} by {factors}" if not factors.is_identity else \
                f"leaves a repeat of layer {key[1]} unscaled"
            raise SelfMergeError(f"{where} {what}, another repeat by {repeat}: a plan scales every repeat "
                                 "alike")  # fmt: skip
        seen.add(key)
    joined = [(names[0], *slices[0], scales[0])]
    for name, (start, end), factors in zip(names[1:], slices[1:], scales[1:]):
        last_name, last_start, last_end, last_factors = joined[-1]
        if name == last_name and start == last_end and factors != last_factors:
            joined[-1] = (name, last_start, end, factors)
        else:
            joined.append((name, start, end, factors))
    return LayerPlan(tuple((start, end) for _, start, end, _ in joined),
                     tuple(name for name, *_ in joined) if sources else (), repeat)  # fmt: skip


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
