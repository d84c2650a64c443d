"""selfmerge report: the HTML and its plots, from a real two-objective sweep with pruned trials."""

import struct

import pytest
from optuna.trial import TrialState

from sweep.config import compose, load_config
from sweep.report import write_report
from sweep.runner import Sweep

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
