"""The Hugging Face path on tiny random Llama / Llama 3 / Mistral / Qwen2 / Qwen3 / Gemma 3 checkpoints:
safetensors passthrough, GGUF conversion and quantization, the in-memory torch backend, and their
agreement."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from evals.llama_cpp_model import LlamaCppModel
from evals.torch_model import TorchModel
from merge_core.errors import SelfMergeError
from merge_core.gguf_convert import convert_hf_to_gguf
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf
from merge_core.gguf_quantize import quantize_gguf
from merge_core.hf_checkpoint import HFCheckpoint
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import read_mergekit_yaml
from merge_core.model_shape import ModelShape
from merge_core.safetensors_merge import merge_safetensors
from merge_core.torch_merge import load_causal_lm, merged_model
from tiny_models import build_tiny

PLAN = LayerPlan.parse("0-4,2-6,3-6")  # layers 2 and 3 twice, 3 three times: 11 layers from 6
TEXT = "Return the number of items in a container, or raise TypeError if it has no length. " * 12


@pytest.fixture(scope="module", params=["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"])
def tiny(request, tmp_path_factory):
    """A tiny random model; the Llama one is sharded (index.json) to exercise that path."""
    shard = "150KB" if request.param == "llama" else None
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model", max_shard_size=shard)


def _tensor_bytes(folder, name):
    entry = HFCheckpoint.open(folder).tensors[name]
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        return entry.dtype, entry.shape, f.read(entry.n_bytes)


def test_safetensors_merge_reindexes_every_layer_tensor_byte_for_byte(tiny, tmp_path):
    out = merge_safetensors(tiny, PLAN, tmp_path / "merged", shard_bytes=200_000, model_name="org/tiny")
    base, merged = HFCheckpoint.open(tiny), HFCheckpoint.open(out)
    assert merged.n_layers == PLAN.n_layers == 11
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged.tensors)
    expected = {}
    for name in base.tensors:
        parts = name.split(".")
        if name.startswith("model.layers."):
            for position, layer in enumerate(PLAN.layer_indices):
                if layer == int(parts[2]):
                    expected[".".join(parts[:2] + [str(position)] + parts[3:])] = name
        else:
            expected[name] = name
    assert set(merged.tensors) == set(expected)
    for out_name, base_name in expected.items():
        assert _tensor_bytes(out, out_name) == _tensor_bytes(tiny, base_name), out_name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 11
    if "layer_types" in config:  # Qwen2 lists one attention type per layer
        assert len(config["layer_types"]) == 11
    assert read_mergekit_yaml(out / "mergekit_config.yml") == (PLAN, "org/tiny")
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    with safe_open(out / index["weight_map"]["model.layers.10.mlp.up_proj.weight"], "pt") as f:  # loadable by safetensors itself
        assert f.get_tensor("model.layers.10.mlp.up_proj.weight").shape[0] == 128


def test_in_memory_merge_shares_weights_and_matches_the_merged_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tokenizer = load_causal_lm(tiny, "float32", "cpu")
    merged = merged_model(base, PLAN)
    base_storage = {p.data_ptr() for p in base.parameters()}
    assert {p.data_ptr() for p in merged.parameters()} <= base_storage  # no weight copied
    assert [layer.self_attn.layer_idx for layer in merged.model.layers] == list(range(11))
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == list(range(6))  # the base is untouched
    assert base.config.num_hidden_layers == 6 and merged.config.num_hidden_layers == 11

    on_disk = AutoModelForCausalLM.from_pretrained(merge_safetensors(tiny, PLAN, tmp_path / "m"), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:96]])
    with torch.no_grad():
        logits = merged(ids).logits
        assert torch.equal(logits, on_disk(ids).logits)
        # the perplexity path (layer by layer, no mask, scored half only) gives the forward's own NLLs
        expected = -torch.log_softmax(logits[0, 48:-1].double(), -1).gather(-1, ids[0, 49:, None])[:, 0]
        assert np.allclose(TorchModel(merged, tokenizer).window_nll(ids[0].tolist(), 48), expected.numpy(), atol=1e-5)
        # the KV cache is right only if every position has its own layer_idx: cached decoding equals full passes
        cached = merged.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), max_new_tokens=8, do_sample=False, pad_token_id=2)
        tokens = ids[:, :32]
        for _ in range(8):
            tokens = torch.cat([tokens, merged(tokens, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, tokens)


def test_gguf_conversion_scores_like_transformers(tiny, tmp_path):
    """Tensor names, q/k RoPE layout, biases and tokenizer are right only if llama.cpp's negative
    log-likelihoods match transformers' (a wrong q/k layout gives differences of ~0.5 nats)."""
    gguf = convert_hf_to_gguf(tiny, tmp_path / "tiny.f16.gguf")
    base, tokenizer = load_causal_lm(tiny, "float32", "cpu")
    torch_model = TorchModel(merged_model(base, PLAN), tokenizer, n_ctx=128)
    with LlamaCppModel(merge_gguf(gguf, PLAN, tmp_path / "merged.gguf"), n_ctx=128) as llama:
        assert llama.tokenize(TEXT) == torch_model.tokenize(TEXT)
        window = torch_model.tokenize(TEXT)[:128]
        assert np.abs(llama.window_nll(window, 64) - torch_model.window_nll(window, 64)).max() < 0.02
        assert llama.llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert llama.chat_prompt_tokens([{"role": "user", "content": "hi"}]) == torch_model.chat_prompt_tokens([{"role": "user", "content": "hi"}])


