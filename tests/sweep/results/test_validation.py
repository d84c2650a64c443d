"""Validation: the best plans and the base scored again on held-out items, end to end on the bundled
model; resuming a killed validation; held-out items checked; the verdict in words."""

import json
import math

import pandas as pd
import pytest

from merge_core.errors import SelfMergeError
from sweep.config import compose, load_config
from sweep.results.validation import (
    CHUNK,
    check_held_out,
    configured,
    default_evals,
    sections,
    spearman,
    validate_model,
)

from conftest import fast_overrides, run_cli

PROBE_SWEEP = [
    "eval=[ppl,probe]",
    "sweep.objectives=[probe]",
    "eval.probe.probes=[math]",
    "eval.probe.n_items=4",
]
HELD_OUT = "sweep.validate.evals={probe: {probes: [math_heldout], n_items: 6}}"


def test_a_sweep_validates_its_best_plans_on_held_out_items(tmp_path, wikitext_file):
    """A probe sweep ends with its 2 best plans and the base re-scored on 6 held-out problems; the
    leaderboard and the report show the validated scores; `selfmerge validate` then redoes nothing."""
    results = tmp_path / "results"
    overrides = [
        *fast_overrides("v", wikitext_file, 3, results),
        *PROBE_SWEEP,
        "sweep.validate.top_k=2",
        HELD_OUT,
    ]
    run = run_cli("sweep", *overrides, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = results / "v"
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert [m["trial"] for m in summary["models"]].count("base") == 1 and len(summary["models"]) == 3
    assert summary["settings"]["probe"]["probes"] == ["math_heldout"] and "Spearman" in summary["verdict"]
    board = pd.read_csv(folder / "leaderboard.csv")
    validated = board.dropna(subset=["validated_probe"])
    assert len(validated) == 3 and set(validated["final_rank"]) <= {1, 2, 3}
    best_two = board[board["state"] == "COMPLETE"].sort_values("probe", ascending=False)["plan"].head(2)
    assert set(best_two) <= set(validated["plan"])
    [run_dir] = [p for p in (folder / "validation").iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "0-30" / "probe.items.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["item"].startswith("math_heldout/") for row in rows)
    assert not list(run_dir.glob("*/model.gguf"))  # files built for validation only are gone
    report = run_cli("report", str(folder), cwd=tmp_path, check=True)
    assert (folder / "validation.png").is_file() and "validation" in (folder / "report.html").read_text()
    again = run_cli("validate", str(folder), cwd=tmp_path, check=True)
    assert "Spearman" in again.stdout and report.returncode == 0
    assert len((run_dir / "0-30" / "probe.items.jsonl").read_text().splitlines()) == 6  # nothing scored twice


class CountingEval:
    """An item evaluation that records which items it scored, and can die after some chunks."""

    def __init__(self, n: int, die_after: int | None = None):
        self.ids, self.scored, self.die_after, self.calls = [f"i{k}" for k in range(n)], [], die_after, 0

    def item_ids(self):
        return self.ids

    def score_items(self, model, ids, progress=False):
        if self.die_after is not None and self.calls == self.die_after:
            raise KeyboardInterrupt  # the validation is killed mid-way
        self.calls += 1
        self.scored += ids
        return [{"value": int(i[1:])} for i in ids]

    def summarize_items(self, rows, base):
        return {"total": sum(row["value"] for row in rows), "n": len(rows)}


def test_a_killed_validation_loses_no_finished_item(tmp_path):
    folder = tmp_path / "plan"
    dying = CountingEval(20, die_after=2)
    with pytest.raises(KeyboardInterrupt):
        validate_model({"x": dying}, lambda: "model", folder, None)
    assert len(dying.scored) == 2 * CHUNK and not (folder / "record.json").exists()
    with open(folder / "x.items.jsonl", "a") as out:
        out.write('{"item": "i99", "val')  # a line torn by the kill
    rest = CountingEval(20)
    record = validate_model({"x": rest}, lambda: "model", folder, None)
    assert sorted(rest.scored) == sorted(f"i{k}" for k in range(2 * CHUNK, 20))  # only what was left
    assert record == {"total": sum(range(20)), "n": 20}
    assert len((folder / "x.items.jsonl").read_text().splitlines()) == 20
    built = []
    assert (
        validate_model({"x": CountingEval(20)}, lambda: built.append(1), folder, None) == record and not built
    )


def test_validation_items_must_be_held_out():
    sweep_evals = load_config(compose(["eval=[probe,eqbench]", "eval.eqbench.mode=logits"])).eval
    with pytest.raises(
        SelfMergeError, match="validation eval probe shares 64 of its 64 items with the sweep's eval.probe"
    ):
        check_held_out(sweep_evals, sections({"probe": {"probes": ["math"]}}))
    with pytest.raises(
        SelfMergeError, match="validation eval eqbench shares 32 of its 32 items with the sweep's eval.probe"
    ):
        check_held_out(sweep_evals, sections({"eqbench": {"questions": "offline"}}))
    check_held_out(
        sweep_evals, sections({"probe": {"probes": ["math_heldout"]}, "eqbench": {"questions": "official"}})
    )


def test_a_sweep_whose_validation_is_not_held_out_is_refused_before_it_starts(tmp_path, wikitext_file):
    results = tmp_path / "results"
    overrides = [
        *fast_overrides("bad", wikitext_file, 2, results),
        *PROBE_SWEEP,
        "sweep.validate.evals={probe: {probes: [math]}}",
    ]
    run = run_cli("sweep", *overrides, cwd=tmp_path)
    assert run.returncode == 2 and not (results / "bad").exists()
    assert "validation eval probe shares 4 of its 64 items with the sweep's eval.probe" in run.stderr


def test_default_validation_follows_the_objective():
    assert default_evals("probe", {"probe": {"probes": ["math", "eq"]}}) == (5, {
        "probe": {"probes": ["math_heldout"], "mode": "generate", "metric": "accuracy"},
        "eqbench": {"questions": "official", "mode": "generate"},
    })  # fmt: skip
    assert default_evals("eqbench", {"eqbench": {"mode": "logits", "questions": "offline"}})[1] == {
        "eqbench": {"questions": "official", "mode": "generate"}
    }
    assert default_evals("ppl", {"ppl": {}}) == (0, {})
    with pytest.raises(SelfMergeError, match="no held-out benchmark is known for probe 'mine.jsonl'"):
        default_evals("probe", {"probe": {"probes": ["mine.jsonl"]}})
    assert configured(
        load_config(compose(["eval=probe", "eval.probe.probes=[mine.jsonl]", "sweep.validate.top_k=0"]))
    ) == (0, {})
    with pytest.raises(SelfMergeError, match="sweep.validate.top_k=3: the objective ppl has no held-out"):
        configured(load_config(compose(["sweep.validate.top_k=3"])))
    with pytest.raises(SelfMergeError, match="sweep.validate.evals.probe: unknown keys \\['colour'\\]"):
        sections({"probe": {"colour": "red"}})


def test_spearman_ranks_and_refuses_constant_scores():
    assert spearman(pd.Series([1, 2, 3, 4]), pd.Series([10, 30, 20, 40])) == pytest.approx(0.8)
    assert math.isnan(spearman(pd.Series([1, 2, 3]), pd.Series([0, 0, 0])))
    assert math.isnan(spearman(pd.Series([1, 2]), pd.Series([1, 2])))


def test_validate_takes_the_held_out_set_of_a_user_probe_from_its_command_line():
    """A sweep over a probe file of the user's own has no default held-out set: `selfmerge validate`
    takes it from its own command line (before, the default raised before the line was read)."""
    import optuna

    from evals.schema import StudyKey
    from sweep.results.validation import settings_for

    study = optuna.create_study()
    study.set_user_attr(StudyKey.OBJECTIVES, ["probe"])
    study.set_user_attr(StudyKey.SCORING, {"eval": {"probe": {"probes": ["mine.jsonl"]}}})
    assert settings_for(study, overrides=("probe.probes=[held.jsonl]",)) == (5, {"probe": {"probes": ["held.jsonl"]}})
    with pytest.raises(SelfMergeError, match=r"'mine.jsonl'.*or on this command line, e.g. probe.probes="):
        settings_for(study)


def test_the_verdict_on_a_real_benchmark_is_holm_corrected_and_paired(tmp_path):
    """Three plans validated on held-out bench items: one clearly better than the base, one level, one
    a little better (not enough after the correction); only the first "beats the base"."""
    import optuna

    from evals.bench import PAIRED, versus_base
    from evals.schema import StudyKey
    from merge_core.layer_plan import LayerPlan
    from sweep.results.validation import write_summary

    base_rows = [{"id": f"piqa/{i}", "acc_norm": int(i < 100)} for i in range(200)]
    plans = {  # which of 200 items each plan gets right (the base: the first 100)
        "0-16,8-30": lambda i: i < 160,
        "0-20,14-30": lambda i: i >= 100,
        "0-12,6-30": lambda i: i < 90 or 100 <= i < 123,  # 23 gained, 10 lost
    }
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(StudyKey.OBJECTIVES, ["bench"])
    study.set_user_attr(StudyKey.BASE, {"bench": 0.5})
    models, records = [("base", LayerPlan.identity(30), None)], {"base": {"bench": 0.5}}
    for number, (plan, right) in enumerate(plans.items()):
        rows = [{"id": f"piqa/{i}", "acc_norm": int(right(i))} for i in range(200)]
        score = sum(row["acc_norm"] for row in rows) / 200
        study.add_trial(optuna.create_trial(value=score, user_attrs={"plan": plan, "bench": score}))
        records[number] = {"bench": score, **versus_base(rows, base_rows, "acc_norm")}
        models.append((number, LayerPlan.parse(plan), study.trials[-1]))
    assert 0.025 < records[2][PAIRED[3]] < 0.05  # uncorrected: significant ...
    frame = write_summary(study, tmp_path, models, records, sections({"bench": {"part": "held_out"}}))
    beats = dict(zip(frame["plan"], frame["validated_bench_beats_base"]))
    assert beats == {"0-30": None, "0-16,8-30": True, "0-20,14-30": False, "0-12,6-30": False}  # ... not after Holm
    verdict = json.loads((tmp_path / "summary.json").read_text())["verdict"]
    assert "bench on held-out items: 1 of 3 plans beat the base after Holm's correction over 3: 0-16,8-30 (+0.3" in verdict
    assert frame.loc[frame["plan"] == "0-16,8-30", "validated_bench_low"].item() > 0
