"""selfmerge report: the HTML and its plots, from a real two-objective sweep with pruned trials."""

import struct

import pytest
from optuna.trial import TrialState

from sweep.config import compose, load_config
from sweep.results.report import write_report
from sweep.trials.runner import Sweep

from conftest import fast_overrides, run_cli


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_report_draws_every_plot_of_a_sweep(tmp_path, wikitext_file):
    overrides = ["sampler=nsga2", "sweep.objectives=[ppl,n_layers]", "prune.max_ppl_ratio=1.15"]
    study = Sweep(load_config(compose(fast_overrides("rep", wikitext_file, 8, tmp_path) + overrides))).run()
    states = {t.state for t in study.trials}
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states  # the plots show both

    done = run_cli("report", str(tmp_path / "rep"), cwd=tmp_path, check=True)
    assert "report.html" in done.stdout
    page = (tmp_path / "rep" / "report.html").read_text()
    for name in ("progress", "depth", "pareto", "importance", "layer_maps"):
        width, height = png_size(tmp_path / "rep" / f"{name}.png")
        assert width > 300 and height > 150 and f'src="{name}.png"' in page
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])
    assert best.user_attrs["plan"] in page and "PRUNED" in page
    assert write_report(study, tmp_path / "rep") == tmp_path / "rep" / "report.html"  # again: overwrites cleanly


def test_report_of_a_folder_without_a_sweep_is_a_clear_error(tmp_path):
    bad = run_cli("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert bad.returncode == 2 and "holds no sweep" in bad.stderr


def test_repeat_map_draws_every_single_block_repeat(tmp_path):
    import numpy as np
    import pandas as pd

    from sweep.results.report import plot_repeat_map, repeat_map, repeated_block
    from merge_core.layer_plan import LayerPlan

    assert repeated_block(LayerPlan.parse("0-16,10-30"), 30) == (10, 16)
    assert repeated_block(LayerPlan.parse("0-10,6-16,12-30"), 30) is None and repeated_block(LayerPlan.parse("0-30"), 30) is None
    rows = [("0-16,10-30", 12.0), ("0-14,10-30", 11.0), ("0-20,12-30", 40.0), ("0-10,6-16,12-30", 13.0), ("0-16,10-30", 12.0)]
    frame = pd.DataFrame({"plan": [p for p, _ in rows], "ppl": [v for _, v in rows], "state": "COMPLETE",
                          "cache_hit_of": [np.nan, np.nan, np.nan, np.nan, 0]})  # fmt: skip
    table = repeat_map(frame, "ppl", "minimize", 30)
    assert list(zip(table["i"], table["j"], table["ppl"])) == [(10, 14, 11.0), (10, 16, 12.0), (12, 20, 40.0)]
    png = plot_repeat_map(frame, "ppl", "minimize", 30, 11.5, tmp_path)
    assert png == tmp_path / "repeat_map.png" and png.stat().st_size > 10_000
    page = (tmp_path / "repeat_map.html").read_text()
    assert page.count('title="plan ') == 3 and 'title="plan 0-14,10-30 (repeat 10..13): ppl 11, 0.957x the base; rank 1"' in page
    assert plot_repeat_map(frame.head(1), "ppl", "minimize", 30, 11.5, tmp_path / "none") is None  # one plan: no map


def test_differences_are_drawn_with_their_intervals_from_the_leaderboard_and_the_validation(tmp_path):
    """As a leaderboard holds them: the base's row without a difference (object columns, None)."""
    import json

    import pandas as pd

    from sweep.results.report import plot_differences

    frame = pd.DataFrame({"plan": ["0-30", "0-16,8-30", "0-20,14-30"], "bench_diff": [None, 0.05, -0.1],
                          "bench_diff_low": [None, -0.02, -0.2], "bench_diff_high": [None, 0.12, 0.0]}, dtype=object)
    assert plot_differences(tmp_path, frame.iloc[:1]) is None  # nothing compared: no plot
    (tmp_path / "validation").mkdir()
    models = [{"trial": "base", "plan": "0-30", "validated_bench_diff": None},
              {"trial": 1, "plan": "0-16,8-30", "validated_bench_diff": 0.04, "validated_bench_low": 0.01,
               "validated_bench_high": 0.07, "validated_bench_beats_base": True}]  # fmt: skip
    (tmp_path / "validation" / "summary.json").write_text(json.dumps({"models": models}))
    path = plot_differences(tmp_path, frame)
    assert path == tmp_path / "differences.png" and path.stat().st_size > 10_000