def test_quantize_reuse_and_requantize_agree_for_uniform_types_only(tmp_path_factory):
    """Q8_0 quantizes every layer alike: re-indexing the quantized base (reuse) gives the very file
    that quantizing the merged model does. Q4_K_M gives some layers more bits by position."""
    folder = build_tiny("llama", tmp_path_factory.mktemp("q") / "model", n_layers=8, hidden=256)
    tmp = folder.parent
    gguf = convert_hf_to_gguf(folder, tmp / "base.f16.gguf")
    plan = LayerPlan.parse("0-6,2-8")
    merged_f16 = merge_gguf(gguf, plan, tmp / "merged.f16.gguf")
    differing = {}
    for quant in ("Q8_0", "Q4_K_M"):
        reuse = merge_gguf(quantize_gguf(gguf, tmp / f"base.{quant}.gguf", quant), plan, tmp / f"reuse.{quant}.gguf")
        requantized = quantize_gguf(merged_f16, tmp / f"requant.{quant}.gguf", quant)
        types = [{t.name: t.ggml_type for t in read_gguf_header(path).tensors} for path in (reuse, requantized)]
        differing[quant] = sorted(name for name in types[0] if types[0][name] != types[1][name])
        if not differing[quant]:
            assert reuse.read_bytes() == requantized.read_bytes()
    assert differing["Q8_0"] == []
    assert differing["Q4_K_M"] and all(".attn_v." in n or ".ffn_down." in n for n in differing["Q4_K_M"])


def test_bad_input_gets_clear_errors_and_writes_nothing(tiny, tmp_path):
    with pytest.raises(SelfMergeError, match=r"slice 2 \(2-9\) ends past layer 6"):
        merge_safetensors(tiny, LayerPlan.parse("0-4,2-9"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SelfMergeError, match="already exists"):
        merge_safetensors(tiny, PLAN, tmp_path / "taken")
    with pytest.raises(SelfMergeError, match="config.json is missing"):
        HFCheckpoint.open(tmp_path / "taken")
    with pytest.raises(SelfMergeError, match="unknown to llama.cpp"):
        quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q9_X")


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    with pytest.raises(SelfMergeError, match=r"architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_causal_lm(folder)
    with pytest.raises(SelfMergeError, match="architecture GPT2LMHeadModel is not supported"):
        convert_hf_to_gguf(folder, tmp_path / "g.gguf")


@pytest.mark.parametrize("load_in", ["nf4", "int8"])
def test_a_base_quantized_in_memory_is_shared_by_its_plans(load_in, tmp_path):
    """backend.load_in: bitsandbytes quantizes the layers' linear weights while loading; a plan's
    repeated layers are the same quantized modules (0 extra bytes) and score as the merged folder
    loaded the same way."""
    pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes (the test extra installs it)")
    folder = build_tiny("llama", tmp_path / "model", hidden=128, dtype=torch.float32)
    full, tokenizer = load_causal_lm(folder, "float32", "cpu")
    base, _ = load_causal_lm(folder, "float32", "cpu", load_in=load_in)
    assert type(base.model.layers[0].mlp.up_proj).__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[load_in]
    assert base.get_memory_footprint() < 0.8 * full.get_memory_footprint()
    merged = merged_model(base, PLAN)
    assert {p.data_ptr() for p in merged.parameters()} <= {p.data_ptr() for p in base.parameters()}
    assert merged.model.layers[4].mlp.up_proj is base.model.layers[2].mlp.up_proj  # the very same module
    on_disk, _ = load_causal_lm(merge_safetensors(folder, PLAN, tmp_path / "merged"), "float32", "cpu", load_in=load_in)
    window = tokenizer(TEXT)["input_ids"][:96]
    quantized = TorchModel(merged, tokenizer).window_nll(window, 48)
    assert np.allclose(quantized, TorchModel(on_disk, tokenizer).window_nll(window, 48), atol=1e-4)
    exact = TorchModel(merged_model(full, PLAN), tokenizer).window_nll(window, 48)
    assert not np.array_equal(quantized, exact)  # quantized indeed, and its mean NLL within 5% of the exact one
    assert abs(quantized.mean() - exact.mean()) < 0.05 * exact.mean()


def test_load_in_and_size_refusals_name_the_problem(tmp_path, monkeypatch):
    from merge_core import torch_merge

    tiny = build_tiny("llama", tmp_path / "model")
    with pytest.raises(SelfMergeError, match=r"backend.load_in='int4' is unknown; choose one of \['none', 'int8', 'nf4'\]"):
        load_causal_lm(tiny, load_in="int4")
    gguf = convert_hf_to_gguf(tiny, tmp_path / "tiny.gguf")
    with pytest.raises(SelfMergeError, match="backend.load_in=nf4 needs a Hugging Face model; tiny.gguf is a GGUF"):
        load_causal_lm(gguf, load_in="nf4")
    monkeypatch.setattr(torch_merge, "_free_bytes", lambda device: 100_000)  # a device with 97.7 KiB free
    need, need_nf4 = (torch_merge._size(ModelShape.of(tiny).loaded_bytes(4, load_in)) for load_in in ("none", "nf4"))
    assert need.endswith(" MiB") and need_nf4.endswith(" KiB")  # nf4: about a third of float32 here (embeddings stay)
    with pytest.raises(SelfMergeError, match=rf"needs {need} in float32 but cpu has 97\.7 KiB free; backend.load_in=nf4"):
        load_causal_lm(tiny, "float32", "cpu")
    with pytest.raises(SelfMergeError, match=rf"needs {need_nf4} in nf4 \(float32 outside"):
        load_causal_lm(tiny, "float32", "cpu", load_in="nf4")
