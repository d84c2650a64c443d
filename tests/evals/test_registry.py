"""The evaluation registry and the record schema: every evaluation keeps the contract of evals/base.py."""

import dataclasses

import pytest

from evals.base import EvalContext
from evals.registry import EVALS, get
from evals.schema import Field
from merge_core.errors import SelfMergeError
from sweep.config import EvalConfig, _eval_config, compose, load_config


def test_every_entry_is_complete():
    names = {value for key, value in vars(Field).items() if key.isupper()}
    for name, spec in EVALS.items():
        assert spec.name == name == spec.columns[0]  # the eval, its objective and its first column share a name
        assert {*spec.columns, *spec.scores, spec.seconds} <= names  # every field it writes is in the schema
        assert dataclasses.is_dataclass(spec.config) and spec.config.__dataclass_params__.frozen
        assert spec.direction(spec.config()) in ("minimize", "maximize")


def test_unknown_evaluation_is_refused_by_name():
    with pytest.raises(SelfMergeError, match=r"unknown evaluation 'bleu'; choose from \['ppl', 'probe', 'eqbench', 'bench', 'lm_eval'\]"):
        get("bleu")
    with pytest.raises(SelfMergeError, match="unknown evaluation 'bleu'"):
        _eval_config({"ppl": {}, "bleu": {}})
    with pytest.raises(SelfMergeError, match="no evaluation configured"):
        EvalConfig({})


def test_sections_follow_the_registry_and_round_trip_through_the_fingerprint():
    config = load_config(compose(["eval=[eqbench,ppl]", "eval.ppl.windows=3", "eval.ppl.threads=2"])).eval
    assert config.kinds == ["ppl", "eqbench"]  # perplexity first, whatever the order asked for
    stored = config.fingerprint()
    assert "threads" not in stored["ppl"] and stored["ppl"]["windows"] == 3
    again = EvalConfig.from_fingerprint(stored, threads=1)
    assert again.get("ppl").windows == 3 and again.get("ppl").threads == 1 and again.fingerprint() == stored


def test_lm_eval_tasks_survive_the_json_round_trip():
    config = load_config(compose(["eval=lm_eval", "eval.lm_eval.tasks=[a,b]"])).eval
    assert EvalConfig.from_fingerprint(config.fingerprint()).get("lm_eval").tasks == ("a", "b")


def test_perplexity_record_on_the_bundled_model(base_gguf, wikitext_file):
    spec = EVALS[Field.PPL]
    evaluation = spec.build(spec.config(text=str(wikitext_file), n_ctx=128, windows=2), EvalContext(base_gguf, get_opener()))
    base = evaluation.record(base_gguf, None)
    assert set(base) == {Field.PPL, Field.PPL_VS_BASE, Field.TOKENS_PER_SECOND, Field.N_TOKENS_SCORED, Field.EVAL_SECONDS}
    assert base[Field.PPL_VS_BASE] == 1.0 and 5 < base[Field.PPL] < 100
    again = evaluation.record(base_gguf, base)
    assert again[Field.PPL] == base[Field.PPL] and again[Field.PPL_VS_BASE] == 1.0


def test_staged_perplexity_stops_when_told(base_gguf, wikitext_file):
    spec = EVALS[Field.PPL]
    config = spec.config(text=str(wikitext_file), n_ctx=128, windows=3)
    evaluation = spec.build(config, EvalContext(base_gguf, get_opener(), early_windows=1))
    seen = []
    stopped = evaluation.record(base_gguf, None, stop_early=lambda early: seen.append(early) or True)
    assert seen[0].field == Field.PPL_EARLY and seen[0].step == 0
    assert stopped == {Field.PPL_EARLY: seen[0].value, Field.PRUNED: True}
    full = evaluation.record(base_gguf, None, stop_early=lambda early: False)
    assert full[Field.PPL_EARLY] == seen[0].value and full[Field.N_TOKENS_SCORED] == 3 * 63


def get_opener():
    from evals.llama_cpp_model import LlamaCppModel

    return LlamaCppModel
