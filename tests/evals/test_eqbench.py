"""EQ-Bench v2 parsing and scoring, against answers written here with hand-computed scores.

Reference (question 1 of the official v2 file): Remorseful 0, Indifferent 6, Affectionate 0, Annoyed 7.
The v2 penalty per emotion, f(d) = 6.5 / (1 + e^(-1.2 (d - 4))) for 0 < d <= 5, d beyond:
f(2) = 6.5 / (1 + e^2.4) = 0.54063, f(4) = 3.25.
"""

import json

import pytest

from evals.eqbench import parse_answer, read_answers_jsonl, score_answers
from evals.eqbench_items import EQItem, load_questions
from merge_core import SelfMergeError

from conftest import OFFICIAL_EQBENCH, run_cli

REFERENCE = {"Remorseful": 0.0, "Indifferent": 6.0, "Affectionate": 0.0, "Annoyed": 7.0}
ITEMS = [EQItem("1", "prompt", REFERENCE), EQItem("2", "prompt", REFERENCE)]


def answer(first: str, revised: str) -> str:
    return f"First pass scores:\n{first}\n\nCritique: a hasty reader would say 9, but he is calmer.\n\nRevised scores:\n{revised}\n"


EXACT = "Remorseful: 0\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 7"
CLOSE = "Remorseful: 2\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 3"  # d = 2 and 4: 10 - 0.7477 * 3.79063
OUT_OF_RANGE = "Remorseful: 0\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 15"  # d = 8 adds 8: 10 - 0.7477 * 8
THREE = "Remorseful: 0\nIndifferent: 6\nAnnoyed: 7"
RENAMED = "Remorseful: 0\nIndifferent: 6\nAffectionate: 0\nAngry: 7"


def test_parser_reads_both_sections_and_ignores_the_critique():
    first, revised = parse_answer(answer(CLOSE, EXACT))
    assert first == {"Remorseful": "2", "Indifferent": "6", "Affectionate": "0", "Annoyed": "3"}
    assert revised == {"Remorseful": "0", "Indifferent": "6", "Affectionate": "0", "Annoyed": "7"}
    assert parse_answer("no headings here") == ({}, {})


def test_a_name_and_number_in_the_critique_spoils_the_first_pass_as_in_the_original():
    # The original regex reads the first pass up to "Revised scores:", critique included.
    text = f"First pass scores:\n{EXACT}\n\nCritique: Robert: 9 is too high.\n\nRevised scores:\n{EXACT}\n"
    result = score_answers(ITEMS[:1], {"1": text})
    assert result.records[0].first_pass is None and result.records[0].revised is not None
    assert result.used == "revised" and result.score == pytest.approx(100.0)


@pytest.mark.parametrize(
    "first, expected",
    [(EXACT, 10.0), (CLOSE, 10 - 0.7477 * (0.54063 + 3.25)), (OUT_OF_RANGE, 10 - 0.7477 * 8)],
    ids=["exact", "close", "out-of-range"],
)
def test_item_scores_match_hand_computation(first, expected):
    result = score_answers(ITEMS[:1], {"1": answer(first, first)})
    assert result.records[0].first_pass_score == pytest.approx(expected, abs=1e-4)
    assert result.score == pytest.approx(10 * expected, abs=1e-3) and result.parse_rate == 1.0


@pytest.mark.parametrize("bad", [THREE, RENAMED, "Remorseful: zero\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 7"], ids=["three", "renamed", "word"])
def test_answers_without_the_four_emotions_are_unparseable(bad):
    result = score_answers(ITEMS[:1], {"1": answer(bad, bad)})
    assert result.records[0].first_pass is None and result.score == 0.0 and result.parse_rate == 0.0


def test_emotion_names_match_case_insensitively():
    result = score_answers(ITEMS[:1], {"1": answer(EXACT.lower(), EXACT.lower())})
    assert result.score == pytest.approx(100.0)


def test_gibberish_and_missing_answers_score_zero_without_error():
    result = score_answers(ITEMS, {"1": "the the the ::: 12 ##"})
    assert (result.score, result.parse_rate) == (0.0, 0.0)


def test_revised_counts_when_at_least_as_good_and_nearly_as_parseable():
    result = score_answers(ITEMS, {"1": answer(CLOSE, EXACT), "2": answer(CLOSE, EXACT)})
    assert result.used == "revised" and result.score == pytest.approx(100.0)
    assert result.first_pass_score == pytest.approx(10 * (10 - 0.7477 * 3.79063), abs=1e-3)


def test_first_pass_counts_when_revised_parses_less_often():
    # revised is better where it parses (100 vs ~71.7) but parses 1 of 2 (< 95% of the first pass's 2)
    result = score_answers(ITEMS, {"1": answer(CLOSE, EXACT), "2": answer(CLOSE, THREE)})
    assert result.used == "first_pass" and result.parse_rate == 1.0
    assert result.score == pytest.approx(10 * (10 - 0.7477 * 3.79063), abs=1e-3)


def test_first_pass_counts_when_revised_is_worse():
    result = score_answers(ITEMS[:1], {"1": answer(EXACT, CLOSE)})
    assert result.used == "first_pass" and result.score == pytest.approx(100.0)


@pytest.fixture(scope="module")
def official_questions():
    return OFFICIAL_EQBENCH


def test_official_file_loads_171_items_with_fullscale_references(official_questions):
    items = load_questions(official_questions)
    assert len(items) == 171
    assert items[0].id == "1" and items[0].reference == REFERENCE
    assert all(len(item.reference) == 4 and "Revised scores:" in item.prompt for item in items)


def test_cli_scores_answers_made_elsewhere(official_questions, tmp_path):
    items = load_questions(official_questions)
    lines = []
    for i, item in enumerate(items[:20]):
        scores = "\n".join(f"{emotion}: {int(value)}" for emotion, value in item.reference.items())
        lines.append(json.dumps({"id": item.id, "text": answer(scores, scores) if i % 2 == 0 else "I cannot say."}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(lines) + "\n")
    assert len(read_answers_jsonl(answers)) == 20
    done = run_cli("eqbench", "score", str(official_questions), str(answers), cwd=tmp_path, check=True)
    assert "EQ-Bench v2 score 100.00" in done.stdout and "parse rate 0.058 of 171 items" in done.stdout  # 10 of 171

    answers.write_text('{"id": "1", "text": "ok"}\nnot json\n')
    bad = run_cli("eqbench", "score", str(official_questions), str(answers), cwd=tmp_path)
    assert bad.returncode == 2 and "line 2 is not a JSON object" in bad.stderr
    answers.write_text('{"id": "9999", "text": "ok"}\n')
    bad = run_cli("eqbench", "score", str(official_questions), str(answers), cwd=tmp_path)
    assert bad.returncode == 2 and "'9999'" in bad.stderr


def test_bad_question_files_are_clear_errors(tmp_path):
    with pytest.raises(SelfMergeError, match="not found"):
        load_questions(tmp_path / "none.json")
    (tmp_path / "q.json").write_text('{"1": {"prompt": "p", "reference_answer": {}}}')
    with pytest.raises(SelfMergeError, match="question 1 lacks a v2 reference_answer_fullscale"):
        load_questions(tmp_path / "q.json")
