"""Attenuated repeats (LayerPlan.scales) on every path, per family: the safetensors folder against a
hand-made reference and against branch outputs multiplied by hooks, the in-memory torch model against
that folder, GGUF against the converted folder and in llama.cpp; quantized blocks scaled in place."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from evals.llama_cpp_model import LlamaCppModel
from evals.torch_model import TorchModel
from merge_core.errors import SelfMergeError
from merge_core.gguf_convert import convert_hf_to_gguf
from merge_core.gguf_merge import merge_gguf
from merge_core.gguf_scale import check_scalable, scale_tensor_bytes
from merge_core.hf_checkpoint import HFCheckpoint
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import read_mergekit_yaml
from merge_core.model_files import bundled_model_path
from merge_core.safetensors_merge import merge_safetensors
from merge_core.torch_merge import load_causal_lm, merged_model
from tiny_models import build_finetune, build_tiny

PLAN = LayerPlan.parse("0-4,2-6,3-6@qk=0.5,attn_out=0.25,mlp_out=2")  # 2 and 3 repeat, 3 twice
TEXT = "Return the number of items in a container, or raise TypeError if it has no length. " * 12
# written by hand, not read from the architecture table: the module whose output each factor multiplies
# (the projection, or the norm after it), the one place where the scale is exact
BRANCHES = {
    "llama": {"qk": ("self_attn.q_proj", "self_attn.k_proj"), "attn_out": ("self_attn.o_proj",), "mlp_out": ("mlp.down_proj",)},
    "qwen2": {"qk": ("self_attn.q_proj", "self_attn.k_proj"), "attn_out": ("self_attn.o_proj",), "mlp_out": ("mlp.down_proj",)},
    "qwen3": {"qk": ("self_attn.q_norm", "self_attn.k_norm"), "attn_out": ("self_attn.o_proj",), "mlp_out": ("mlp.down_proj",)},
    "gemma3": {"qk": ("self_attn.q_norm", "self_attn.k_norm"), "attn_out": ("post_attention_layernorm",),
               "mlp_out": ("post_feedforward_layernorm",)},
}  # fmt: skip


@pytest.fixture(scope="module", params=list(BRANCHES))
def tiny(request, tmp_path_factory):
    """A tiny float32 model with every tensor nudged off its init (zero biases would hide a missed bias)."""
    tmp = tmp_path_factory.mktemp(request.param)
    return request.param, build_finetune(
        build_tiny(request.param, tmp / "init", dtype=torch.float32), tmp / "model", 1, 0.5
    )


def _repeats(plan):
    """Output positions of a layer's second and later use, found here the simple way."""
    return [p for p, layer in enumerate(plan.layer_indices) if layer in plan.layer_indices[:p]]


