"""Gemma 3 on a real GGUF (Google's 270M base model, from the package registry): a self-merge keeps
each layer's attention kind, in llama.cpp as in transformers, and a sweep runs on it end to end."""

import pandas as pd
import pytest

from conftest import REPO, fast_overrides, run_cli
from evals.llama_cpp_model import LlamaCppModel, load_without_weight_repacking
from evals.perplexity import make_windows, perplexity
from evals.torch_model import TorchModel
from merge_core.architectures import sliding_layers
from merge_core.gguf_file import read_gguf_header
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.model_files import packaged_model_path
from merge_core.torch_merge import load_causal_lm, merged_model

PATTERN = "gemma3.attention.sliding_window_pattern"
# The base's global layers 5 and 11 land at outputs 5 and 15 (and 17 at 21); llama.cpp's index-derived
# default would make outputs 5, 11 and 17 global instead. WikiText ppl (4 x 512): 22.82 that way, 19.71 kept.
PLAN = LayerPlan.parse("0-10,6-18")


@pytest.fixture(scope="module")
def gemma_gguf():
    load_without_weight_repacking()
    return packaged_model_path("gemma3-270m")


def test_a_merge_writes_each_layer_kind_from_its_source_layer(gemma_gguf, tmp_path):
    base = read_gguf_header(gemma_gguf)
    assert base.architecture == "gemma3" and base.block_count == 18 and PATTERN not in base.metadata
    source = sliding_layers(18, 6)  # what llama.cpp derives for the base: layers 5, 11 and 17 global
    merged = read_gguf_header(merge_gguf(gemma_gguf, PLAN, tmp_path / "merged.gguf"))
    flags = [bool(flag) for flag in merged.metadata[PATTERN].value]
    assert flags == [source[i] for i in PLAN.layer_indices] and len(flags) == merged.block_count == 22
    assert flags != sliding_layers(22, 6)
    # a merge of the merge re-indexes the flags as it does any per-layer array
    again = read_gguf_header(merge_gguf(merged.path, LayerPlan.parse("0-4,12-22"), tmp_path / "again.gguf"))
    assert [bool(flag) for flag in again.metadata[PATTERN].value] == flags[0:4] + flags[12:22]
    assert {k: e.raw for k, e in again.metadata.items() if k not in (PATTERN, "gemma3.block_count")} == {
        k: e.raw for k, e in base.metadata.items() if k != "gemma3.block_count"
    }


@pytest.mark.slow
def test_llama_cpp_and_the_torch_backend_score_a_gemma3_merge_alike(gemma_gguf, wikitext_file, tmp_path):
    """transformers runs the in-memory merge with the merged config's layer_types; llama.cpp reads the
    merged file's flags. Had either put a layer in another kind (RoPE base 10k vs 1M), they would part."""
    base, tokenizer = load_causal_lm(gemma_gguf, "float32", "cpu")
    text = wikitext_file.read_text()  # with WikiText's literal "<unk>": tokenized as text by both
    scores = {}
    for plan in (LayerPlan.parse("0-18"), PLAN):
        torch_model = TorchModel(merged_model(base, plan), tokenizer, n_ctx=256, batch_windows=4)
        windows = make_windows(torch_model.tokenize(text), 256, 4, torch_model.bos_for_windows)
        with LlamaCppModel(merge_gguf(gemma_gguf, plan, tmp_path / f"{plan}.gguf"), n_ctx=256) as llama:
            assert make_windows(llama.tokenize(text), 256, 4, llama.bos_for_windows) == windows
            scores[str(plan)] = (perplexity(llama, windows).ppl, perplexity(torch_model, windows).ppl)
    for llama_ppl, torch_ppl in scores.values():
        assert abs(llama_ppl / torch_ppl - 1) < 0.02, scores
    with LlamaCppModel(gemma_gguf, n_ctx=256) as llama:  # the identity merge is the base, flags and all
        windows = make_windows(llama.tokenize(text), 256, 4, llama.bos_for_windows)
        assert perplexity(llama, windows).ppl == pytest.approx(scores["0-18"][0], rel=1e-9)
    assert scores[str(PLAN)][0] > scores["0-18"][0]


@pytest.mark.slow
def test_a_sweep_runs_on_gemma3_end_to_end(wikitext_file, tmp_path):
    overrides = fast_overrides("gemma", wikitext_file, 2, tmp_path) + ["model=gemma3_270m"]
    run_cli("sweep", *overrides, cwd=REPO, check=True)
    board = pd.read_csv(tmp_path / "gemma" / "leaderboard.csv")
    assert list(board["state"].iloc[:1]) == ["BASE"] and board["plan"].iloc[0] == "0-18" and len(board) == 3
    scored = board[board["state"] == "COMPLETE"]
    assert (
        len(scored) >= 1 and (scored["ppl"] > board["ppl"].iloc[0]).all() and (scored["n_layers"] > 18).all()
    )


def test_the_torch_backend_starts_each_text_with_a_bos_where_the_gguf_says_so(gemma_gguf):
    """transformers 5.17's tokenizer from this GGUF adds no BOS (5.25's does), and Gemma loses 0.09 of PIQA
    accuracy without one (README). The file's ``tokenizer.ggml.add_bos_token`` decides, as in
    llama.cpp, whatever the tokenizer did: here its BOS is switched off first, as 5.17 loads it."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from merge_core.model_files import bundled_model_path
    from merge_core.torch_merge import follow_gguf_bos

    for path, bos in ((gemma_gguf, 2), (bundled_model_path(), None)):  # SmolLM2's GGUF says no BOS
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.add_bos_token = False
        follow_gguf_bos(tokenizer, path)
        assert TorchModel.bos_for_windows.fget(SimpleNamespace(tokenizer=tokenizer)) == bos
        with LlamaCppModel(path, n_ctx=64) as llama:
            assert llama.bos_for_windows == bos
