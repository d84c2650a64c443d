"""Perplexity, llama.cpp's way, on real text and the bundled model."""

import math

import numpy as np
import pytest

from evals.corpus import STDLIB_DOCSTRINGS, load_text, stdlib_docstrings
from evals.perplexity import KLD_TOP_K, PerplexityResult, divergence, log_softmax_nll, make_windows, perplexity, reference_of
from evals.ppl_eval import PerplexityEval
from merge_core import LayerPlan, SelfMergeError
from evals.schema import Field
from merge_core.gguf_merge import merge_gguf


@pytest.fixture(scope="module")
def evaluate(base_gguf, wikitext_file):
    return PerplexityEval(base_gguf, str(wikitext_file), n_ctx=128, windows=3)


def test_log_softmax_nll_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1000)).astype(np.float32) * 8
    targets = rng.integers(0, 1000, size=5)
    expected = [-(row[t] - math.log(np.exp(row.astype(np.float64)).sum())) for row, t in zip(logits, targets)]
    np.testing.assert_allclose(log_softmax_nll(logits, targets), expected, rtol=1e-5)


def test_windows_are_non_overlapping_and_take_bos():
    windows = make_windows(list(range(100)), n_ctx=16, max_windows=0, bos=-1)
    assert len(windows) == 6 and windows[1] == [-1, *range(17, 32)]
    assert len(make_windows(list(range(100)), 16, max_windows=2)) == 2
    with pytest.raises(SelfMergeError, match="fewer than one window"):
        make_windows(list(range(10)), n_ctx=16)


class _Uniform:
    """A model that spreads probability evenly over a vocabulary of 50: ppl must be exactly 50."""

    def window_nll(self, window, first):
        return log_softmax_nll(np.zeros((len(window) - first - 1, 50), dtype=np.float32), np.asarray(window[first + 1 :]) % 50)


def test_only_the_second_half_of_each_window_is_scored():
    result = perplexity(_Uniform(), make_windows(list(range(64)), n_ctx=32))
    assert isinstance(result, PerplexityResult)
    assert result.ppl == pytest.approx(50.0)
    assert result.n_tokens_scored == 2 * 15 and result.n_tokens_evaluated == 64


def test_identity_plan_scores_exactly_the_base(evaluate, base_gguf, tmp_path):
    base = evaluate(base_gguf)
    same = evaluate(merge_gguf(base_gguf, LayerPlan.identity(30), tmp_path / "identity.gguf"))
    assert 3 < base.ppl < 100  # a working 135M model on English text
    assert same.ppl == base.ppl
    assert base.n_tokens_scored == 3 * 63 and base.tokens_per_second > 0


def test_self_merge_scores_worse_and_dropping_the_last_layers_far_worse(evaluate, base_gguf, tmp_path):
    base = evaluate(base_gguf).ppl
    merged = evaluate(merge_gguf(base_gguf, LayerPlan.parse("0-16,8-30"), tmp_path / "m.gguf")).ppl
    truncated = evaluate(merge_gguf(base_gguf, LayerPlan.parse("0-26"), tmp_path / "t.gguf")).ppl
    assert base < merged < 2 * base
    assert truncated > 20 * base


def _full_kl(base_logits, logits):
    p = np.exp(base_logits - np.log(np.exp(base_logits).sum(axis=1, keepdims=True)))
    logp, logq = (x - np.log(np.exp(x).sum(axis=1, keepdims=True)) for x in (base_logits, logits))
    return (p * (logp - logq)).sum(axis=1)


def test_kl_divergence_is_exact_when_the_top_tokens_hold_all_the_mass():
    rng = np.random.default_rng(1)
    base, plan = rng.normal(size=(6, KLD_TOP_K)) * 3, rng.normal(size=(6, KLD_TOP_K)) * 3  # vocab = the top kept
    kl, same = divergence(plan, reference_of(base))
    np.testing.assert_allclose(kl, _full_kl(base, plan), rtol=1e-9)
    assert list(same) == list(plan.argmax(axis=1) == base.argmax(axis=1))
    assert divergence(base, reference_of(base))[0] == pytest.approx(np.zeros(6), abs=1e-12)


def test_kl_divergence_over_a_large_vocabulary_never_exceeds_the_full_one():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(8, 5000)) * 2
    base[:, :10] += 12  # a trained model's peaked distribution: nearly all mass in a few tokens
    plan = base + rng.normal(size=base.shape)
    kl, _ = divergence(plan, reference_of(base))
    full = _full_kl(base, plan)
    assert np.all(kl <= full + 1e-12)
    np.testing.assert_allclose(kl, full, rtol=0.1)  # what it misses: the divergence inside the lumped tail


def test_kld_and_top1_agreement_measure_damage_on_the_bundled_model(base_gguf, wikitext_file, tmp_path):
    kld = PerplexityEval(base_gguf, str(wikitext_file), n_ctx=128, windows=3, kld=True)
    base = kld.record(base_gguf, None)
    assert base[Field.KLD] == 0 and base[Field.TOP1_AGREEMENT] == 1
    merged = merge_gguf(base_gguf, LayerPlan.parse("0-16,8-30"), tmp_path / "m.gguf")
    truncated = merge_gguf(base_gguf, LayerPlan.parse("0-26"), tmp_path / "t.gguf")
    light, heavy = kld.record(merged, base), kld.record(truncated, base)
    assert 0 < light[Field.KLD] < heavy[Field.KLD]
    assert 1 > light[Field.TOP1_AGREEMENT] > heavy[Field.TOP1_AGREEMENT]
    assert light[Field.PPL] == PerplexityEval(base_gguf, str(wikitext_file), n_ctx=128, windows=3).record(merged, base)[Field.PPL]
    staged = PerplexityEval(base_gguf, str(wikitext_file), n_ctx=128, windows=3, early_windows=1, kld=True).record(merged, base)
    assert staged[Field.KLD] == pytest.approx(light[Field.KLD], rel=1e-9)  # two stages, the same windows


def test_default_corpus_is_real_prose_and_stable():
    text = stdlib_docstrings(20_000)
    assert len(text) == 20_000 and text == load_text(STDLIB_DOCSTRINGS, 20_000)
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "to", "is"} for w in words) / len(words) > 0.05  # English


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(SelfMergeError, match="perplexity text not found"):
        load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SelfMergeError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(SelfMergeError, match="hf:DATASET"):
        load_text("hf:only-a-name")


def test_sliding_window_layers_on_longer_windows_score_as_transformers_own_forward(tmp_path):
    """A Gemma 3 whose window (16) is shorter than the scored windows (64): its sliding layers see only
    their window, as in transformers' forward (Gemma 3 270M at n_ctx 1024 or 2048 over its 512)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.torch_model import TorchModel
    from tiny_models import build_tiny

    folder = build_tiny("gemma3", tmp_path / "gemma3", dtype=torch.float32, config={"sliding_window": 16})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(ids).logits[0, 31:-1].numpy()
    scorer = TorchModel(model, AutoTokenizer.from_pretrained(folder), n_ctx=64)
    np.testing.assert_allclose(scorer.scored_logits(ids[0].tolist(), 31), expected, atol=1e-4)
    scorer._window = None  # every layer seeing the whole window: another model
    assert not np.allclose(scorer.scored_logits(ids[0].tolist(), 31), expected, atol=1e-2)
