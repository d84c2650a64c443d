"""EQ-Bench question sources: the v2 prompt wording, the shipped offline set, CSV, subsets."""

import json
import re

import pandas as pd
import pytest

from evals.eqbench_items import load_csv_questions, load_items, load_offline_items, load_questions, subset, v2_prompt
from merge_core import SelfMergeError

from conftest import OFFICIAL_EQBENCH as OFFICIAL
DIALOGUE = re.compile(r"in this dialogue:\n\n(.*)\n\[End dialogue\]\n\nAt the end of this dialogue, (.*?) would feel", re.DOTALL)


@pytest.fixture(scope="module")
def official():
    return load_questions(OFFICIAL)


def test_v2_prompt_rebuilds_the_official_prompts_character_for_character(official):
    rebuilt = 0
    for item in official:
        found = DIALOGUE.search(item.prompt)
        if found:  # one official prompt words its dialogue marker differently
            assert v2_prompt(found.group(1), found.group(2), item.emotions) == item.prompt, item.id
            rebuilt += 1
    assert rebuilt >= 170


def test_offline_set_covers_a_range_of_emotions_and_intensities():
    items = load_offline_items()
    assert len(items) >= 30 and len({i.id for i in items}) == len(items)
    assert all(len(i.reference) == 4 and "Revised scores:" in i.prompt for i in items)
    references = [v for i in items for v in i.reference.values()]
    assert min(references) == 0 and max(references) >= 9 and len(set(references)) >= 9
    assert len({e.lower() for i in items for e in i.emotions}) >= 60
    assert load_items("offline") == items


def test_offline_set_copies_no_official_dialogue(official):
    items = load_offline_items()
    official_lines = set()
    for item in official:
        found = DIALOGUE.search(item.prompt)
        if found:
            official_lines.update(line.strip() for line in found.group(1).splitlines())
    ours = [line.strip() for i in items for line in DIALOGUE.search(i.prompt).group(1).splitlines()]
    assert not set(ours) & official_lines  # written for this project, not copied


def test_csv_layout_loads_the_same_items_as_the_json(official, tmp_path):
    raw = json.loads(OFFICIAL.read_text())
    rows = [{"id": k, "prompt": v["prompt"], "reference_answer_fullscale": str(v["reference_answer_fullscale"])} for k, v in raw.items()]
    pd.DataFrame(rows).to_csv(tmp_path / "q.csv", index=False)
    assert load_csv_questions(tmp_path / "q.csv") == official
    pd.DataFrame([{"question": "x"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SelfMergeError, match="needs columns 'prompt' and 'reference_answer_fullscale'"):
        load_items(str(tmp_path / "bad.csv"))


def _question(emotions: dict) -> dict:
    ref = {f"emotion{i}": name for i, name in enumerate(emotions, 1)} | {f"emotion{i}_score": v for i, v in enumerate(emotions.values(), 1)}
    return {"prompt": "p", "reference_answer_fullscale": ref}


@pytest.mark.parametrize(
    "emotions, message",
    [
        ({"Caught out": 3, "Calm": 1, "Sad": 0, "Glad": 2}, "emotion 'Caught out' is not one word"),
        ({"Calm": 12, "Sad": 0, "Glad": 2, "Bored": 1}, "emotion Calm has reference 12.0, outside 0-10"),
    ],
)
def test_questions_the_parser_could_never_score_are_refused(tmp_path, emotions, message):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"7": _question(emotions)}))
    with pytest.raises(SelfMergeError, match=f"question 7 {re.escape(message)}"):
        load_questions(path)


def test_subset_is_fixed_by_its_seed_and_keeps_order():
    items = load_offline_items()
    a, b, c = subset(items, 5, 1), subset(items, 5, 1), subset(items, 5, 2)
    assert a == b and a != c and len(a) == 5
    assert [items.index(i) for i in a] == sorted(items.index(i) for i in a)
    assert subset(items, 0, 0) == items and subset(items, 1000, 0) == items
