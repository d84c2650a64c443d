"""EQ-Bench v2 questions: the item type, the v2 prompt, and the places items come from.

Sources (``eval.eqbench.questions``):
  offline                 the set written for selfmerge, shipped in the package (evals/data/)
  official                the 171 official v2 questions, shipped (EQ-Bench by Samuel Paech, MIT licence
                          in evals/data/eqbench_v2_LICENSE.txt): held out from the offline set
  PATH.json               the official v2 file: {id: {prompt, reference_answer_fullscale, ...}}
  PATH.csv                the same fields as a CSV (the Hugging Face dataset's layout)
  hf:OWNER/NAME           a Hugging Face dataset in that layout, e.g. hf:pbevan11/EQ-Bench (online)
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from merge_core.errors import SelfMergeError

OFFLINE = "offline"
OFFICIAL = "official"
_EMOTION_NAME = re.compile(r"\w+")  # the v2 parser reads `(\w+):\s+(\d+)`: other names never parse


@dataclass(frozen=True)
class EQItem:
    id: str
    prompt: str
    reference: dict[str, float]  # emotion -> reference intensity 0-10, in the order the prompt lists them

    @property
    def emotions(self) -> list[str]:
        return list(self.reference)


def v2_prompt(dialogue: str, character: str, emotions: list[str]) -> str:
    """The v2 question wording around a dialogue (character-for-character as the official file)."""
    dialogue = dialogue.rstrip("\n")  # only newlines: some official dialogues end in a space
    listed = "\n".join(emotions)
    first = "\n".join(f"{e}: <score>" for e in emotions)
    revised = "\n".join(f"{e}: <revised score>" for e in emotions)
    return (
        "\nYour task is to predict the likely emotional responses of a character in this dialogue:\n\n"
        f"{dialogue}\n[End dialogue]\n\n"
        f"At the end of this dialogue, {character} would feel...\n{listed}\n\n"
        "Give each of these possible emotions a score from 0-10 for the relative intensity that they are likely to be feeling each. "
        "Then critique your answer by thinking it through step by step. Finally, give your revised scores.\n\n"
        "You must output in the following format, including headings (of course, you should give your own scores), "
        "with no additional commentary:\n\n"
        f"First pass scores:\n{first}\n\nCritique: <your critique here>\n\nRevised scores:\n{revised}\n\n[End of answer]\n\n"
        "Remember: zero is a valid score, meaning they are likely not feeling that emotion. You must score at least one emotion > 0.\n"
    )


def _checked(item_id: str, prompt: str, reference: dict, where: str) -> EQItem:
    if len(reference) != 4:
        raise SelfMergeError(f"{where}: question {item_id} has {len(reference)} emotions, not 4")
    for name, score in reference.items():
        if not _EMOTION_NAME.fullmatch(name):
            raise SelfMergeError(f"{where}: question {item_id} emotion {name!r} is not one word; EQ-Bench's parser could never read it")
        if not 0 <= score <= 10:
            raise SelfMergeError(f"{where}: question {item_id} emotion {name} has reference {score}, outside 0-10")
    return EQItem(item_id, prompt, reference)


def _fullscale(item_id, ref, where: str) -> dict[str, float]:
    """The four ``emotionN`` / ``emotionN_score`` pairs (a dict, or its text as in the CSV layout)."""
    try:
        if isinstance(ref, str):
            ref = ast.literal_eval(ref)
        return {str(ref[f"emotion{i}"]): float(ref[f"emotion{i}_score"]) for i in range(1, 5)}
    except (KeyError, TypeError, ValueError, SyntaxError):
        raise SelfMergeError(f"{where}: question {item_id} lacks a v2 reference_answer_fullscale with four emotions") from None


def load_questions(path: str | Path) -> list[EQItem]:
    """The official v2 question file: {id: {prompt, reference_answer, reference_answer_fullscale}}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfMergeError(f"EQ-Bench questions not found: {path}") from None
    except json.JSONDecodeError as err:
        raise SelfMergeError(f"{path} is not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise SelfMergeError(f"{path}: expected an object of questions keyed by id")
    items = []
    for item_id, question in raw.items():
        if not isinstance(question, dict) or "prompt" not in question:
            raise SelfMergeError(f"{path}: question {item_id} has no prompt")
        items.append(_checked(str(item_id), question["prompt"], _fullscale(item_id, question.get("reference_answer_fullscale"), str(path)), str(path)))
    return items


def load_csv_questions(path: str | Path) -> list[EQItem]:
    """Rows with ``prompt`` and ``reference_answer_fullscale`` (and ``id`` if present, else the row number)."""
    import pandas as pd

    frame = pd.read_csv(path)
    if not {"prompt", "reference_answer_fullscale"} <= set(frame.columns):
        raise SelfMergeError(f"{path}: needs columns 'prompt' and 'reference_answer_fullscale', has {list(frame.columns)}")
    items = []
    for number, row in enumerate(frame.to_dict("records"), 1):
        item_id = str(row.get("id", number))
        items.append(_checked(item_id, row["prompt"], _fullscale(item_id, row["reference_answer_fullscale"], str(path)), str(path)))
    return items


def load_hf_questions(repo_id: str) -> list[EQItem]:
    """A Hugging Face dataset holding the questions as a CSV (downloaded once into the HF cache)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        files = [f for f in HfApi().list_repo_files(repo_id, repo_type="dataset") if f.endswith(".csv")]
    except Exception as err:
        raise SelfMergeError(f"cannot list Hugging Face dataset {repo_id}: {err}") from None
    if not files:
        raise SelfMergeError(f"Hugging Face dataset {repo_id} has no CSV file of questions")
    return load_csv_questions(hf_hub_download(repo_id, files[0], repo_type="dataset"))


def load_offline_items() -> list[EQItem]:
    """The set written for selfmerge (evals/data/eqbench_offline.yaml), as v2 prompts."""
    where = "evals/data/eqbench_offline.yaml"
    raw = yaml.safe_load(resources.files("evals").joinpath("data/eqbench_offline.yaml").read_text(encoding="utf-8"))
    return [
        _checked(
            entry["id"], v2_prompt(entry["dialogue"], entry["character"], list(entry["emotions"])),
            {str(k): float(v) for k, v in entry["emotions"].items()}, where,
        )  # fmt: skip
        for entry in raw["items"]
    ]


def load_items(source: str) -> list[EQItem]:
    if source == OFFLINE:
        return load_offline_items()
    if source == OFFICIAL:
        with resources.as_file(resources.files("evals").joinpath("data/eqbench_v2_official.json")) as path:
            return load_questions(path)
    if source.startswith("hf:"):
        return load_hf_questions(source[3:])
    if source.endswith(".csv"):
        return load_csv_questions(source)
    return load_questions(source)


def subset(items: list[EQItem], n_items: int, seed: int) -> list[EQItem]:
    """A fixed random subset of n items (0 = all), in the source's order, so a seed always asks the same ones."""
    if n_items == 0 or n_items >= len(items):
        return list(items)
    chosen = set(random.Random(seed).sample(range(len(items)), n_items))
    return [item for i, item in enumerate(items) if i in chosen]
