"""Frankenmerges of several fine-tunes of one base (``a:0-4,b:2-6``): plans with sources, the GGUF
merge from several files, compatibility refusals, and the single-model plan unchanged."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from evals.llama_cpp_model import LlamaCppModel
from evals.torch_model import TorchModel
from merge_core.errors import SelfMergeError
from merge_core.gguf_convert import convert_hf_to_gguf
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import (
    plan_from_mergekit_yaml,
    plan_to_mergekit_yaml,
    recipe_from_mergekit_yaml,
)
from merge_core.safetensors_merge import merge_safetensors
from merge_core.torch_merge import _layer_at, load_causal_lm, merged_model
from tiny_models import build_finetune, build_tiny

PLAN = LayerPlan.parse("a:0-4,b:2-6")  # layers 2 and 3 of both models; embeddings from a, head from b
C_TEMPLATE = "{% for m in messages %}<c>{{ m['content'] }}</c>{% endfor %}"
TEXT = "Return the number of items in a container, or raise TypeError if it has no length. " * 12


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """Three fine-tunes of one tiny Llama, as HF folders and F32 GGUFs (exact bytes to compare); c has
    its own chat template, as an instruct tune would."""
    tmp = tmp_path_factory.mktemp("sources")
    a = build_tiny("llama", tmp / "a", dtype=torch.float32)
    b = build_finetune(a, tmp / "b", seed=1)
    c = build_finetune(a, tmp / "c", seed=2)
    tokenizer_config = json.loads((c / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = C_TEMPLATE
    (c / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return {
        name: (folder, convert_hf_to_gguf(folder, tmp / f"{name}.gguf", "f16"))
        for name, folder in (("a", a), ("b", b), ("c", c))
    }


def _tensor_bytes(header, name):
    info = next(t for t in header.tensors if t.name == name)
    with open(header.path, "rb") as f:
        f.seek(header.data_start + info.offset)
        return info.ggml_type, info.dims, f.read(info.n_bytes)


def test_plans_name_their_sources():
    assert str(PLAN) == "a:0-4,b:2-6" and PLAN.sources == ("a", "b") and PLAN.source_names == ("a", "b")
    assert PLAN.layer_sources[3:6] == (("a", 3), ("b", 2), ("b", 3))
    assert PLAN.max_repeats == 1 and LayerPlan.parse("0-4,2-6").max_repeats == 2  # a's layer 2 is not b's
    assert LayerPlan.parse("a:0-4,a:2-6").max_repeats == 2 and LayerPlan.parse(" a : 0-4 , b:2-6") == PLAN
    assert LayerPlan.parse("0-4,2-6").sources == () and str(LayerPlan.parse("0-4,2-6")) == "0-4,2-6"
    with pytest.raises(
        SelfMergeError, match="names the source of some slices only: name all of them or none"
    ):
        LayerPlan.parse("a:0-4,2-6")


def test_mergekit_recipes_carry_the_sources():
    models = {"a": "org/xwin", "b": "org/euryale"}
    text = plan_to_mergekit_yaml(PLAN, models)
    assert "org/xwin" in text and "org/euryale" in text
    assert recipe_from_mergekit_yaml(text) == (PLAN, models, None)  # names given in order of first use: a, b
    assert plan_from_mergekit_yaml(plan_to_mergekit_yaml(LayerPlan.parse("0-4,2-6"), "org/x")) == (
        LayerPlan.parse("0-4,2-6"),
        "org/x",
    )
    with pytest.raises(
        SelfMergeError, match=r"this one names \['org/euryale', 'org/xwin'\] \(several models: model.sources"
    ):
        plan_from_mergekit_yaml(text)


def test_gguf_merge_takes_each_block_from_its_source(finetunes, tmp_path):
    files = {name: gguf for name, (_, gguf) in finetunes.items()}
    merged = read_gguf_header(merge_gguf(files, PLAN, tmp_path / "ab.gguf"))
    a, b = (read_gguf_header(files[name]) for name in "ab")
    assert merged.block_count == 8
    for out_index, (source, layer) in enumerate(PLAN.layer_sources):
        for tensor in (t for t in (a if source == "a" else b).tensors if t.name.startswith(f"blk.{layer}.")):
            suffix = tensor.name.split(".", 2)[2]
            expected = _tensor_bytes(a if source == "a" else b, tensor.name)
            assert _tensor_bytes(merged, f"blk.{out_index}.{suffix}") == expected
    assert _tensor_bytes(merged, "token_embd.weight") == _tensor_bytes(a, "token_embd.weight")
    assert _tensor_bytes(merged, "output_norm.weight") == _tensor_bytes(b, "output_norm.weight")
    assert _tensor_bytes(merged, "output.weight") == _tensor_bytes(
        b, "output.weight"
    )  # Llama: an untied head
    assert merged.metadata["tokenizer.ggml.tokens"].raw == a.metadata["tokenizer.ggml.tokens"].raw


def _stack_in_transformers(finetunes):
    """a's embeddings, each position's layer from its own model, b's final norm and head."""
    (a_model, tokenizer), (b_model, _) = (
        load_causal_lm(finetunes[name][0], "float32", "cpu") for name in "ab"
    )
    models = {"a": a_model, "b": b_model}
    stack = a_model
    stack.model.layers = nn.ModuleList(
        _layer_at(models[s].model.layers[i], p) for p, (s, i) in enumerate(PLAN.layer_sources)
    )
    stack.model.norm, stack.lm_head = b_model.model.norm, b_model.lm_head
    stack.config.num_hidden_layers = stack.model.config.num_hidden_layers = PLAN.n_layers
    return stack, tokenizer


