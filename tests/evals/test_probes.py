"""Probes: scoring from next-token probabilities on a scripted model whose numbers are worked by
hand (coverage gate included), the item files, reply parsing, and the gate on the bundled model."""

import contextlib
import json
import math

import numpy as np
import pytest

from evals.probe_eval import ProbeConfig, ProbeEval, summarize
from evals.probes import (LOGPROB_FLOOR, PROBES, ProbeItem, load_probe, load_probe_file, prepare, score_item,
                          score_reply)  # fmt: skip
from evals.schema import Field
from merge_core.errors import SelfMergeError
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan

VOCAB = 301
EPS = 1e-12


class Scripted:
    """One token per character. After a space: "4" 0.6, "2" 0.2, "x" 0.2 (not an answer); after "4":
    "2" 0.7, newline 0.3; after "2": newline 0.9, "0" 0.1. ``flat``: every token equally likely."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def tokenize(self, text):
        return [ord(c) for c in text]

    def chat_prompt_tokens(self, messages):
        return [1, 2, 3]

    def next_token_logprobs(self, tokens):
        probs = np.full(VOCAB, EPS)
        table = {
            ord(" "): {"4": 0.6, "2": 0.2, "x": 0.2},
            ord("4"): {"2": 0.7, "\n": 0.3},
            ord("2"): {"\n": 0.9, "0": 0.1},
        }
        if self.flat:
            probs[:] = 1.0
        else:
            for text, p in table.get(tokens[-1], {"\n": 1.0}).items():
                probs[ord(text)] = p
        return np.log(probs / probs.sum())


def entropy(*probs):
    return -sum(p * math.log(p) for p in probs)


def test_integer_item_is_teacher_forced_and_must_stop_after_its_digits():
    item = ProbeItem("t", "1", "q", 42, "integer", "A: ")
    score = score_item(Scripted(), prepare(Scripted(), item))
    assert score.logprob == pytest.approx(math.log(0.6 * 0.7), abs=1e-6)
    assert score.accuracy == 1.0 and score.score == 100.0  # greedy says 4, 2, then a newline
    assert score.coverage == pytest.approx(0.8, abs=1e-6)  # "4" and "2" start a number, "x" does not
    assert score.entropy == pytest.approx(entropy(0.6, 0.2, 0.2), abs=1e-6)
    wrong = score_item(Scripted(), prepare(Scripted(), ProbeItem("t", "2", "q", 4, "integer", "A: ")))
    assert wrong.accuracy == 0.0  # the model goes on to "42": it would not answer 4
    assert wrong.logprob == pytest.approx(math.log(0.6), abs=1e-6)


def test_rating_item_scores_its_expected_value_over_valid_answers():
    item = ProbeItem("t", "r", "q", 4, "rating", "R: ", scale=(0, 5))
    score = score_item(Scripted(), prepare(Scripted(), item))
    # P(4) = 0.6, P(2) = 0.2: coverage 0.8, E = (4 * 0.6 + 2 * 0.2) / 0.8 = 3.5, score 100 (1 - 0.5 / 5)
    assert score.coverage == pytest.approx(0.8, abs=1e-6)
    assert score.score == pytest.approx(90.0, abs=1e-4)
    assert score.accuracy == 1.0 and score.logprob == pytest.approx(math.log(0.6), abs=1e-6)


def test_choice_item():
    score = score_item(
        Scripted(), prepare(Scripted(), ProbeItem("t", "c", "q", "2", "choice", "C: ", choices=("2", "4")))
    )
    assert score.accuracy == 0.0 and score.score == 0.0
    assert score.logprob == pytest.approx(math.log(0.2), abs=1e-6) and score.coverage == pytest.approx(
        0.8, abs=1e-6
    )


MODELS = {"good": Scripted(), "flat": Scripted(flat=True)}


def scripted_probe(items, **config) -> ProbeEval:
    """A ProbeEval over the scripted models, opened by name."""
    return ProbeEval(
        ProbeConfig(**config), "good", lambda name, **kw: contextlib.nullcontext(MODELS[name]), items=items
    )


ITEMS = [
    ProbeItem("t", "1", "q", 42, "integer", "A: "),
    ProbeItem("t", "r", "q", 4, "rating", "R: ", scale=(0, 5)),
    ProbeItem("t", "c", "q", "4", "choice", "C: ", choices=("2", "4")),
]


def test_coverage_gate_floors_a_plan_that_lost_the_format():
    probe = scripted_probe(ITEMS)
    base = probe.record("good", None)
    flat = probe.record("flat", base)
    # flat: coverage 11/301 (integer: 10 digits and "-"), 6/301 (rating), 2/301 (choice), all under half the base's 0.8
    assert flat[Field.PROBE_GATED] == 1.0
    assert [row["gated"] for row in flat[Field.PROBE_ITEMS]] == [True] * 3
    assert (
        flat[Field.PROBE_LOGPROB] == LOGPROB_FLOOR
        and flat[Field.PROBE_ACCURACY] == 0
        and flat[Field.PROBE_SCORE] == 0
    )
    assert flat[Field.PROBE] < base[Field.PROBE]
    # without the gate the flat model's expected rating sits mid-scale and scores well: the reason for the gate
    ungated = summarize(probe.scores("flat"), "score")
    assert ungated[Field.PROBE_BY_NAME]["t"]["score"] > 0
    assert base[Field.PROBE_GATED] == 0.0  # the base passes its own gate
    absolute = scripted_probe(ITEMS, coverage_gate="absolute", min_coverage=0.9).record("good", None)
    assert absolute[Field.PROBE_GATED] == 1.0  # 0.8 < 0.9, the base too


def test_record_means_per_probe_then_over_probes():
    scores = scripted_probe(ITEMS).scores("good")
    two = [scores[0], scores[1].__class__(**{**scores[1].__dict__, "probe": "u"})]
    record = summarize(two, "accuracy")
    assert (
        record[Field.PROBE_BY_NAME]["t"]["accuracy"] == 1.0
        and record[Field.PROBE_BY_NAME]["u"]["accuracy"] == 1.0
    )
    logprob = (math.log(0.42) + math.log(0.6)) / 2
    assert summarize(two, "logprob")[Field.PROBE] == pytest.approx(logprob, abs=1e-4)


def test_replies_are_parsed_for_generation_mode():
    number = ProbeItem("t", "1", "q", 42, "integer", "Answer: ")
    assert score_reply(number, "Answer: 42.").accuracy == 1.0
    assert score_reply(number, "I think 41, no 42").accuracy == 0.0  # the first number counts
    none = score_reply(number, "no idea")
    assert none.coverage == 0.0 and none.accuracy == 0.0
    rating = ProbeItem("t", "r", "q", 4, "rating", scale=(0, 10))
    assert score_reply(rating, "6").score == pytest.approx(80.0)
    assert score_reply(rating, "12").coverage == 0.0  # off the scale
    choice = ProbeItem("t", "c", "q", "Paris", "choice", choices=("Paris", "Rome"))
    assert score_reply(choice, "It is rome, not Paris").accuracy == 0.0


def test_shipped_probes_and_their_held_out_set_share_no_item():
    math_items, held_out, eq = load_probe("math"), load_probe("math_heldout"), load_probe("eq")
    assert len(math_items) >= 48 and len(held_out) >= 48 and len(eq) == 128
    assert not {i.key for i in math_items} & {i.key for i in held_out}
    assert all(item.kind == "integer" and str(item.answer).lstrip("-").isdigit() for item in math_items)
    assert set(PROBES) == {"math", "math_heldout", "eq"}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "q", "answer": 3, "kind": "guess"}'], "kind='guess' is unknown"),
        (
            ['{"prompt": "q", "answer": "c", "kind": "choice", "choices": ["a", "b"]}'],
            "not one of its choices",
        ),
        (['{"prompt": "q", "answer": 3}', "{oops"], "line 2 is not JSON"),
        (['{"prompt": "q"}'], "lacks ['answer']"),
        (['{"prompt": "q", "answer": 11, "kind": "rating"}'], "not a number on its scale 0-10"),
        (['{"prompt": "q", "answer": 2, "colour": "red"}'], "unknown item keys ['colour']"),
    ],
)
def test_bad_probe_files_are_refused_naming_the_problem(tmp_path, lines, message):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(
        SelfMergeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        load_probe_file(path)


def test_user_probe_files_in_yaml_and_json_lines(tmp_path):
    (tmp_path / "caps.yaml").write_text(
        "items:\n  - {prompt: 'Capital of France?', answer: Paris, kind: choice, choices: [Paris, Rome]}\n"
    )
    (tmp_path / "sums.jsonl").write_text(json.dumps({"id": "a", "prompt": "2+2?", "answer": 4}) + "\n")
    assert [i.probe for i in load_probe(str(tmp_path / "caps.yaml"))] == ["caps"]
    assert load_probe(str(tmp_path / "sums.jsonl"))[0].answer == 4
    with pytest.raises(SelfMergeError, match="probe file not found"):
        load_probe(str(tmp_path / "nope.jsonl"))


def test_config_refuses_bad_values_naming_the_key():
    with pytest.raises(SelfMergeError, match="eval.probe.metric='entropy'"):
        ProbeConfig(metric="entropy")
    with pytest.raises(SelfMergeError, match="eval.probe.metric='logprob' is unknown in generate mode"):
        ProbeConfig(mode="generate")
    with pytest.raises(SelfMergeError, match="eval.probe.min_coverage=2"):
        ProbeConfig(min_coverage=2)


def test_a_gibberish_plan_never_outscores_the_base_on_the_bundled_model(base_gguf, tmp_path):
    """0-26 drops the last four layers: its text is gibberish, and the probes must say so."""
    gibberish = tmp_path / "g.gguf"
    merge_gguf(base_gguf, LayerPlan.parse("0-26"), gibberish)
    for probes in (("math",), ("eq",)):
        probe = ProbeEval(
            ProbeConfig(probes=probes, n_items=4 if probes == ("math",) else 1, threads=2), base_gguf
        )
        base = probe.record(base_gguf, None)
        plan = probe.record(gibberish, base)
        assert base[Field.PROBE_GATED] == 0.0
        for metric in (Field.PROBE_LOGPROB, Field.PROBE_SCORE, Field.PROBE_ACCURACY):
            assert plan[metric] <= base[metric], (probes, metric)
        assert plan[Field.PROBE] < base[Field.PROBE]  # its answers, even in the format, are less likely right


def test_probes_and_kld_on_the_torch_backend(tmp_path):
    """The same probes through an in-memory merge: the identity plan scores exactly the base, a plan
    with repeated layers does not; generation mode parses replies; the logits behind the KL divergence
    are the ones perplexity scores."""
    import torch

    from evals.perplexity import log_softmax_nll, references_of
    from sweep.trials.backends import TorchBackend
    from sweep.config import BackendConfig
    from tiny_models import build_tiny

    backend = TorchBackend(
        build_tiny("llama", tmp_path / "tiny", n_layers=6, dtype=torch.float32), BackendConfig(kind="torch")
    )
    probe = ProbeEval(ProbeConfig(probes=("math", "eq"), n_items=2), backend.base, backend.open_model)
    base = probe.record(backend.base, None)
    same = probe.record(backend.build(LayerPlan.identity(6)), base)
    other = probe.record(backend.build(LayerPlan.parse("0-4,2-6")), base)
    assert same[Field.PROBE_ITEMS] == base[Field.PROBE_ITEMS]
    assert (
        other[Field.PROBE_LOGPROB] != base[Field.PROBE_LOGPROB] and len(other[Field.PROBE_ITEMS]) == 2 + 2 * 4
    )
    generated = ProbeEval(ProbeConfig(probes=("math",), n_items=2, mode="generate", metric="accuracy", max_tokens=4),
                          backend.base, backend.open_model).record(backend.base, None)  # fmt: skip
    assert {row["coverage"] for row in generated[Field.PROBE_ITEMS]} <= {0.0, 1.0}
    window = list(range(5, 69))
    with backend.open_model(backend.base, n_ctx=64) as model:
        logits = model.scored_logits(window, 32)
        np.testing.assert_allclose(
            log_softmax_nll(logits, np.asarray(window[33:])), model.window_nll(window, 32), rtol=1e-5
        )
        assert references_of(model, [window])[0].ids.shape == (31, 64)
