"""Write one plan as the files a user ships: a GGUF (quantized or not), a safetensors folder, or
the mergekit YAML, from whichever base the sweep used (GGUF file or HF folder).
``selfmerge merge`` and ``selfmerge reproduce`` both call ``write_plan``: the same code the sweep uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from merge_core.architectures import of_model
from merge_core.errors import SelfMergeError
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import plan_to_mergekit_yaml
from merge_core.model_files import is_gguf
from merge_core.safetensors_merge import DEFAULT_SHARD_BYTES, merge_safetensors

FORMATS = ("gguf", "safetensors", "mergekit")


def default_format(source: Path, out: Path) -> str:
    """From the output's suffix (.gguf, .yml); a folder: the source's own kind."""
    if out.suffix == ".gguf":
        return "gguf"
    if out.suffix in (".yml", ".yaml"):
        return "mergekit"
    return "gguf" if is_gguf(source) else "safetensors"


def write_plan(source: Path, plan: LayerPlan, out: Path, fmt: str, model_name: str, quant: Optional[str] = None,
               shard_bytes: int = DEFAULT_SHARD_BYTES, convert_type: str = "f16", progress: bool = False) -> Path:  # fmt: skip
    """Write ``plan`` of ``source`` to ``out`` in ``fmt``; return what was written."""
    if fmt not in FORMATS:
        raise SelfMergeError(f"format {fmt!r} is unknown; choose one of {list(FORMATS)}")
    if fmt == "mergekit":
        arch = of_model(source) if not plan.scales.is_identity else None  # the family names the scaled tensors
        out.write_text(plan_to_mergekit_yaml(plan, model_name, arch=arch))
        return out
    if fmt == "safetensors":
        if quant:
            raise SelfMergeError("--quant applies to GGUF output; safetensors keeps the base's dtype")
        if is_gguf(source):
            from merge_core.gguf_to_hf import export_hf_folder

            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                return merge_safetensors(export_hf_folder(source, Path(tmp) / "base"), plan, out, shard_bytes, model_name, progress)
        return merge_safetensors(source, plan, out, shard_bytes, model_name, progress)
    if is_gguf(source):
        if quant:
            raise SelfMergeError(f"{source.name} is already a GGUF with its own types; --quant needs an HF model folder to start from")
        return merge_gguf(source, plan, out)
    from merge_core.gguf_convert import convert_hf_to_gguf
    from merge_core.gguf_quantize import check_quant_type, quantize_gguf

    quant = check_quant_type(quant) if quant else None
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        base = convert_hf_to_gguf(source, Path(tmp) / f"base.{convert_type}.gguf", convert_type, progress)
        merged = merge_gguf(base, plan, Path(tmp) / "merged.gguf")
        if quant:  # the merged stack quantized as a whole: exact for every type, layer-dependent mixes too
            return quantize_gguf(merged, out, quant)
        os.replace(merged, out)
        return out
