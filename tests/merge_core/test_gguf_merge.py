"""The GGUF merge: bytes in plan order, metadata kept, the file loads in llama.cpp and transformers."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from merge_core import LayerPlan, SelfMergeError
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf

PLAN = LayerPlan.parse("0-16,8-30")


@pytest.fixture(scope="module")
def merged(base_gguf, tmp_path_factory):
    return merge_gguf(base_gguf, PLAN, tmp_path_factory.mktemp("merge") / "merged.gguf")


def test_merged_tensors_are_the_source_blocks_in_plan_order(base_gguf, merged):
    source, out = GGUFReader(base_gguf), GGUFReader(merged)
    by_name = {t.name: t for t in source.tensors}
    n_block_tensors = sum(t.name.startswith("blk.0.") for t in source.tensors)
    assert len(out.tensors) == len(source.tensors) + (PLAN.n_layers - 30) * n_block_tensors
    for tensor in out.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            name = f"blk.{PLAN.layer_indices[int(index)]}.{rest}"
        expected = by_name[name]
        assert tensor.tensor_type == expected.tensor_type, tensor.name
        assert list(tensor.shape) == list(expected.shape), tensor.name
        assert tensor.data.tobytes() == expected.data.tobytes(), tensor.name


def test_block_count_updated_and_other_metadata_copied(base_gguf, merged):
    source, out = GGUFReader(base_gguf), GGUFReader(merged)
    assert out.fields["llama.block_count"].contents() == 38
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "llama.block_count":
            continue
        assert out.fields[key].contents() == field.contents(), key
    assert "{% for message in messages %}" in out.fields["tokenizer.chat_template"].contents()


def test_merged_file_loads_in_llama_cpp(merged):
    import llama_cpp

    from evals.llama_cpp_model import load_without_weight_repacking

    load_without_weight_repacking()  # as the project loads every model (AMX machines segfault otherwise)
    # logits_all: without it llama-cpp-python 0.3 no longer copies logits into ``scores``, whose rows
    # stay uninitialised memory (a CI run read garbage there and failed)
    llm = llama_cpp.Llama(str(merged), n_ctx=64, logits_all=True, verbose=False)
    try:
        assert llm.metadata["llama.block_count"] == "38"
        tokens = llm.tokenize(b"The capital of France is", add_bos=False)
        llm.eval(tokens)
        logits = llm.scores[len(tokens) - 1]
        assert np.isfinite(logits).all() and logits.std() > 0.1
    finally:
        llm.close()


@pytest.mark.slow
def test_merged_file_loads_in_transformers(merged):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(merged.parent), gguf_file=merged.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    assert model.config.num_hidden_layers == 38 and len(model.model.layers) == 38
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3458, 282]])).logits
    assert torch.isfinite(logits).all()


def test_identity_plan_rewrites_the_same_tensors(base_gguf, tmp_path):
    out = merge_gguf(base_gguf, LayerPlan.identity(30), tmp_path / "same.gguf")
    a, b = read_gguf_header(base_gguf), read_gguf_header(out)
    # the base lists blocks as blk.0, blk.1, blk.10, ...; the merge writes them in plan order
    assert sorted((t.name, t.dims, t.ggml_type, t.n_bytes) for t in a.tensors) == sorted((t.name, t.dims, t.ggml_type, t.n_bytes) for t in b.tensors)


def _tiny_gguf(path, n_layers=4):
    """A 4-block llama-shaped GGUF with a per-layer metadata array, written with gguf-py."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_head_count_kv([1, 2, 3, 4][:n_layers])  # a per-layer array, as some models have
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    for layer in range(n_layers):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.full(8, layer, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", np.full((3, 8), 10 + layer, dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_per_layer_metadata_follows_the_plan(tmp_path):
    base = _tiny_gguf(tmp_path / "tiny.gguf")
    out = merge_gguf(base, LayerPlan.parse("0-3,1-4"), tmp_path / "tiny-merged.gguf")
    reader = GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 6
    assert reader.fields["llama.attention.head_count_kv"].contents() == [1, 2, 3, 2, 3, 4]
    norms = [reader.get_tensor(i) for i in range(len(reader.tensors)) if reader.tensors[i].name.endswith("attn_norm.weight")]
    assert [int(t.data[0]) for t in norms] == [0, 1, 2, 1, 2, 3]
    assert [t.name for t in reader.tensors][0] == "token_embd.weight" and reader.tensors[-1].name == "output_norm.weight"


def test_not_a_gguf_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SelfMergeError, match="is not a GGUF file"):
        merge_gguf(fake, PLAN, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_gguf_is_a_clear_error(base_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base_gguf.read_bytes()[:100_000])
    with pytest.raises(SelfMergeError, match="truncated"):
        merge_gguf(cut, PLAN, tmp_path / "out.gguf")


def test_plan_past_the_last_layer_writes_nothing(base_gguf, tmp_path):
    with pytest.raises(SelfMergeError, match=r"slice 2 \(8-34\) ends past layer 30"):
        merge_gguf(base_gguf, LayerPlan.parse("0-16,8-34"), tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_its_base(tmp_path):
    base = _tiny_gguf(tmp_path / "tiny.gguf")
    before = base.read_bytes()
    with pytest.raises(SelfMergeError, match="overwrite the base"):
        merge_gguf(base, LayerPlan.parse("0-3,1-4"), base)
    assert base.read_bytes() == before


def test_a_failed_merge_leaves_no_partial_file(base_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(base_gguf, "rb") as src:
        truncated.write_bytes(src.read(40 * 2**20))  # the header is whole, the tensor data is not
    out = tmp_path / "out" / "merged.gguf"
    with pytest.raises(SelfMergeError, match="truncated"):
        merge_gguf(truncated, PLAN, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_header_is_read_once_per_version_of_its_file(base_gguf, tmp_path):
    """A sweep merges from the same sources every trial: their headers are parsed once, and again only
    when a file changes (here: another merge written over the same name)."""
    out = tmp_path / "m.gguf"
    merge_gguf(base_gguf, LayerPlan.parse("0-20,14-30"), out)
    first = read_gguf_header(out)
    assert read_gguf_header(out) is first and read_gguf_header(base_gguf) is read_gguf_header(base_gguf)
    merge_gguf(base_gguf, PLAN, out)
    again = read_gguf_header(out)
    assert again is not first and again.block_count == PLAN.n_layers != first.block_count
