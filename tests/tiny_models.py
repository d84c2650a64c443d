"""Tiny random Llama / Llama 3 / Mistral / Qwen2 / Qwen3 / Gemma 3 checkpoints with a real byte-level BPE
tokenizer, built in seconds with no download: the HF path's tests run on them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from evals.corpus import stdlib_docstrings

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([stdlib_docstrings(200_000)], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "unk_token": SPECIAL[0],
              "pad_token": SPECIAL[2], "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def build_tiny(kind: str, folder: Path, n_layers: int = 6, hidden: int = 64, dtype=torch.bfloat16, max_shard_size=None, seed: int = 0,
               config: dict | None = None) -> Path:
    """A random ``kind`` model saved as safetensors, with its tokenizer: llama | mistral | qwen2 | qwen3,
    llama3 (Llama with Llama 3.x's RoPE scaling, its frequencies rescaled within the tiny head size), or
    gemma3 (a global layer after every two sliding ones, so a plan moves global layers off llama.cpp's
    index-derived places; each kind keeps its own RoPE base, 10k or 1M). ``config``: settings to change."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "llama3": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "gemma3": Gemma3TextConfig}  # fmt: skip
    extra = {"llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 256, "rope_theta": 10000.0}},
             "gemma3": {"head_dim": hidden // 4, "query_pre_attn_scalar": hidden // 4, "sliding_window": 512,
                        "layer_types": [("sliding_attention", "sliding_attention", "full_attention")[i % 3] for i in range(n_layers)]}}  # fmt: skip
    settings = {**extra.get(kind, {}), **(config or {})}
    config = classes[kind](
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=kind in ("qwen2", "qwen3", "gemma3"),
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **settings,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_tokenizer(folder)
    return folder


def build_finetune(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tune" of the tiny model ``base``: every weight nudged by seeded noise (``scale`` x its
    own spread), the same shape, tokenizer and config; a frankenmerge's second source."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
            continue
        tensors = load_file(path)
        for name, tensor in tensors.items():
            noise = torch.randn(tensor.shape, generator=generator) * scale * tensor.float().std().clamp_min(1e-3)
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
        save_file(tensors, folder / path.name, metadata={"format": "pt"})
    return folder
