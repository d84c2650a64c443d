"""Sweeps from a Hugging Face folder on both backends, reproduce in every format, and the whole HF
path on the real (dequantized) SmolLM2 against the shipped GGUF."""

import json
import re

import pytest

from conftest import fast_overrides, run_cli
from evals.ppl_eval import PerplexityEval
from merge_core.gguf_convert import convert_hf_to_gguf
from merge_core.gguf_merge import merge_gguf
from merge_core.gguf_quantize import quantize_gguf
from merge_core.gguf_to_hf import export_hf_folder
from merge_core.hf_checkpoint import HFCheckpoint
from merge_core.layer_plan import LayerPlan
from merge_core.mergekit_recipe import read_mergekit_yaml
from sweep.trials.backends import TorchBackend
from sweep.config import BackendConfig
from tiny_models import build_tiny


SMALL_SPACE = ["space.first_size=[2,5]", "space.middle_size=[2,4]", "space.jump=[1,2]", "space.constraints.last_min=2", "space.constraints.jump_min=1"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "model", n_layers=8)


@pytest.mark.parametrize("backend", ["backend=torch", "backend.quant_mode=requantize"])
def test_sweep_from_hf_folder_then_reproduce_in_every_format(backend, tiny_llama, tmp_path, wikitext_file):
    overrides = fast_overrides("hf", wikitext_file, 4, tmp_path / "results") + ["model=hf", f"model.path={tiny_llama}", backend, *SMALL_SPACE]
    run_cli("sweep", *overrides, cwd=tmp_path, check=True)
    board = (tmp_path / "results" / "hf" / "leaderboard.csv").read_text().splitlines()
    assert len(board) >= 3  # header, base, trials
    models = list((tmp_path / "results" / "hf" / "models").glob("*.gguf"))
    assert (models == []) == (backend == "backend=torch")  # the torch backend writes no file
    out = tmp_path / "out"
    again = run_cli("reproduce", str(tmp_path / "results" / "hf"), "--best", "--out", str(out), "--format", "gguf,safetensors,mergekit", cwd=tmp_path, check=True)
    stored, reproduced = map(float, re.search(r"ppl\s+stored (\S+)\s+reproduced (\S+)", again.stdout).groups())
    assert reproduced == pytest.approx(stored, rel=1e-6)
    plan = LayerPlan.parse(re.search(r"plan (\S+)", again.stdout).group(1))
    folder = next(p for p in out.iterdir() if p.is_dir())
    assert HFCheckpoint.open(folder).n_layers == plan.n_layers
    assert len(list(out.glob("*.gguf"))) == 1 and len(list(out.glob("*.mergekit.yml"))) == 1
    assert read_mergekit_yaml(next(out.glob("*.mergekit.yml"))) == (plan, str(tiny_llama))  # model=hf names the folder


def test_torch_sweep_errors_name_the_bad_value(tiny_llama, tmp_path, wikitext_file):
    bad = run_cli("sweep", *fast_overrides("x", wikitext_file, 1, tmp_path), f"model.path={tiny_llama}", "backend=torch", "backend.dtype=float8", cwd=tmp_path)
    assert bad.returncode == 2 and "backend.dtype='float8' is unknown" in bad.stderr
    bad = run_cli("sweep", *fast_overrides("x", wikitext_file, 1, tmp_path), f"model.path={tiny_llama}", "backend.quant=Q9", cwd=tmp_path)
    assert bad.returncode == 2 and "quantization type 'Q9' is unknown to llama.cpp" in bad.stderr
    assert not (tmp_path / "x" / "study.db").exists()


def test_hf_path_on_smollm2_matches_the_shipped_gguf(base_gguf, tmp_path, wikitext_file):
    """Dequantized SmolLM2 -> F16 GGUF -> Q8_0 -> merge: perplexity within 2% of merging the shipped
    Q4_1 GGUF, and the torch backend on the same plan within 2% too."""
    plan = LayerPlan.parse("0-16,8-30")
    folder = export_hf_folder(base_gguf, tmp_path / "smollm2-hf")
    f16 = convert_hf_to_gguf(folder, tmp_path / "base.f16.gguf")
    merged_hf = merge_gguf(quantize_gguf(f16, tmp_path / "base.Q8_0.gguf", "Q8_0"), plan, tmp_path / "hf-path.gguf")
    merged_shipped = merge_gguf(base_gguf, plan, tmp_path / "gguf-path.gguf")
    gguf_ppl = PerplexityEval(base_gguf, str(wikitext_file), n_ctx=256, windows=4)(merged_shipped).ppl
    hf_ppl = PerplexityEval(f16, str(wikitext_file), n_ctx=256, windows=4)(merged_hf).ppl
    assert hf_ppl == pytest.approx(gguf_ppl, rel=0.02)
    backend = TorchBackend(folder, BackendConfig(kind="torch", device="cpu"))
    torch_eval = PerplexityEval(backend.base, str(wikitext_file), n_ctx=256, windows=4, open_model=backend.open_model)
    torch_ppl = torch_eval(backend.build(plan)).ppl
    assert torch_ppl == pytest.approx(gguf_ppl, rel=0.02)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30
