import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_core.model_files import bundled_model_path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
OFFICIAL_EQBENCH = REPO / "evals" / "data" / "eqbench_v2_official.json"  # what the package ships (MIT)


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def wikitext_file() -> Path:
    """The first 60 kB of the WikiText-2 test split, shipped with the tests (CC BY-SA, notice beside it)."""
    return DATA / "wikitext-2-test-excerpt.txt"


def run_cli(*args: str, cwd: Path, timeout: float = 600, check: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the installed ``selfmerge`` entry point as a user would (``env``: variables to add)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"selfmerge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Fast sweep settings for tests: 2 windows of 128 tokens on WikiText.
def fast_overrides(name: str, text: Path, n_trials: int, results: Path) -> list[str]:
    return [
        f"sweep.name={name}",
        f"sweep.n_trials={n_trials}",
        f"sweep.results_dir={results}",
        "sweep.progress=false",
        f"eval.ppl.text={text}",
        "eval.ppl.n_ctx=128",
        "eval.ppl.windows=2",
        "sampler=random",
    ]


def start_marked_sweep(results: Path, text: Path, n_trials: int, marks: Path, pause: float, until: str) -> subprocess.Popen:
    """tests/sweep_driver.py in its own process, once it has reached mark ``until`` (e.g. eval-1:
    trial 1 merged, its evaluation paused ``pause`` seconds), for the kill and signal tests."""
    driver = [sys.executable, str(REPO / "tests" / "sweep_driver.py"), str(results), str(text), str(n_trials), str(marks), str(pause)]
    proc = subprocess.Popen(driver, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (marks / until).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"the sweep never reached {until}"
        time.sleep(0.05)
    return proc
