"""EQ-Bench answering: the logits mode's arithmetic on a scripted model, then both modes, the
sweep objective and the CLI on the bundled SmolLM2."""

import json
import math

import numpy as np
import pytest

from evals.eqbench import item_score
from evals.eqbench_eval import EQBenchEval, answer_by_logits, score_distribution
from evals.eqbench_items import EQItem
from evals.llama_cpp_model import LlamaCppModel
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from sweep.config import compose, load_config
from sweep.trials.runner import Sweep

from conftest import fast_overrides, run_cli

EPS = 1e-12


class ScriptedModel:
    """One token per character (as SmolLM2 spells numbers: " 10" is " ", "1", "0"), or with
    ``ten_token`` a single token for "10". After "<emotion>: " the next-token probabilities are
    {"1": 0.5, "7": 0.35, "3": 0.15} (or {"10": 0.2, "1": 0.3, ...}); after "1", "0" follows with 0.4."""

    TEN = 300

    def __init__(self, ten_token: bool = False):
        self.ten_token = ten_token
        self.calls = []

    def tokenize(self, text):
        tokens = [ord(c) for c in text]
        if self.ten_token and text.endswith(" 10"):
            tokens = tokens[:-2] + [self.TEN]
        return tokens

    def chat_prompt_tokens(self, messages):
        return [1, 2, 3]

    def next_token_logprobs(self, tokens):
        self.calls.append(list(tokens))
        probs = np.full(301, EPS)
        if tokens[-1] == ord(" "):
            table = {"1": 0.3, "7": 0.35, "3": 0.15, "10": 0.2} if self.ten_token else {"1": 0.5, "7": 0.35, "3": 0.15}
            for text, p in table.items():
                probs[self.TEN if text == "10" else ord(text)] = p
        elif tokens[-1] == ord("1"):
            probs[ord("0")], probs[ord("\n")] = 0.4, 0.6
        return np.log(probs / probs.sum())


@pytest.mark.parametrize("ten_token", [False, True])
def test_score_distribution_follows_each_number_spelling(ten_token):
    model = ScriptedModel(ten_token)
    p = score_distribution(model, [1, 2, 3], "First pass scores:\nSad:")
    # P(1) = 0.5 * 0.6 and P(10) = 0.5 * 0.4 when "10" is "1" then "0"; read directly otherwise
    assert p[1] == pytest.approx(0.3, abs=1e-6) and p[10] == pytest.approx(0.2, abs=1e-6)
    assert p[7] == pytest.approx(0.35, abs=1e-6) and p[3] == pytest.approx(0.15, abs=1e-6)
    assert float(np.dot(range(11), p)) == pytest.approx(5.2, abs=1e-5)
    assert model.calls[0][:3] == [1, 2, 3] and model.calls[0][-2:] == [ord(":"), ord(" ")]


def test_logits_answers_fill_the_template_with_the_likeliest_score():
    item = EQItem("x", "prompt", {"Sad": 5.0, "Calm": 7.0, "Glad": 0.0, "Proud": 10.0})
    expected = answer_by_logits(ScriptedModel(), [item], "expected")
    record = expected.records[0]
    assert record.raw_answer == "First pass scores:\nSad: 7\nCalm: 7\nGlad: 7\nProud: 7\n"
    assert record.first_pass == pytest.approx({"Sad": 5.2, "Calm": 5.2, "Glad": 5.2, "Proud": 5.2}, abs=1e-5)
    # d = 0.2, 1.8, 5.2, 4.8: 6.5/(1+e^(-1.2(d-4))) for d <= 5, d itself beyond
    total = sum(6.5 / (1 + math.exp(-1.2 * (d - 4))) if d <= 5 else d for d in (0.2, 1.8, 5.2, 4.8))
    assert record.first_pass_score == pytest.approx(10 - 0.7477 * total, abs=1e-4)
    assert expected.parse_rate == 1.0 and expected.used == "first_pass" and expected.score == pytest.approx(10 * record.first_pass_score)
    argmax = answer_by_logits(ScriptedModel(), [item], "argmax").records[0]
    assert argmax.first_pass == {"Sad": 7.0, "Calm": 7.0, "Glad": 7.0, "Proud": 7.0}
    assert argmax.first_pass_score == pytest.approx(item_score(item.reference, argmax.first_pass))


# -- on the bundled model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_items():
    return EQBenchEval("offline", n_items=2, seed=3, max_tokens=48).items


