"""A sweep over two source models (model.sources): the bundled model and its own layers requantized
to Q8_0 as the second "fine-tune"; every slice picks its model."""

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, fast_overrides, run_cli
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_quantize import quantize_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import recipe_from_mergekit_yaml
from sweep.config import ModelConfig, compose, load_config
from sweep.trials.runner import Sweep


@pytest.fixture(scope="module")
def requantized(base_gguf, tmp_path_factory):
    return quantize_gguf(
        base_gguf, tmp_path_factory.mktemp("q8") / "smollm2.Q8_0.gguf", "Q8_0", allow_requantize=True
    )


@pytest.mark.slow
def test_a_sweep_over_two_sources_scores_plans_that_mix_them(base_gguf, requantized, wikitext_file, tmp_path):
    overrides = fast_overrides("two", wikitext_file, 4, tmp_path) + [
        "+model.sources.a=bundled",
        f"+model.sources.b={requantized}",
        "sweep.seed=3",
        "sweep.keep_top_k=10",
    ]
    study = Sweep(load_config(compose(overrides))).run()
    board = pd.read_csv(tmp_path / "two" / "leaderboard.csv")
    plans = [LayerPlan.parse(p) for p in board.loc[board["state"] != "BASE", "plan"]]
    assert len(plans) >= 4 and all(set(plan.sources) <= {"a", "b"} and plan.sources for plan in plans)
    assert any(len(plan.source_names) == 2 for plan in plans)  # slices from both models in one stack
    assert study.user_attrs["scoring"]["model"] == {"a": str(base_gguf), "b": str(requantized)}
    mixed = next(
        t for t in study.trials if t.user_attrs.get("n_sources_used") == 2 and "model_path" in t.user_attrs
    )
    merged = read_gguf_header(mixed.user_attrs["model_path"])
    types = {t.name: t.ggml_type for t in merged.tensors}
    plan = LayerPlan.parse(mixed.user_attrs["plan"])
    for out_index, (source, layer) in enumerate(plan.layer_sources):  # Q4_1 blocks from a, Q8_0 from b
        assert types[f"blk.{out_index}.ffn_up.weight"] == (3 if source == "a" else 8)
    out = tmp_path / "reproduced"  # the very file, rebuilt from both sources, and the same score
    run_cli(
        "reproduce",
        str(tmp_path / "two"),
        "--trial",
        str(mixed.number),
        "--out",
        str(out),
        cwd=REPO,
        check=True,
    )
    record = json.loads((out / f"two-trial{mixed.number}.json").read_text())
    assert record["reproduced_ppl"] == pytest.approx(record["stored_ppl"], rel=1e-6)
    assert (out / f"two-trial{mixed.number}.gguf").read_bytes() == Path(
        mixed.user_attrs["model_path"]
    ).read_bytes()
    rplan, models, _ = recipe_from_mergekit_yaml((out / f"two-trial{mixed.number}.mergekit.yml").read_text())
    files = {"a": str(base_gguf), "b": str(requantized)}  # the recipe names models a, b, ... in order of use
    assert rplan.slices == plan.slices and [models[n] for n in rplan.sources] == [
        files[n] for n in plan.sources
    ]
    assert "## Sources" in (out / "README.md").read_text()
    counted = run_cli(
        "plans",
        "--count",
        "+model.sources.a=bundled",
        f"+model.sources.b={requantized}",
        cwd=REPO,
        check=True,
    )
    assert (
        "exactly 9616 valid plans in space 'uniform' for a 30-layer model, slices from 2 sources"
        in counted.stdout
    )


def test_sources_are_refused_where_they_cannot_run(requantized, wikitext_file, tmp_path):
    base = fast_overrides("bad", wikitext_file, 1, tmp_path)
    with pytest.raises(SelfMergeError, match="model.sources.a:b is not a usable source name"):
        ModelConfig(sources={"a:b": "bundled"})  # a colon would end the name in the plan's text
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(SelfMergeError, match="model.sources mixes GGUF files and HF folders"):
        Sweep(load_config(compose(base + ["+model.sources.a=bundled", f"+model.sources.b={tmp_path / 'hf'}",
                                          "backend=torch"])))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "llama_cpp"])