def _tensors(folder):
    checkpoint = HFCheckpoint.open(folder)
    out = {}
    for path in {entry.file for entry in checkpoint.tensors.values()}:
        with safe_open(path, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _hooked_logits(folder, kind, plan, ids):
    """Logits of the unscaled merge with each repeat's branch outputs multiplied by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for position in _repeats(plan):
        layer = model.model.layers[position]
        for role, modules in BRANCHES[kind].items():
            factor = getattr(plan.scales, role)
            for name in modules:
                layer.get_submodule(name).register_forward_hook(lambda m, i, out, f=factor: out * f)
    with torch.no_grad():
        return model(ids).logits


def test_scaled_safetensors_equal_the_hand_made_reference_and_the_hooked_branches(tiny, tmp_path):
    kind, folder = tiny
    scaled = merge_safetensors(folder, PLAN, tmp_path / "scaled", model_name="org/tiny")
    plain = merge_safetensors(folder, PLAN.unscaled(), tmp_path / "plain", model_name="org/tiny")
    got, want = _tensors(scaled), _tensors(plain)
    assert got.keys() == want.keys()
    repeats, changed = set(_repeats(PLAN)), set()
    for name, tensor in want.items():
        parts = name.split(".")
        expected = tensor
        if name.startswith("model.layers.") and int(parts[2]) in repeats:
            for role, modules in BRANCHES[kind].items():
                if ".".join(parts[3:-1]) in modules:
                    factor = getattr(PLAN.scales, role)
                    expected = (
                        (tensor + 1) * factor - 1 if kind == "gemma3" and "norm" in name else tensor * factor
                    )
                    changed.add(name)
        assert torch.allclose(got[name], expected, rtol=1e-6, atol=1e-7), name
        assert torch.equal(got[name], tensor) == (name not in changed), name
    assert len(changed) >= 4 * len(repeats)  # weights (and Qwen2's q/k biases) of every repeat
    ids = torch.tensor([list(range(3, 99))])
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(scaled, dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(logits, _hooked_logits(plain, kind, PLAN, ids), atol=1e-4)
    assert not torch.allclose(logits, _hooked_logits(plain, kind, PLAN.unscaled(), ids), atol=1e-2)
    if kind == "gemma3":  # mergekit multiplies Gemma's stored norm weight (w - 1): no recipe can say it
        assert (scaled / "mergekit_config.yml").read_text().startswith("# no mergekit recipe: plan ")
    else:
        assert read_mergekit_yaml(scaled / "mergekit_config.yml") == (PLAN, "org/tiny")


def test_in_memory_scaled_repeats_copy_no_weight_and_match_the_scaled_folder(tiny, tmp_path):
    kind, folder = tiny
    from transformers import AutoModelForCausalLM

    base, tokenizer = load_causal_lm(folder, "float32", "cpu")
    merged = merged_model(base, PLAN)
    assert {p.data_ptr() for p in merged.parameters()} <= {p.data_ptr() for p in base.parameters()}
    on_disk = AutoModelForCausalLM.from_pretrained(
        merge_safetensors(folder, PLAN, tmp_path / "m"), dtype=torch.float32
    )
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:96]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, on_disk.eval()(ids).logits, atol=1e-4)
        unscaled = merged_model(base, PLAN.unscaled())(ids).logits  # the base and its other merges untouched
        assert torch.equal(unscaled, merged_model(base, PLAN.unscaled())(ids).logits)
        assert not torch.allclose(unscaled, merged(ids).logits, atol=1e-2)


def test_scaled_gguf_equals_the_converted_scaled_folder_and_scores_like_transformers(tiny, tmp_path):
    kind, folder = tiny
    base = convert_hf_to_gguf(folder, tmp_path / "base.f16.gguf")
    merged = merge_gguf(base, PLAN, tmp_path / "merged.gguf")
    converted = convert_hf_to_gguf(
        merge_safetensors(folder, PLAN, tmp_path / "scaled"), tmp_path / "conv.gguf"
    )
    ours, theirs = (
        {t.name: t.data.astype(np.float32) for t in GGUFReader(p).tensors} for p in (merged, converted)
    )
    assert ours.keys() == theirs.keys()
    for name in ours:  # scaled in f16 here, in f32 before the conversion there: one f16 rounding apart
        assert np.allclose(ours[name], theirs[name], rtol=2**-10, atol=1e-6), name
    base_model, tokenizer = load_causal_lm(folder, "float32", "cpu")
    torch_model = TorchModel(merged_model(base_model, PLAN), tokenizer, n_ctx=128)
    with LlamaCppModel(merged, n_ctx=128) as llama:
        window = torch_model.tokenize(TEXT)[:128]
        assert np.abs(llama.window_nll(window, 64) - torch_model.window_nll(window, 64)).max() < 0.02


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"])
def test_block_scales_multiply_every_value_of_a_quantized_tensor(name):
    qtype = GGMLQuantizationType[name]
    values = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    blocks = quantize(values, qtype)
    scaled = np.frombuffer(scale_tensor_bytes("w", qtype, blocks.tobytes(), 0.7071), dtype=blocks.dtype)
    before, after = dequantize(blocks, qtype), dequantize(scaled.reshape(blocks.shape), qtype)
    # only the fp16 (bf16) rounding of the block scales (or the values) differs from the exact product
    assert np.abs(after - 0.7071 * before).max() <= 2**-8 * np.abs(before).max()
    power_of_two = np.frombuffer(scale_tensor_bytes("w", qtype, blocks.tobytes(), 0.5), dtype=blocks.dtype)
    assert np.array_equal(
        dequantize(power_of_two.reshape(blocks.shape), qtype), 0.5 * before
    )  # normal scales


def _gemma():
    from merge_core.model_files import packaged_model_path

    return packaged_model_path("gemma3-270m")


@pytest.mark.slow
def test_real_models_are_scaled_in_their_own_types(tmp_path):
    """The bundled model's Q4_1 projections and Gemma 3 270M's F32 norms: every scaled tensor
    dequantizes to the factor times the source's, every other is the same bytes."""
    llama = {"attn_q": "qk", "attn_k": "qk", "attn_output": "attn_out", "ffn_down": "mlp_out"}
    gemma = {
        "attn_q_norm": "qk",
        "attn_k_norm": "qk",
        "post_attention_norm": "attn_out",
        "post_ffw_norm": "mlp_out",
    }
    for path, text, roles, kinds in ((bundled_model_path(), "0-16,8-30@qk=0.7071,out=0.5", llama, {"Q4_1"}),
                                     (_gemma(), "0-12,6-18@qk=0.7071,out=0.5", gemma, {"F32"})):  # fmt: skip
        plan = LayerPlan.parse(text)
        scaled = {t.name: t for t in GGUFReader(merge_gguf(path, plan, tmp_path / "s.gguf")).tensors}
        plain = {
            t.name: t for t in GGUFReader(merge_gguf(path, plan.unscaled(), tmp_path / "p.gguf")).tensors
        }
        types = set()
        for name, tensor in plain.items():
            parts = name.split(".")
            role = roles.get(parts[2]) if parts[0] == "blk" and int(parts[1]) in _repeats(plan) else None
            if role:
                want = getattr(plan.scales, role) * dequantize(tensor.data, tensor.tensor_type)
                got = dequantize(scaled[name].data, scaled[name].tensor_type)
                assert np.abs(got - want).max() <= 2**-10 * np.abs(want).max(), name
                types.add(tensor.tensor_type.name)
            else:
                assert np.array_equal(scaled[name].data, tensor.data), name
        assert types == kinds, path


@pytest.mark.slow
def test_k_quant_blocks_of_a_real_model_scale_in_place():
    """Each block type of Gemma 3 270M's Q4_K_M file (Q4_K, Q6_K, ...) and the bundled Q4_1 / Q8_0."""
    seen = {}
    for path in (_gemma(), bundled_model_path()):
        for tensor in GGUFReader(path).tensors:
            seen.setdefault(tensor.tensor_type.name, tensor)
    assert {"Q4_K", "Q6_K", "Q4_1", "Q8_0"} <= set(seen)
    for name, tensor in seen.items():
        before = dequantize(tensor.data, tensor.tensor_type)
        for factor in (0.7071, 0.5):  # a power of two only loses the last bit of subnormal fp16 scales
            data = scale_tensor_bytes(tensor.name, tensor.tensor_type, tensor.data.tobytes(), factor)
            after = dequantize(
                np.frombuffer(data, dtype=tensor.data.dtype).reshape(tensor.data.shape), tensor.tensor_type
            )
            assert np.abs(after - factor * before).max() <= 2**-10 * np.abs(before).max(), (name, factor)


def test_types_without_a_plain_block_factor_and_bad_factors_are_one_line(tmp_path):
    with pytest.raises(
        SelfMergeError, match=r"tensor blk.3.attn_q.weight is IQ2_XXS, whose blocks have no plain fp16"
    ):
        check_scalable("blk.3.attn_q.weight", GGMLQuantizationType.IQ2_XXS)
    odd = build_tiny("llama", tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(
        json.dumps({**config, "architectures": ["OddForCausalLM"], "model_type": "odd"})
    )
    merge_safetensors(odd, PLAN.unscaled(), tmp_path / "plain")  # the passthrough itself needs no table
    with pytest.raises(SelfMergeError, match="OddForCausalLM|not in the architecture table"):
        merge_safetensors(odd, PLAN, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