def test_safetensors_merge_takes_each_layer_from_its_folder(finetunes, tmp_path):
    from transformers import AutoModelForCausalLM

    from merge_core.hf_checkpoint import HFCheckpoint

    folders = {name: folder for name, (folder, _) in finetunes.items()}
    out = merge_safetensors(folders, PLAN, tmp_path / "ab", model_name={"a": "org/a", "b": "org/b"})
    merged, a, b = HFCheckpoint.open(out), HFCheckpoint.open(folders["a"]), HFCheckpoint.open(folders["b"])
    for out_index, (source, layer) in enumerate(PLAN.layer_sources):
        for name in (
            n for n in (a if source == "a" else b).tensors if n.startswith(f"model.layers.{layer}.")
        ):
            out_name = name.replace(f"model.layers.{layer}.", f"model.layers.{out_index}.")
            assert _st_bytes(merged, out_name) == _st_bytes(a if source == "a" else b, name)
    assert _st_bytes(merged, "model.embed_tokens.weight") == _st_bytes(a, "model.embed_tokens.weight")
    assert _st_bytes(merged, "model.norm.weight") == _st_bytes(b, "model.norm.weight")
    assert _st_bytes(merged, "lm_head.weight") == _st_bytes(b, "lm_head.weight")
    assert (
        merged.config["num_hidden_layers"] == 8
        and (out / "tokenizer.json").read_bytes() == (folders["a"] / "tokenizer.json").read_bytes()
    )
    assert recipe_from_mergekit_yaml((out / "mergekit_config.yml").read_text()) == (
        PLAN,
        {"a": "org/a", "b": "org/b"},
        None,
    )
    stack, tokenizer = _stack_in_transformers(finetunes)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]])
    models = {name: load_causal_lm(finetunes[name][0], "float32", "cpu")[0] for name in "ab"}
    in_memory = merged_model(models, PLAN)  # the torch backend's: the sources' own layers, shared
    owned = {p.data_ptr() for model in models.values() for p in model.parameters()}
    assert {p.data_ptr() for p in in_memory.parameters()} <= owned
    with torch.no_grad():
        expected = stack(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits, expected)
        assert torch.equal(in_memory(ids).logits, expected)


