"""lm-eval tasks as objectives (a custom task over a local JSON file: no download) on both backends,
and the layer-importance analysis with its prior."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import fast_overrides, run_cli
from evals.layer_importance import LayerImportance, measure
from evals.lm_eval_bridge import LmEvalEval
from merge_core.errors import SelfMergeError
from merge_core.gguf_merge import merge_gguf
from merge_core.layer_plan import LayerPlan
from merge_core.torch_merge import load_causal_lm
from sweep.trials.backends import TorchBackend
from sweep.config import BackendConfig
from tiny_models import build_tiny

CAPITALS = [
    ("France", ["Paris", "Berlin", "Madrid", "Rome"], 0), ("Germany", ["Lisbon", "Berlin", "Oslo", "Rome"], 1),
    ("Italy", ["Paris", "Vienna", "Rome", "Athens"], 2), ("Spain", ["Warsaw", "Dublin", "Prague", "Madrid"], 3),
    ("Japan", ["Tokyo", "Cairo", "Lima", "Oslo"], 0), ("the United Kingdom", ["Bern", "London", "Sofia", "Riga"], 1),
]  # fmt: skip


@pytest.fixture(scope="module")
def capitals_task(tmp_path_factory):
    """An lm-eval multiple-choice task defined by a YAML over a JSON file, both written here."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"The capital of {country} is", "choices": [f" {c}" for c in choices], "answer": answer} for country, choices, answer in CAPITALS]
    (folder / "capitals.json").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / "capitals.yaml").write_text(f"""task: capitals_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'capitals.json'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return folder


def test_lm_eval_task_scores_the_same_on_both_backends(capitals_task, base_gguf, tmp_path):
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(capitals_task))  # indexing lm-eval's registry takes seconds: once
    llama = LmEvalEval(["capitals_local"], task_manager=tasks)
    assert llama(base_gguf).score == 1.0  # SmolLM2 knows these capitals; a broken bridge scores ~0.25
    backend = TorchBackend(base_gguf, BackendConfig(kind="torch", device="cpu"))
    in_memory = LmEvalEval(["capitals_local"], open_model=backend.open_model, task_manager=tasks)
    assert in_memory(backend.build(LayerPlan.identity(30))).score == 1.0
    broken = merge_gguf(base_gguf, LayerPlan.parse("0-20"), tmp_path / "broken.gguf")  # the last ten layers gone: gibberish
    assert llama(broken).score < 1.0
    with pytest.raises(SelfMergeError, match=r"unknown task\(s\) \['no_such_task'\]"):
        LmEvalEval(["no_such_task"], task_manager=tasks)
    with pytest.raises(SelfMergeError, match="has no metric 'f1'"):
        LmEvalEval(["capitals_local"], metric="f1", task_manager=tasks)(base_gguf)


def test_sweep_with_an_lm_eval_objective(capitals_task, tmp_path, wikitext_file):
    overrides = fast_overrides("lm", wikitext_file, 2, tmp_path) + ["eval=[ppl,lm_eval]", "eval.lm_eval.tasks=[capitals_local]",
                                                                     f"eval.lm_eval.include_path={capitals_task}", "prune.max_ppl_ratio=null"]  # fmt: skip
    run_cli("sweep", *overrides, cwd=tmp_path, check=True)
    board = pd.read_csv(tmp_path / "lm" / "leaderboard.csv")
    assert board["lm_eval"].between(0, 1).all() and board.loc[board["trial"] == "base", "lm_eval"].item() == 1.0
    records = [json.loads(p.read_text()) for p in (tmp_path / "lm" / "trials").glob("*.json")]
    assert all(r["lm_eval_tasks"].keys() == {"capitals_local"} for r in records if r["state"] == "COMPLETE")


def test_layer_importance_matches_the_definitions(tmp_path):
    folder = build_tiny("llama", tmp_path / "tiny", n_layers=6)
    model, tokenizer = load_causal_lm(folder, "float32", "cpu")
    windows = [list(range(3, 67)), list(range(100, 164))]
    importance = measure(model, windows, max_block=3)
    with torch.no_grad():  # transformers' own hidden states: entering each layer (the last one is normed: left out)
        states = [model(torch.tensor([w]), output_hidden_states=True).hidden_states for w in windows]
    for layer in range(5):
        expected = np.mean([(1 - torch.cosine_similarity(h[layer][0].double(), h[layer + 1][0].double(), dim=-1)).mean().item() for h in states])
        assert importance.block_influence[layer] == pytest.approx(expected, rel=1e-6)
        angle = np.mean([np.arccos(torch.cosine_similarity(h[layer][0, -1].double(), h[layer + 1][0, -1].double(), dim=0).clamp(-1, 1).item()) / np.pi for h in states])
        assert importance.angular_distance[0, layer] == pytest.approx(angle, rel=1e-6)
    assert np.isnan(importance.angular_distance[2, 4:]).all() and not np.isnan(importance.angular_distance[2, :4]).any()
    plan = LayerPlan.parse("0-4,2-6")  # layers 2 and 3 twice
    assert importance.plan_cost(plan) == pytest.approx(importance.block_influence[2] + importance.block_influence[3])
    assert importance.plan_cost(LayerPlan.identity(6)) == 0
    csv, png = importance.write(tmp_path / "out")
    assert png.stat().st_size > 0 and np.allclose(LayerImportance.read(csv).block_influence, importance.block_influence)


def test_analyze_command_and_importance_prior_in_a_sweep(tmp_path, wikitext_file):
    folder = build_tiny("llama", tmp_path / "tiny", n_layers=8)
    space = ["space.first_size=[2,5]", "space.middle_size=[2,4]", "space.jump=[1,2]", "space.constraints.last_min=2", "space.constraints.jump_min=1"]
    common = ["model=hf", f"model.path={folder}", f"eval.ppl.text={wikitext_file}", "eval.ppl.n_ctx=64", *space]
    out = run_cli("analyze", *common, "--windows", "2", "--out", str(tmp_path / "analysis"), cwd=tmp_path, check=True)
    frame = pd.read_csv(tmp_path / "analysis" / "layer_importance.csv")
    assert list(frame["layer"]) == list(range(8)) and (tmp_path / "analysis" / "layer_importance.png").is_file()
    assert "change the hidden state least" in out.stdout
    overrides = fast_overrides("prior", wikitext_file, 5, tmp_path) + common[:2] + space + ["backend=torch", "space.prior=importance", "sampler=tpe", "sampler.n_startup_trials=3"]
    run_cli("sweep", *overrides, cwd=tmp_path, check=True)
    from sweep.config import compose, load_config
    from sweep.search.prior import prior_plans
    from sweep.search.spaces import build_space
    from merge_core.model_shape import ModelShape

    importance = LayerImportance.read(tmp_path / "prior" / "layer_importance.csv")
    config = load_config(compose(overrides))
    expected = [str(plan) for plan, _ in prior_plans(build_space(config.space_kind, ModelShape(8), config.space), importance, 3)]
    board = pd.read_csv(tmp_path / "prior" / "leaderboard.csv")
    first = board[board["trial"] != "base"].assign(trial=lambda f: f["trial"].astype(int)).sort_values("trial").head(3)
    assert list(first["plan"]) == expected  # the first trials are the prior's cheapest plans
    assert run_cli("sweep", *fast_overrides("bad", wikitext_file, 1, tmp_path), "space.prior=wishful", cwd=tmp_path).stderr.count("space.prior='wishful' is unknown") == 1
