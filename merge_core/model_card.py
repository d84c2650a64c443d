"""The model card (``README.md``) written with every merge, as mergekit writes one: the page a model
hub shows for the folder uploaded as it is. Front matter (base model, licence, tags), the plan and
its mergekit recipe, depth and parameters, the scores it had in its sweep and what they were scored
on, and how to make the same file again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from merge_core.architectures import Architecture
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import recipe_beside
from merge_core.model_shape import ModelShape

CARD = "README.md"
MARK = "<!-- written by selfmerge -->"  # a card we wrote may be replaced; any other README.md is left alone


@dataclass(frozen=True)
class Score:
    name: str  # e.g. ppl, eqbench
    value: float
    base: Optional[float] = None  # the base model's, scored the same way


@dataclass(frozen=True)
class CardFacts:
    base: str  # the base model as a hub id (or a path, when it has none)
    plan: LayerPlan
    shape: ModelShape  # the base's
    licence: Optional[str] = None
    scores: tuple[Score, ...] = ()
    scored_on: Optional[str] = None  # what the scores mean: text, windows, backend, quantization
    reproduce: tuple[str, ...] = ()  # commands that make the same file again
    sources: tuple[tuple[str, str, Optional[str]], ...] = ()  # a plan over several models: (name, model, licence)
    base_source: Optional[str] = None  # model.base: the source of every tensor outside the layers
    arch: Optional[Architecture] = None  # the family: which tensors a plan's scales multiply


def base_licence(source: Path) -> Optional[str]:
    """The base's licence when its files say it: a GGUF's ``general.license``, or the ``license:`` of
    an HF folder's README front matter."""
    try:
        if source.is_file():
            from merge_core.gguf_file import read_gguf_header

            entry = read_gguf_header(source).metadata.get("general.license")
            return str(entry.value) if entry is not None and entry.value else None
        readme = source / "README.md"
        if readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
                return str(front["license"]) if isinstance(front, dict) and front.get("license") else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def _front_matter(facts: CardFacts) -> str:
    meta = {"base_model": [model for _, model, _ in facts.sources] or [facts.base], "library_name": "transformers",
            "tags": ["mergekit", "merge", "selfmerge", "passthrough", "self-merge"]}  # fmt: skip
    if facts.licence:
        meta["license"] = facts.licence
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(facts: CardFacts) -> str:
    plan, shape = facts.plan, facts.shape
    on_hub = "/" in facts.base and not Path(facts.base).exists()  # a hub id, not a local path
    base_link = f"[{facts.base}](https://huggingface.co/{facts.base})" if on_hub else f"`{facts.base}`"
    params, base_params = shape.params_of(plan), shape.n_params
    lines = [
        _front_matter(facts), MARK, f"# {Path(facts.base).name}-selfmerge-{plan.n_layers}L", "",
        f"A self-merge (passthrough frankenmerge) of {base_link}, made with selfmerge: overlapping slices of the",
        "base's own layers stacked into a deeper model. No weight was changed; layers that appear twice are copies.", "",
        "| | this merge | base |", "| --- | --- | --- |",
        f"| plan | `{plan}` | `0-{shape.n_layers}` |",
        f"| layers | {plan.n_layers} | {shape.n_layers} |",
        f"| parameters | {params / 1e6:,.1f}M ({params / base_params:.2f}x) | {base_params / 1e6:,.1f}M |",
    ]  # fmt: skip
    for score in facts.scores:
        base = f"{score.base:.4g}" if score.base is not None else "-"
        lines.append(f"| {score.name} | {score.value:.4g} | {base} |")
    if facts.scored_on:
        lines += ["", f"Scores as selfmerge measured them in its sweep: {facts.scored_on}."]
    models = {name: model for name, model, _ in facts.sources} or facts.base
    if facts.sources:
        lines += ["", "## Sources", "", "| name | model | licence |", "| --- | --- | --- |"]
        lines += [f"| {name} | `{model}` | {licence or '-'} |" for name, model, licence in facts.sources]
        first, last = plan.end_sources("", facts.base_source)
        lines += ["", f"Embeddings, tokenizer and chat template from `{first}`; "
                  f"final norm and output head from `{last}`."]  # fmt: skip
    lines += ["", "## Layers", "", "| slice | base layers | output layers |", "| --- | --- | --- |"]
    out = 0
    for i, ((start, end), name) in enumerate(zip(plan.slices, plan.source_of_slices("")), 1):
        lines.append(f"| {i} | {name + ':' if name else ''}{start}-{end - 1} | {out}-{out + end - start - 1} |")
        out += end - start
    if not plan.scales.is_identity:
        lines += ["", f"Every layer's second and later use is attenuated: `{plan.scales}` (queries and keys "
                  "times `qk`; what attention and the MLP add to the residual stream times `attn_out` and "
                  "`mlp_out`)."]  # fmt: skip
    lines += ["", "## mergekit recipe", "", "The same merge as a mergekit passthrough recipe:", "", "```yaml",
              recipe_beside(plan, models, base_source=facts.base_source, arch=facts.arch).rstrip(), "```"]  # fmt: skip
    if facts.reproduce:
        lines += ["", "## Reproduce", "", "```bash", *facts.reproduce, "```"]
    if facts.sources:
        lines += ["", "## Licence", "",
                  "Each source model's licence (the table above) applies to the tensors taken from it."]  # fmt: skip
    elif facts.licence:
        lines += ["", "## Licence", "", f"The base model's licence, `{facts.licence}`, applies to this merge of its weights."]
    return "\n".join(lines) + "\n"


def card_path(out: Path) -> Path:
    """Where the card of ``out`` goes: inside a folder; beside a file as README.md, unless a README.md
    that selfmerge did not write is there (then ``<file>.README.md``: never overwrite the user's)."""
    if out.is_dir():
        return out / CARD
    beside = out.parent / CARD
    if not beside.exists() or MARK in beside.read_text(encoding="utf-8", errors="replace"):
        return beside
    return out.with_name(out.name + "." + CARD)


def write_card(out: Path, facts: CardFacts) -> Path:
    from merge_core.byte_copy import written_as_partial

    path = card_path(out)
    with written_as_partial(path) as partial:
        partial.write_text(model_card(facts), encoding="utf-8")
    return path
