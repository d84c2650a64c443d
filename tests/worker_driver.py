"""One worker of a many-worker sweep with a cheap objective (tests/faults.py: CheapWork), run as a
script so a test can start several at once and SIGKILL one.

    python tests/worker_driver.py STORAGE_URL RESULTS NAME N_TRIALS EVALUATIONS SEED DELAY [hang]
"""

import functools
import sys
from pathlib import Path

# the repository before tests/: tests/sweep/ (the tests of sweep/) would otherwise shadow the package
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from conftest import fast_overrides  # noqa: E402
from faults import CheapWork  # noqa: E402
from sweep.config import compose, load_config  # noqa: E402
from sweep.trials.runner import Sweep  # noqa: E402
from evals.corpus import stdlib_docstrings  # noqa: E402


def main() -> None:
    url, results, name, n_trials, evaluations, seed, delay = sys.argv[1:8]
    text = Path(evaluations).parent / "text.txt"  # one path for every worker: it is part of the scoring
    if not text.exists():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(stdlib_docstrings(20_000))
    overrides = fast_overrides(name, text, int(n_trials), Path(results)) + [
        f"storage.url={url}", "storage.heartbeat_seconds=2", "trial.isolate=false", "prune.max_ppl_ratio=null", f"sweep.seed={seed}",
        "space.first_size=[8,12]", "space.middle_size=[8,10]", "space.n_middle=[0,1]",  # a small space: workers meet on the same plans
    ]  # fmt: skip
    work = functools.partial(CheapWork, evaluations=Path(evaluations), delay=float(delay), hang="hang" in sys.argv[8:])
    Sweep(load_config(compose(overrides)), work_type=work).run()


if __name__ == "__main__":
    main()