def test_chat_prompt_is_the_models_own_template(base_gguf, two_items):
    with LlamaCppModel(base_gguf, n_ctx=2048) as model:
        tokens = model.chat_prompt_tokens([{"role": "user", "content": two_items[0].prompt}])
        text = model.llm.detokenize(tokens, special=True).decode()
    assert text.startswith("<|im_start|>system\n") and text.endswith(two_items[0].prompt + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_both_modes_on_the_bundled_model_and_gibberish_scores_zero(base_gguf, tmp_path):
    logits = EQBenchEval("offline", n_items=2, seed=3, mode="logits")(base_gguf)
    assert logits.parse_rate == 1.0 and len(logits.records) == 2
    assert all(0 <= v <= 10 for r in logits.records for v in r.first_pass.values())
    generate = EQBenchEval("offline", n_items=2, seed=3, max_tokens=48)
    first, again = generate(base_gguf), generate(base_gguf)
    assert [r.raw_answer for r in first.records] == [r.raw_answer for r in again.records]  # greedy: reproducible
    assert all(r.raw_answer.strip() for r in first.records) and 0 <= first.parse_rate <= 1
    broken = tmp_path / "broken.gguf"
    merge_gguf(base_gguf, LayerPlan.parse("0-26"), broken)  # the last four layers dropped: gibberish (ppl ~12,800)
    gibberish = generate(broken)
    assert gibberish.score == 0 and gibberish.parse_rate == 0 and len(gibberish.records) == 2


@pytest.mark.slow
def test_torch_backend_answers_eqbench_like_llama_cpp(tmp_path):
    """One HF checkpoint on both backends (F16 GGUF for llama.cpp, fp32 in memory for torch): the
    same chat prompt, the same logits-mode ratings, and a greedy reply through the chat template.
    (Not on the shipped GGUF: transformers' tokenizer converted from it drops SmolLM2's digit
    splitting, so digits tokenize differently from llama.cpp; a real checkpoint has no such gap.)"""
    from merge_core.gguf_convert import convert_hf_to_gguf
    from sweep.trials.backends import TorchBackend
    from sweep.config import BackendConfig
    from tiny_models import build_tiny

    folder = build_tiny("llama", tmp_path / "tiny", n_layers=4)
    gguf = convert_hf_to_gguf(folder, tmp_path / "tiny.f16.gguf")
    backend = TorchBackend(folder, BackendConfig(kind="torch", device="cpu"))
    model = backend.build(LayerPlan.parse("0-3,1-4"))
    merged = merge_gguf(gguf, LayerPlan.parse("0-3,1-4"), tmp_path / "merged.gguf")
    llama_eval = EQBenchEval("offline", n_items=2, seed=3, mode="logits", n_ctx=4096)
    torch_eval = EQBenchEval("offline", n_items=2, seed=3, mode="logits", n_ctx=4096, open_model=backend.open_model)
    messages = [{"role": "user", "content": llama_eval.items[0].prompt}]
    with LlamaCppModel(merged, n_ctx=4096) as llama, backend.open_model(model, n_ctx=4096) as in_memory:
        assert in_memory.chat_prompt_tokens(messages) == llama.chat_prompt_tokens(messages)
    by_llama, by_torch = llama_eval(merged), torch_eval(model)
    ratings = [(r.first_pass[e], t.first_pass[e]) for r, t in zip(by_llama.records, by_torch.records) for e in r.first_pass]
    assert by_torch.parse_rate == 1.0 and max(abs(a - b) for a, b in ratings) < 0.05  # on a 0-10 scale
    reply = EQBenchEval("offline", n_items=1, seed=3, max_tokens=16, n_ctx=4096, open_model=backend.open_model)(model)
    assert len(reply.records) == 1 and reply.records[0].raw_answer  # random weights: a reply, not a parsable one


@pytest.mark.slow
def test_sweep_with_ppl_and_eqbench_objectives_saves_per_item_records(wikitext_file, tmp_path):
    eq = ["eval=[ppl,eqbench]", "eval.eqbench.mode=logits", "eval.eqbench.n_items=2"]
    config = load_config(compose(fast_overrides("eq", wikitext_file, 2, tmp_path) + eq))
    study = Sweep(config).run()
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.user_attrs["base"]["eqbench_parse_rate"] == 1.0
    board = (tmp_path / "eq" / "leaderboard.csv").read_text().splitlines()
    assert "eqbench" in board[0].split(",") and len(board) == 4  # header, base, two trials
    for trial in study.trials:
        record = json.loads((tmp_path / "eq" / "trials" / f"{trial.number}.json").read_text())
        assert trial.values == [record["ppl"], record["eqbench"]]
        assert [r["id"] for r in record["eqbench_items"]] == [i.id for i in EQBenchEval("offline", n_items=2).items]
        assert all(r["raw_answer"].startswith("First pass scores:") for r in record["eqbench_items"])
    other = load_config(compose(fast_overrides("eq", wikitext_file, 3, tmp_path) + eq[:-1] + ["eval.eqbench.n_items=3"]))
    with pytest.raises(Exception, match="eval.eqbench.n_items was 2, now 3"):
        Sweep(other).run()


def test_eqbench_config_errors_name_the_value(tmp_path):
    bad = run_cli("sweep", "eval=eqbench", "eval.eqbench.mode=fast", cwd=tmp_path)
    assert bad.returncode == 2 and "eval.eqbench.mode='fast' is unknown" in bad.stderr
    bad = run_cli("sweep", "sweep.objectives=[eqbench]", cwd=tmp_path)
    assert bad.returncode == 2 and "eqbench needs eval eqbench" in bad.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_cli_runs_a_model_and_its_answers_rescore_the_same(tmp_path):
    out = tmp_path / "answers.jsonl"
    ran = run_cli("eqbench", "run", "bundled", "--n-items", "2", "--max-tokens", "32", "--out", str(out), cwd=tmp_path, check=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["text"] for line in lines)
    rescored = run_cli("eqbench", "score", "offline", str(out), cwd=tmp_path, check=True)
    score = lambda text: text.split("EQ-Bench v2 score ")[1].split(" ")[0]  # noqa: E731
    assert score(ran.stdout) == score(rescored.stdout)