def test_model_base_gives_every_tensor_outside_the_layers(finetunes, tmp_path):
    """model.base=c: c's embeddings, final norm, head, tokenizer and chat template around a's and b's
    layers, on every path, and in the mergekit recipe (base_model and two empty slices of c)."""
    from transformers import AutoModelForCausalLM

    from merge_core.hf_checkpoint import HFCheckpoint

    files = {name: gguf for name, (_, gguf) in finetunes.items()}
    merged = read_gguf_header(merge_gguf(files, PLAN, tmp_path / "ab.gguf", base_source="c"))
    a, c = read_gguf_header(files["a"]), read_gguf_header(files["c"])
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        assert _tensor_bytes(merged, name) == _tensor_bytes(c, name) != _tensor_bytes(a, name)
    assert _tensor_bytes(merged, "blk.0.attn_q.weight") == _tensor_bytes(a, "blk.0.attn_q.weight")
    assert merged.metadata["tokenizer.chat_template"].value == C_TEMPLATE

    folders = {name: folder for name, (folder, _) in finetunes.items()}
    names = {n: f"org/{n}" for n in "abc"}
    out = merge_safetensors(folders, PLAN, tmp_path / "abc", model_name=names, base_source="c")
    checkpoint, c_checkpoint = HFCheckpoint.open(out), HFCheckpoint.open(folders["c"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert _st_bytes(checkpoint, name) == _st_bytes(c_checkpoint, name)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == C_TEMPLATE
    recipe = recipe_from_mergekit_yaml((out / "mergekit_config.yml").read_text())
    assert recipe == (PLAN, {"a": "org/a", "b": "org/b", "c": "org/c"}, "c")

    models = {name: load_causal_lm(folders[name], "float32", "cpu")[0] for name in "abc"}
    ids = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 12]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        assert torch.equal(merged_model(models, PLAN, base_source="c")(ids).logits, expected)
        assert not torch.equal(merged_model(models, PLAN)(ids).logits, expected)

    with pytest.raises(SelfMergeError, match=r"base source 'd', which is not among \['a', 'b', 'c'\]"):
        merge_gguf(files, PLAN, tmp_path / "out.gguf", base_source="d")
    with pytest.raises(SelfMergeError, match="base source 'c' names a model, but one model was given"):
        merge_gguf(files["a"], LayerPlan.parse("0-4,2-6"), tmp_path / "out.gguf", base_source="c")
    with pytest.raises(SelfMergeError, match="slice 2 of the mergekit recipe is empty: selfmerge reads empty"):
        recipe_from_mergekit_yaml(plan_to_mergekit_yaml(LayerPlan.parse("a:0-4,b:2-6"), {"a": "x", "b": "y"})
                                  .replace("[2, 6]", "[2, 2]"))  # fmt: skip
    assert not list(tmp_path.glob("out*"))


def _st_bytes(checkpoint, name):
    entry = checkpoint.tensors[name]
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        return entry.dtype, entry.shape, f.read(entry.n_bytes)


def test_the_merged_file_scores_as_the_same_stack_built_in_transformers(finetunes, tmp_path):
    """llama.cpp on the merged GGUF against transformers running the same stack."""
    stack, tokenizer = _stack_in_transformers(finetunes)
    expected = TorchModel(stack, tokenizer, n_ctx=128)
    files = {name: gguf for name, (_, gguf) in finetunes.items()}
    window = expected.tokenize(TEXT)[:128]
    with LlamaCppModel(merge_gguf(files, PLAN, tmp_path / "ab.gguf"), n_ctx=128) as llama:
        merged_nll = llama.window_nll(window, 64)
    with LlamaCppModel(files["a"], n_ctx=128) as llama:
        a_nll = llama.window_nll(window, 64)
    assert np.abs(merged_nll - expected.window_nll(window, 64)).max() < 0.02
    assert np.abs(merged_nll - a_nll).max() > 0.05  # and it is not simply model a


def test_one_named_source_writes_exactly_todays_file(finetunes, tmp_path):
    gguf = finetunes["a"][1]
    today = merge_gguf(gguf, LayerPlan.parse("0-4,2-6"), tmp_path / "today.gguf").read_bytes()
    assert (
        merge_gguf({"a": gguf}, LayerPlan.parse("a:0-4,a:2-6"), tmp_path / "named.gguf").read_bytes() == today
    )


def test_sources_that_do_not_fit_are_refused_before_anything_is_written(finetunes, tmp_path):
    wide = convert_hf_to_gguf(build_tiny("llama", tmp_path / "wide", hidden=128), tmp_path / "wide.gguf")
    files = {"a": finetunes["a"][1], "b": wide}
    with pytest.raises(
        SelfMergeError, match="sources 'a' and 'b' differ in llama.embedding_length: 64 vs 128"
    ):
        merge_gguf(files, PLAN, tmp_path / "out.gguf")
    with pytest.raises(
        SelfMergeError, match=r"plan a:0-4,c:2-6 names source 'c', which is not among \['a', 'b'\]"
    ):
        merge_gguf(files, LayerPlan.parse("a:0-4,c:2-6"), tmp_path / "out.gguf")
    with pytest.raises(SelfMergeError, match="takes slices from a, b: give a file for each"):
        merge_gguf(files["a"], PLAN, tmp_path / "out.gguf")
    with pytest.raises(SelfMergeError, match="names no source, but several models were given"):
        merge_gguf(files, LayerPlan.parse("0-4,2-6"), tmp_path / "out.gguf")
    with pytest.raises(
        SelfMergeError, match="sources 'a' and 'b' differ in config.json hidden_size: 64 vs 128"
    ):
        merge_safetensors({"a": finetunes["a"][0], "b": tmp_path / "wide"}, PLAN, tmp_path / "out")
    with pytest.raises(SelfMergeError, match=r"slice 2 \(2-9\) ends past layer 6 of source 'b'"):
        merge_gguf(
            {"a": files["a"], "b": finetunes["b"][1]}, LayerPlan.parse("a:0-4,b:2-9"), tmp_path / "out.gguf"
        )
    assert not list(tmp_path.glob("out*"))


def test_selfmerge_merge_writes_a_frankenmerge_with_its_card_and_recipe(finetunes, tmp_path):
    from conftest import REPO, run_cli

    a, b = (str(finetunes[name][1]) for name in "ab")
    run_cli(
        "merge",
        f"a={a}",
        f"b={b}",
        "--plan",
        str(PLAN),
        "--out",
        str(tmp_path / "ab.gguf"),
        cwd=REPO,
        check=True,
    )
    assert read_gguf_header(tmp_path / "ab.gguf").block_count == 8
    card = (tmp_path / "README.md").read_text()
    assert f"| a | `{a}` |" in card and f"| b | `{b}` |" in card and "| 2 | b:2-5 | 4-7 |" in card
    recipe = recipe_from_mergekit_yaml((tmp_path / "ab.mergekit.yml").read_text())
    assert recipe == (PLAN, {"a": a, "b": b}, None)
    bad = run_cli("merge", f"a={a}", "--plan", str(PLAN), "--out", str(tmp_path / "x.gguf"), cwd=REPO)
    assert bad.returncode != 0 and "names source 'b', which is not among ['a']" in bad.stderr
    assert not (tmp_path / "x.gguf").exists()
