"""A base spread over several GPUs (backend.device_map): what each worker's GPUs may hold, where
accelerate puts the layers over fake GPU lists, and in-memory plans over a dispatched base (accelerate's
hooks, here on CPU devices) that score and generate as plans over a plain base, sharing its weights."""

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoConfig, AutoModelForCausalLM

from evals.eqbench_eval import EQBenchEval, _messages
from evals.torch_model import TorchModel
from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import GPU_RESERVE, check_on_gpus, load_causal_lm, max_memory, merged_model

from tiny_models import build_tiny

PLAN = LayerPlan.parse("0-4,2-6,3-6")  # layers 2, 3 twice and 3 three times: shared weights, own KV slots


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama", n_layers=6, dtype=torch.float32)


def _on_meta(folder):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def test_a_worker_s_share_of_each_gpu_is_its_free_memory_less_the_reserve():
    free = {0: 80 << 30, 1: 60 << 30, 2: 80 << 30, 3: 80 << 30}
    memory = max_memory((2, 3), free)
    assert memory == {2: int(0.85 * (80 << 30)), 3: int(0.85 * (80 << 30))} and GPU_RESERVE == 0.15
    assert not {0, 1} & set(memory)  # another worker's GPUs are never offered to accelerate


def test_accelerate_spreads_the_layers_over_the_worker_s_fake_gpus(tiny):
    """Given what ``max_memory`` offers on two fake GPUs that each hold ~75% of the model, every layer
    lands on one of them, in order; on two GPUs too small, the offload to cpu/disk is refused by name."""
    meta = _on_meta(tiny)
    total = compute_module_sizes(meta)[""]
    memory = max_memory(
        (4, 5), {4: int(0.75 * total / (1 - GPU_RESERVE)), 5: int(0.75 * total / (1 - GPU_RESERVE))}
    )
    placed = infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=meta._no_split_modules)
    check_on_gpus(placed, (4, 5))
    layers = [placed[f"model.layers.{i}"] for i in range(6)]
    assert set(layers) == {4, 5} and layers == sorted(layers)  # both GPUs used, layers in order
    small = max_memory((4, 5), {4: total // 4, 5: total // 4})
    offloaded = infer_auto_device_map(
        meta, max_memory={**small, "cpu": 10 * total}, no_split_module_classes=meta._no_split_modules
    )
    with pytest.raises(
        SelfMergeError, match=r"the base does not fit GPUs 4, 5: accelerate put \d+ modules on cpu"
    ):
        check_on_gpus(offloaded, (4, 5))


def test_device_map_on_a_cpu_is_refused_with_the_key(tiny):
    with pytest.raises(
        SelfMergeError, match="backend.device_map=auto spreads the model over GPUs, but the device is cpu"
    ):
        load_causal_lm(tiny, "float32", "cpu", device_map="auto")
    with pytest.raises(SelfMergeError, match="backend.device_map='everywhere' is unknown"):
        load_causal_lm(tiny, "float32", "cpu", device_map="everywhere")


def _dispatched(folder):
    """The base as accelerate dispatches it, a hook on every module of the map (CPU devices here:
    ``force_hooks``), as ``from_pretrained(device_map=...)`` leaves it over several GPUs."""
    model, _ = load_causal_lm(folder, "float32", "cpu")
    names = [f"model.{name}" for name, _ in model.model.named_children() if name != "layers"]
    names += [f"model.layers.{i}" for i in range(len(model.model.layers))] + ["lm_head"]
    return dispatch_model(model, device_map=dict.fromkeys(names, "cpu"), force_hooks=True)


@pytest.mark.slow
def test_plans_over_a_dispatched_base_score_and_generate_as_over_a_plain_one(tiny):
    plain, tokenizer = load_causal_lm(tiny, "float32", "cpu")
    spread = _dispatched(tiny)
    assert "_hf_hook" in spread.model.layers[0].__dict__
    merged = merged_model(spread, PLAN)
    layers = merged.model.layers
    for position, layer in enumerate(layers):  # each copy runs through its own hook, to its own attention
        base_layer = spread.model.layers[PLAN.layer_indices[position]]
        assert layer.__dict__["_hf_hook"] is base_layer._hf_hook  # the base layer's device
        assert layer.forward is not base_layer.forward and layer.self_attn.layer_idx == position
    # repeated layers cost no memory: the very tensors of the base
    assert layers[4].mlp.down_proj.weight.data_ptr() == spread.model.layers[2].mlp.down_proj.weight.data_ptr()
    windows = [list(range(i, i + 64)) for i in range(1, 129, 32)]
    expected = TorchModel(merged_model(plain, PLAN), tokenizer, n_ctx=64)
    got = TorchModel(merged, tokenizer, n_ctx=64)
    for a, b in zip(got.windows_nll(windows, 31), expected.windows_nll(windows, 31)):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))
    # generation fills a KV cache per position: a copy running the original's attention would overwrite
    # the slot of the base layer's first position and change the text
    conversations = [_messages(item) for item in EQBenchEval("offline", n_items=3, seed=2).items]
    assert got.chat_batch(conversations, 20) == expected.chat_batch(conversations, 20)
    assert got.chat(conversations[0], 20) == expected.chat(conversations[0], 20)
