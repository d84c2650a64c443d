"""Convert a Hugging Face checkpoint (a family of merge_core/architectures.py) to an F16/BF16 GGUF that
llama.cpp loads, with the ``gguf`` package: tensor names from gguf's name maps, hyper-parameters,
tokenizer (byte-level BPE or SentencePiece-style) and chat template as metadata.

Tensors are streamed: the header is written from the safetensors headers, then one tensor at a time
is read, converted and written, so memory holds one tensor, not the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from merge_core import architectures
from merge_core.byte_copy import written_as_partial
from merge_core.errors import SelfMergeError, read_json
from merge_core.hf_checkpoint import HFCheckpoint

OUT_TYPES = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16), "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
ROPE_TYPES = ("default", "linear", "llama3")  # llama3: written as the rope_freqs tensor (llama3_rope_factors)
GGUF_ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "llama" -> gguf.MODEL_ARCH.LLAMA
# tokenizer.json pre-tokenizers llama.cpp knows, by what they split on -> its tokenizer.ggml.pre name
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _rope_to_interleaved(weight, n_head: int):
    """HF Llama stores q/k rows for rotate-half RoPE; llama.cpp's llama arch wants them interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, from how tokenizer.json splits text."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    split = next((step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"), None)
    if split == _LLAMA3_SPLIT:
        return "llama-bpe"
    if split == _QWEN2_SPLIT:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise SelfMergeError(f"tokenizer.json pre-tokenizer {kinds} (split {split!r}) is not one llama.cpp is known to handle here")


