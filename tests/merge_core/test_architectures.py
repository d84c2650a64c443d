"""The architecture table: lookups, the refusal message, and the one re-order planner that the GGUF
merge, the safetensors merge and the size bound share."""

from dataclasses import dataclass

import pytest

from merge_core import architectures
from merge_core.architectures import GGUF_LAYERS, HF_LAYERS, merged_config, plan_tensors
from merge_core.errors import SelfMergeError
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merged_size_bound, merged_tensor_order
from merge_core.layer_plan import LayerPlan


@dataclass(frozen=True)
class T:
    name: str


def test_lookup_by_class_then_model_type():
    assert architectures.find("MistralForCausalLM").gguf_arch == "llama"
    assert architectures.find(None, "qwen2").name == "qwen2"
    assert architectures.find("GPT2LMHeadModel", "llama") is None  # a named class is not guessed from model_type
    assert architectures.of_config({"architectures": ["LlamaForCausalLM"]}).permute_qk


def test_unsupported_is_refused_with_the_supported_list():
    with pytest.raises(SelfMergeError, match=r"architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, Mistral"):
        architectures.of_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(SelfMergeError, match=r"architecture gpt2 is not supported"):
        architectures.of_config({"model_type": "gpt2"})


def test_layer_names_split_and_build():
    assert HF_LAYERS.split("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj.weight")
    assert HF_LAYERS.split("model.embed_tokens.weight") is None
    assert HF_LAYERS.split("model.layers_extra.1.x") is None
    assert GGUF_LAYERS.name(3, "attn_q.weight") == "blk.3.attn_q.weight"
    assert GGUF_LAYERS.split("blk.10.ffn_up.weight") == (10, "ffn_up.weight")


def test_plan_tensors_puts_the_plan_where_the_layers_were():
    tensors = [T("token_embd.weight"), *(T(f"blk.{i}.{s}") for i in range(4) for s in ("a", "b")), T("output_norm.weight")]
    order = plan_tensors(tensors, LayerPlan.parse("0-3,1-4"), GGUF_LAYERS)
    names = [name for name, _ in order]
    assert names[0] == "token_embd.weight" and names[-1] == "output_norm.weight"
    assert names[1:-1] == [f"blk.{i}.{s}" for i in range(6) for s in ("a", "b")]
    sources = [source.name for _, source in order[1:-1]]
    assert sources == [f"blk.{i}.{s}" for i in (0, 1, 2, 1, 2, 3) for s in ("a", "b")]  # layers 1 and 2 twice


def test_gguf_order_and_size_bound_share_the_planner(base_gguf):
    header = read_gguf_header(base_gguf)
    plan = LayerPlan.parse("0-16,8-30")
    order = [(name, tensor) for name, _, tensor in merged_tensor_order({"": header}, plan)]
    assert order == plan_tensors(header.tensors, plan, GGUF_LAYERS)
    assert sum(1 for name, _ in order if name.startswith("blk.")) == 38 * sum(1 for t in header.tensors if t.name.startswith("blk.0."))
    data = sum(source.n_bytes for _, source in order)
    assert data < merged_size_bound(header, plan) < data + header.data_start + 2**20  # a bound, and a tight one


def test_merged_config_moves_every_per_layer_list():
    config = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "architectures": ["X", "Y", "Z", "W"], "other": [1, 2]}
    merged = merged_config(config, LayerPlan.parse("0-3,1-4"))
    assert merged["num_hidden_layers"] == 6
    assert merged["layer_types"] == ["a", "b", "c", "b", "c", "d"]
    assert merged["architectures"] == config["architectures"] and merged["other"] == [1, 2]
    assert config["num_hidden_layers"] == 4  # the input is left alone
