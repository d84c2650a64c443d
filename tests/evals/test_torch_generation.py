"""Batched generation on the torch backend gives the very text one-at-a-time generation gives."""

import pytest
import torch

from evals.eqbench_eval import EQBenchEval, _messages
from evals.torch_model import TorchModel
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import load_causal_lm, merged_model

from tiny_models import build_tiny


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_replies_equal_one_at_a_time_in_fp32(tmp_path, kind):
    base, tokenizer = load_causal_lm(build_tiny(kind, tmp_path / kind, n_layers=6, dtype=torch.float32), "float32", "cpu")
    model = merged_model(base, LayerPlan.parse("0-4,2-6"))  # repeated layers: their KV cache slots must not mix
    items = EQBenchEval("offline", n_items=5, seed=1).items
    chat = TorchModel(model, tokenizer, n_ctx=2048, gen_batch=2)  # batches of 2, 2 and 1, left-padded
    conversations = [_messages(item) for item in items]
    assert len({len(chat.chat_prompt_tokens(c)) for c in conversations}) > 1  # padding is exercised
    one_by_one = [chat.chat(c, 24) for c in conversations]
    assert chat.chat_batch(conversations, 24) == one_by_one
    assert all(one_by_one)
    assert base.config._attn_implementation != "selfmerge_sdpa_gqa"  # the attention is restored afterwards
