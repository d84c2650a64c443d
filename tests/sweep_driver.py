"""Run a sweep whose trials pause at marked points, for the SIGKILL tests (run as a script).

    python tests/sweep_driver.py RESULTS TEXT N_TRIALS MARKS PAUSE

Marks: merge-<n> and eval-<n> from the trial's child (tests/faults.py: PhaseMarks), and
between-<k> from the sweep itself once a trial's records and leaderboard are written.
"""

import functools
import sys
import time
from pathlib import Path

# the repository before tests/: tests/sweep/ (the tests of sweep/) would otherwise shadow the package
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import sweep.trials.callbacks as callbacks  # noqa: E402
import sweep.trials.runner as runner  # noqa: E402
from faults import PhaseMarks  # noqa: E402
from sweep.config import compose, load_config  # noqa: E402

from conftest import fast_overrides  # noqa: E402


def main() -> None:
    results, text, n_trials, marks, pause = sys.argv[1:6]
    marks, pause = Path(marks), float(pause)
    marks.mkdir(parents=True, exist_ok=True)
    write_leaderboard = callbacks.write_leaderboard
    written = []

    def marked_leaderboard(study, directory):
        frame = write_leaderboard(study, directory)
        written.append(1)
        (marks / f"between-{len(written)}").touch()
        time.sleep(pause)
        return frame

    callbacks.write_leaderboard = marked_leaderboard  # the after-trial callback's; the runner's own first write stays
    callbacks.LEADERBOARD_SECONDS = 0.0  # written after every trial, so each trial leaves its mark
    config = load_config(compose(fast_overrides("killed", Path(text), int(n_trials), Path(results))))
    try:
        runner.Sweep(config, work_type=functools.partial(PhaseMarks, marks=marks, pause=pause)).run()
    except runner.StopSweep as stop:  # as the CLI reports it
        print(f"selfmerge: error: {stop.message}", file=sys.stderr)
        sys.exit(stop.status)


if __name__ == "__main__":
    main()