def test_a_sweep_over_two_hf_fine_tunes(backend, wikitext_file, tmp_path):
    """backend=torch: both models loaded once, every plan built from their layers (no file, no copy);
    backend=llama_cpp: each converted and quantized once, every plan merged from those two GGUFs."""
    from tiny_models import build_finetune, build_tiny

    a = build_tiny("llama", tmp_path / "a", n_layers=8)
    b = build_finetune(a, tmp_path / "b", seed=1)
    small = ["space.first_size=[2,5]", "space.middle_size=[2,4]", "space.jump=[1,2]", "space.constraints.last_min=2",
             "space.constraints.jump_min=1"]  # fmt: skip
    overrides = fast_overrides("tt", wikitext_file, 3, tmp_path / "results") + [
        f"+model.sources.a={a}", f"+model.sources.b={b}", f"backend={backend}", "sweep.seed=1", *small]
    sweep = Sweep(load_config(compose(overrides)))
    study = sweep.run()
    plans = [LayerPlan.parse(t.user_attrs["plan"]) for t in study.trials if t.values]
    assert len(plans) >= 3 and all(plan.sources for plan in plans)
    if backend == "torch":
        shared = {p.data_ptr() for model in sweep.backend.models.values() for p in model.parameters()}
        for plan in plans:
            assert {p.data_ptr() for p in sweep.backend.build(plan).parameters()} <= shared
    else:
        converted = tmp_path / "results" / "tt" / "base"
        assert sweep.backend.merge_from == {name: converted / f"source-{name}.Q8_0.gguf" for name in "ab"}
        assert all(path.is_file() for path in sweep.backend.merge_from.values())
    board = pd.read_csv(tmp_path / "results" / "tt" / "leaderboard.csv")
    assert board["plan"].iloc[0] == "0-8" and board["plan"].iloc[1:].str.contains("a:|b:").all()


def test_model_base_gives_the_embeddings_head_and_baseline_in_a_sweep(wikitext_file, tmp_path):
    """+model.base=c: c is scored as the base, every plan wears c's embeddings, final norm and head
    around a's and b's layers, and reproduce rebuilds it (safetensors and the recipe naming c)."""
    import torch
    from tiny_models import build_finetune, build_tiny

    a = build_tiny("llama", tmp_path / "a", n_layers=8)
    folders = {"a": a, **{name: build_finetune(a, tmp_path / name, seed) for name, seed in (("b", 1), ("c", 2))}}
    small = ["space.first_size=[2,5]", "space.middle_size=[2,4]", "space.jump=[1,2]", "space.constraints.last_min=2",
             "space.constraints.jump_min=1"]  # fmt: skip
    overrides = fast_overrides("base", wikitext_file, 2, tmp_path / "results") + [
        *(f"+model.sources.{name}={folder}" for name, folder in folders.items()), "+model.base=c",
        "backend=torch", "sweep.seed=1", *small]  # fmt: skip
    sweep = Sweep(load_config(compose(overrides)))
    study = sweep.run()
    models = sweep.backend.models
    assert sweep.backend.base is models["c"] and study.user_attrs["scoring"]["base_source"] == "c"
    trial = next(t for t in study.trials if t.values)
    plan = LayerPlan.parse(trial.user_attrs["plan"])
    built = sweep.backend.build(plan)
    assert built.model.embed_tokens is models["c"].model.embed_tokens and built.lm_head is models["c"].lm_head
    assert built.model.norm is models["c"].model.norm
    out = tmp_path / "reproduced"
    run_cli("reproduce", str(tmp_path / "results" / "base"), "--trial", str(trial.number), "--out", str(out),
            cwd=REPO, check=True)  # fmt: skip
    record = json.loads((out / f"base-trial{trial.number}.json").read_text())
    assert record["reproduced_ppl"] == pytest.approx(record["stored_ppl"], rel=1e-5)
    recipe = recipe_from_mergekit_yaml((out / f"base-trial{trial.number}.mergekit.yml").read_text())
    assert recipe.base_source is not None and recipe.models[recipe.base_source] == str(folders["c"])
    from safetensors.torch import load_file

    written = load_file(out / f"base-trial{trial.number}" / "model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], models["c"].model.embed_tokens.weight.detach())
    with pytest.raises(SelfMergeError, match=r"model.base=d is not a source: it names one of model.sources \(a, b"):
        ModelConfig(sources={"a": "x", "b": "y"}, base="d")


@pytest.mark.slow
def test_an_interleave_sweep_alternates_the_sources(wikitext_file, tmp_path):
    from tiny_models import build_finetune, build_tiny

    a = build_tiny("llama", tmp_path / "a", n_layers=8)
    b = build_finetune(a, tmp_path / "b", seed=1)
    space = ["space=interleave", "space.slice_size=[3,5]", "space.overlap=[1,2]", "space.constraints.last_min=2",
             "space.constraints.jump_min=1"]  # fmt: skip
    overrides = fast_overrides("il", wikitext_file, 3, tmp_path / "results") + [
        f"+model.sources.a={a}", f"+model.sources.b={b}", "backend=torch", *space]
    study = Sweep(load_config(compose(overrides))).run()
    plans = [LayerPlan.parse(t.user_attrs["plan"]) for t in study.trials if t.values]
    assert len({str(p) for p in plans}) == 3
    for plan in plans:  # alternating up to the last slice, whose model is a parameter of its own
        assert all(x != y for x, y in zip(plan.sources[:-2], plan.sources[1:-1])) and len(plan.sources) >= 2
