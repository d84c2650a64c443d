"""The guard around Optuna's private names: the speed-ups (SweepStorage, the windowed TPE) only on the
Optuna releases they are tested on and with every internal they use present; otherwise Optuna's own
storage and sampler, said once on one line, with the same plans and scores."""

from __future__ import annotations

import logging

import optuna
import pandas as pd
import pytest
from optuna.storages import RDBStorage

from sweep.search.samplers import make_sampler
from sweep.search.windowed import WindowedSampler
from sweep.study import optuna_private
from sweep.study.storage import SweepStorage, make_storage

from conftest import fast_overrides, run_cli


@pytest.fixture
def guard(monkeypatch):
    """The guard asked afresh (its answer is kept per process), and asked again after the test."""
    optuna_private._why_not.cache_clear()
    optuna_private._fall_back.cache_clear()
    monkeypatch.delenv(optuna_private.PLAIN_ENV, raising=False)
    yield monkeypatch
    optuna_private._why_not.cache_clear()
    optuna_private._fall_back.cache_clear()


def _kinds(tmp_path) -> tuple[type, type]:
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", 60)
    sampler = make_sampler("tpe", None, seed=0, n_startup_trials=2, window=1000, minimize=True)
    return type(storage), type(sampler)


def test_the_speedups_run_on_the_installed_optuna(guard, tmp_path, caplog):
    assert optuna.__version__ in optuna_private.TESTED  # CI installs a tested release
    with caplog.at_level(logging.WARNING, logger="selfmerge"):
        assert optuna_private.speedups() is None and _kinds(tmp_path) == (SweepStorage, WindowedSampler)
    assert caplog.messages == []
    optuna_private.check_needed()


@pytest.mark.parametrize(
    "change, reason",
    [
        ("env", "SELFMERGE_PLAIN_OPTUNA is set"),
        ("newer", "Optuna 5.9.0 is outside the range they are tested on (>=4.9,<5.2)"),
        ("older", "Optuna 4.8.0 is outside the range"),
        ("gone", "changed an internal they use (Study._get_trials is gone)"),
        ("signature", "changed an internal they use (CachedStorage.create_new_trial takes ('study_id',), "),
    ],
)
def test_outside_the_tested_optuna_the_sweep_falls_back_and_says_so_once(guard, tmp_path, caplog, change, reason):
    if change == "env":
        guard.setenv(optuna_private.PLAIN_ENV, "1")
    elif change in ("newer", "older"):
        guard.setattr(optuna, "__version__", "5.9.0" if change == "newer" else "4.8.0")
    elif change == "gone":
        guard.delattr(optuna.Study, "_get_trials")
    else:
        guard.setattr(optuna_private.CachedStorage, "create_new_trial", lambda self, study_id: 0)
    with caplog.at_level(logging.WARNING, logger="selfmerge"):
        storage, sampler = _kinds(tmp_path)
        _kinds(tmp_path)
    assert storage is RDBStorage and sampler is optuna.samplers.TPESampler
    [line] = caplog.messages  # once per process, on one line
    assert line.startswith("Optuna's own storage and TPE") and reason in line, line
    assert "the same plans and scores up to 2 x sampler.window trials" in line and "\n" not in line


def test_a_storage_instance_without_the_attributes_it_reads_falls_back(guard, tmp_path, caplog):
    guard.setattr(optuna_private, "_STORAGE_ATTRIBUTES", ("_backend", "_no_such_cache"))
    with caplog.at_level(logging.WARNING, logger="selfmerge"):
        assert isinstance(make_storage(f"sqlite:///{tmp_path / 'study.db'}", 60), RDBStorage)
    assert "the cached storage lacks ['_no_such_cache']" in caplog.messages[0]


@pytest.mark.slow
def test_the_fallback_gives_the_same_leaderboard(tmp_path, wikitext_file):
    """A TPE sweep with the speed-ups and one with Optuna's own storage and sampler (seed 0): the same
    plans in the same order with the same scores."""
    boards = {}
    for mode, env in (("fast", "0"), ("plain", "1")):
        overrides = [o for o in fast_overrides(mode, wikitext_file, 6, tmp_path) if not o.startswith("sampler=")]
        run = run_cli("sweep", *overrides, "sampler.n_startup_trials=3", cwd=tmp_path,
                      env={optuna_private.PLAIN_ENV: env})  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert ("WARNING] - Optuna's own storage" in run.stdout + run.stderr) == (mode == "plain")
        board = pd.read_csv(tmp_path / mode / "leaderboard.csv")
        timings = [c for c in board.columns if c.endswith(("seconds", "_mb", "per_second")) or c == "model_file"]
        boards[mode] = board.drop(columns=timings)  # what the machine measured, not what was scored
    pd.testing.assert_frame_equal(boards["fast"], boards["plain"])


def test_an_optuna_without_the_attributes_every_sweep_needs_is_refused_on_one_line(guard, tmp_path):
    from merge_core.errors import SelfMergeError

    optuna_private.check_needed.cache_clear()
    guard.setattr(optuna_private, "_NEEDED", (("Study", "_storage"), ("Trial", "_no_such_id")))
    try:
        with pytest.raises(SelfMergeError, match=r"Optuna .* has no Trial._no_such_id, which selfmerge needs; "
                                                 r"install optuna>=4.9,<5.2"):  # fmt: skip
            make_storage(f"sqlite:///{tmp_path / 'study.db'}", 60)
    finally:
        optuna_private.check_needed.cache_clear()