def _add_bpe_vocab(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int) -> None:
    by_id = {token_id: (text, gguf.TokenType.NORMAL) for text, token_id in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    tokens, types = [], []
    for token_id in range(max(vocab_size, len(by_id))):
        text, kind = by_id.get(token_id, (f"[PAD{token_id}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_spm_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for token_id in range(len(tokens), vocab_size):  # the embedding may be padded past the vocabulary
        tokens.append(f"[PAD{token_id}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SelfMergeError(f"{folder} has no tokenizer.json: GGUF conversion needs the fast tokenizer file")
    tokenizer_json = read_json(path)
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise SelfMergeError(f"tokenizer model {model.get('type')!r} is not supported for GGUF conversion (byte-level or SentencePiece-style BPE)")
    if model.get("byte_fallback"):
        _add_spm_vocab(writer, folder, vocab_size)
    else:
        _add_bpe_vocab(writer, tokenizer_json, vocab_size)
    gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types


def _rope(config: dict, layer_type: str = FULL) -> tuple[dict, str]:
    """The RoPE parameters (transformers 5's ``rope_parameters``, or 4's ``rope_scaling``) and their type.
    Models with sliding-window layers key them by layer type (Gemma 3: 10k locally, 1M globally)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise SelfMergeError(f"rope scaling {rope_type!r} is not supported by GGUF conversion here ({', '.join(ROPE_TYPES)}); use backend=torch")
    return rope, rope_type


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3.x's frequency-dependent RoPE scaling as llama.cpp reads it: a ``rope_freqs`` tensor of one
    divisor per rotary frequency (1 for short wavelengths, ``factor`` for long ones, smooth between),
    computed as transformers' ``_compute_llama3_parameters`` scales the inverse frequencies."""
    rope, _ = _rope(config)
    dim, base = _head_dim(config), float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    wavelengths = 2 * np.pi / base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = np.clip((old_context / wavelengths - low) / (high - low), 0.0, 1.0)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors[wavelengths < old_context / high] = 1.0
    factors[wavelengths > old_context / low] = factor
    return factors.astype(np.float32)


def _add_hparams(writer: gguf.GGUFWriter, config: dict, name: str, file_type: int) -> None:
    rope, rope_type = _rope(config)
    n_head = config["num_attention_heads"]
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    _add_sliding_window(writer, config)


def _add_sliding_window(writer: gguf.GGUFWriter, config: dict) -> None:
    """Which layers slide, one flag per layer (config.json's ``layer_types``), their window and RoPE
    base. Written per layer, never as llama.cpp's index-derived default, so a self-merge of the GGUF
    re-indexes the flags with the layers and each layer keeps its attention kind."""
    arch = architectures.of_config(config)
    layer_types = config.get("layer_types") or []
    if not arch.swa_period or SLIDING not in layer_types:
        return
    scalar = config.get("query_pre_attn_scalar")
    if scalar and scalar != _head_dim(config):  # llama.cpp scales queries by 1/sqrt(head_dim) here
        raise SelfMergeError(
            f"query_pre_attn_scalar={scalar} differs from head_dim={_head_dim(config)}: llama.cpp would "
            "score this model with another attention scale; use backend=torch"
        )
    local, _ = _rope(config, SLIDING)
    writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_sliding_window_pattern([kind == SLIDING for kind in layer_types])
    writer.add_rope_freq_base_swa(float(local.get("rope_theta", config.get("rope_local_base_freq", 10000.0))))


def convert_hf_to_gguf(source: str | Path, out_path: str | Path, out_type: str = "f16", progress: bool = False) -> Path:
    """Write the GGUF of the HF folder ``source``; 2-D weights in ``out_type`` (f16|bf16), norms and
    biases in F32 as llama.cpp's own converter does. Written under ``.partial``, renamed at the end."""
    from safetensors import safe_open  # torch only here: a config check must not load it

    if out_type not in OUT_TYPES:
        raise SelfMergeError(f"GGUF output type {out_type!r} is not supported; choose one of {list(OUT_TYPES)}")
    checkpoint = HFCheckpoint.open(source)
    arch = checkpoint.check_supported()
    config = checkpoint.config
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(GGUF_ARCHS[arch.gguf_arch], checkpoint.n_layers)
    weight_type, file_type = OUT_TYPES[out_type]

    plan = []  # (HF name, GGUF name, GGML type)
    for hf_name, entry in checkpoint.tensors.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", arch.tied_embeddings):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            raise SelfMergeError(f"tensor {hf_name} of {checkpoint.architecture} has no GGUF name")
        plan.append((hf_name, gguf_name, gguf.GGMLQuantizationType.F32 if len(entry.shape) == 1 else weight_type))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with written_as_partial(out_path) as partial:
        writer = gguf.GGUFWriter(partial, arch.gguf_arch)
        _add_hparams(writer, config, config.get("_name_or_path") or checkpoint.folder.name, file_type)
        _add_tokenizer(writer, checkpoint.folder, config["vocab_size"])
        for hf_name, gguf_name, ggml_type in plan:
            shape = checkpoint.tensors[hf_name].shape
            n_bytes = int(np.prod(shape)) * (4 if ggml_type == gguf.GGMLQuantizationType.F32 else 2)
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if ggml_type == gguf.GGMLQuantizationType.F32 else np.float16), n_bytes, raw_dtype=ggml_type)
        rope_freqs = llama3_rope_factors(config) if _rope(config)[1] == "llama3" else None
        if rope_freqs is not None:  # outside the layers: a self-merge keeps it as it is
            writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs.shape, rope_freqs.dtype,
                                   rope_freqs.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        files: dict[Path, object] = {}
        try:
            for hf_name, gguf_name, ggml_type in tqdm(plan, desc="convert to GGUF", unit="tensor", disable=not progress, leave=False):
                entry = checkpoint.tensors[hf_name]
                if entry.file not in files:
                    files[entry.file] = safe_open(entry.file, framework="pt")
                tensor = files[entry.file].get_tensor(hf_name).float()
                if arch.norm_offset and hf_name.endswith("norm.weight"):
                    tensor = tensor + arch.norm_offset
                if arch.permute_qk and hf_name.endswith("q_proj.weight"):
                    tensor = _rope_to_interleaved(tensor, n_head)
                elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
                    tensor = _rope_to_interleaved(tensor, n_head_kv)
                writer.write_tensor_data(_encode(tensor, ggml_type))
            if rope_freqs is not None:
                writer.write_tensor_data(rope_freqs)
        finally:
            writer.close()
    return out_path


def _encode(tensor, ggml_type) -> np.ndarray:
    import torch

    if ggml_type == gguf.GGMLQuantizationType.F32:
        return tensor.numpy().astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return tensor.numpy().astype(np.float16)
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # BF16 bits as they are
