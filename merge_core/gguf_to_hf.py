"""A GGUF model written out as a Hugging Face safetensors folder (transformers dequantizes it), so a
GGUF base can also give safetensors self-merges and feed the torch backend from disk."""

from __future__ import annotations

from pathlib import Path

from merge_core.byte_copy import written_as_partial
from merge_core.errors import SelfMergeError


def export_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    from merge_core.torch_merge import load_causal_lm

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SelfMergeError(f"{out_dir} already exists: remove it or choose another output folder")
    model, tokenizer = load_causal_lm(gguf_path, dtype, "cpu")
    model.config.quantization_config = None  # dequantized: the folder holds plain weights
    del model.config.quantization_config
    with written_as_partial(out_dir) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return out_dir
