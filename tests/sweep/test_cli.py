"""The selfmerge command as users run it: the happy paths and every error path (one line, exit 2)."""

import re

import pytest

from conftest import fast_overrides, run_cli


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfmerge: error:"), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_merge_then_eval_one_plan_by_hand(tmp_path, wikitext_file):
    out = tmp_path / "m.gguf"
    merged = run_cli("merge", "bundled", "--plan", "0-16,8-30", "--out", str(out), cwd=tmp_path, check=True)
    assert "38 layers" in merged.stdout and out.is_file()
    assert "layer_range: [8, 30]" in out.with_suffix(".mergekit.yml").read_text()
    scored = run_cli("eval", str(out), "--ppl-text", str(wikitext_file), "--n-ctx", "128", "--windows", "2", cwd=tmp_path, check=True)
    match = re.search(r"ppl (\d+\.\d+)\s+\(2 windows of 128 tokens, 126 scored", scored.stdout)
    assert match and 3 < float(match.group(1)) < 200
    again = run_cli("merge", "bundled", "--plan", "0-16,8-30", "--out", str(out), cwd=tmp_path)
    assert_one_line_error(again, "exists; pass --force")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["merge", "/no/such/model.gguf", "--plan", "0-16,8-30", "--out", "x.gguf"], "model not found: /no/such/model.gguf"),
        (["merge", "bundled", "--plan", "0-16,8-34", "--out", "x.gguf"], r"slice 2 \(8-34\) ends past layer 30"),
        (["merge", "bundled", "--plan", "0-16;8-30", "--out", "x.gguf"], "is not START-END"),
        (["merge", "bundled", "--plan", "0-16,8-30@qk=-0.5", "--out", "x.gguf"], r"scale qk=-0.5 is not a positive number"),
        (["merge", "bundled", "--plan", "0-16,8-30@qk=half", "--out", "x.gguf"], r"scale qk='half' is not a number"),
        (["merge", "bundled", "--plan", "0-16,8-30@v=0.5", "--out", "x.gguf"], r"scale 'v=0.5' names no factor"),
        (["merge", "bundled", "--plan", "0-30@out=0.5", "--out", "x.gguf"], r"plan 0-30 repeats no layer"),
        (["plans", "--count", "space.scale.qk=[0.5,-1]"], r"space.scale.qk holds -1, not a positive number"),
        (["plans", "--count", "space.scale.out=abc"], r"space.scale.out='abc' is neither a list"),
        (["plans", "--count", "space.scale.out={low:1,high:0.5,step:0.1}"], r"space.scale.out=.* is empty"),
        (["eval", "/no/such/model.gguf"], "model not found"),
        (["eval", "bundled", "--ppl-text", "/no/such/text.txt"], "perplexity text not found"),
        (["leaderboard", "results/none"], "holds no sweep"),
        (["reproduce", "results/none", "--best", "--out", "o"], "holds no sweep"),
        (["plans", "--count", "space.constraints.last_min=40"], "no valid plan for a 30-layer model"),
        (["plans", "--count", "space.jump=[9,3]"], r"space.jump=\[9, 3\] is empty"),
        (["plans", "--count", "space.nonsense=3"], "nonsense"),
        (["sweep", "model.path=/no/such/model.gguf"], "model not found: /no/such/model.gguf"),
        (["sweep", "space.constraints.max_repeats=0"], "max_repeats=0 is out of range"),
        (["sweep", "eval.ppl.n_ctx=abc"], r"eval.ppl.n_ctx: Value 'abc'"),
        (["sweep", "sampler=nope"], "sampler/nope"),
        (["sweep", "sweep.timeout=tomorrow"], "sweep.timeout='tomorrow' is not a duration"),
        (["sweep", "sweep.name=../escape"], "is not a plain name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, pattern):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), pattern)
    assert not (tmp_path / "x.gguf").exists()


def test_not_a_gguf_is_named(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    assert_one_line_error(run_cli("eval", str(fake), cwd=tmp_path), "is not a GGUF file")
    assert_one_line_error(run_cli("sweep", f"model.path={fake}", "model.hf_id=x", cwd=tmp_path), "is not a GGUF file")


def test_plans_counts_and_samples_valid_plans(tmp_path):
    counted = run_cli("plans", "--count", "--sample", "5", "space.constraints.keep_first=8", cwd=tmp_path, check=True)
    count = int(re.search(r"exactly (\d+) valid plans", counted.stdout).group(1))
    assert 50 < count < 711  # keep_first=8 removes the plans that break the first 8 layers
    plans = re.findall(r"^(\S+)  \((\d+) layers\)$", counted.stdout, flags=re.M)
    assert len(plans) == 5
    for text, n_layers in plans:
        slices = [tuple(map(int, s.split("-"))) for s in text.split(",")]
        assert slices[0][0] == 0 and slices[0][1] >= 8 and slices[-1][1] == 30
        assert sum(b - a for a, b in slices) == int(n_layers)


@pytest.mark.slow
def test_sweep_leaderboard_reproduce_and_nothing_overwritten_by_bad_input(tmp_path, wikitext_file):
    results = tmp_path / "results"
    overrides = fast_overrides("cli", wikitext_file, 2, results)
    done = run_cli("sweep", *overrides, cwd=tmp_path, check=True)
    assert "BASE" in done.stdout and "leaderboard:" in done.stdout
    board_path = results / "cli" / "leaderboard.csv"
    board, mtime = board_path.read_text(), board_path.stat().st_mtime_ns
    db = (results / "cli" / "study.db").read_bytes()

    assert_one_line_error(run_cli("sweep", *overrides, "space.constraints.last_min=0", cwd=tmp_path), "last_min=0 is out of range")
    assert_one_line_error(run_cli("sweep", *overrides[:-1], "eval.ppl.windows=3", cwd=tmp_path), "eval.ppl.windows was 2, now 3")
    assert board_path.read_text() == board and board_path.stat().st_mtime_ns == mtime
    assert (results / "cli" / "study.db").read_bytes() == db

    shown = run_cli("leaderboard", str(results / "cli"), cwd=tmp_path, check=True)
    assert "0-30" in shown.stdout and "BASE" in shown.stdout
    out = tmp_path / "best"
    again = run_cli("reproduce", str(results / "cli"), "--best", "--out", str(out), cwd=tmp_path, check=True)
    stored, reproduced = map(float, re.search(r"ppl\s+stored (\S+)\s+reproduced (\S+)", again.stdout).groups())
    assert stored == reproduced
    assert len(list(out.glob("*.gguf"))) == 1 and len(list(out.glob("*.mergekit.yml"))) == 1
    assert_one_line_error(run_cli("reproduce", str(results / "cli"), "--trial", "99", "--out", str(out), cwd=tmp_path), "trial 99 is not")
