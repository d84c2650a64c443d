"""The house rules, checked on the source: three floors with every import pointing down
(sweep -> evals -> merge_core), sweep/ in rooms that state their contract, one table per concept,
Optuna's private names imported in one module and used only where its guard covers them."""

import ast
import re

from evals.registry import EVALS

from conftest import REPO

FLOORS = ["merge_core", "evals", "sweep"]  # each may import only the ones before it
ROOMS = ["search", "trials", "study", "results"]  # sweep/'s subpackages (sweep/__init__.py says what each holds)
OPTUNA_PRIVATE = "sweep/study/optuna_private.py"  # imports Optuna's private names and guards them
# the speed-ups that use Optuna's internals (through OPTUNA_PRIVATE), used only where its guard allows
GUARDED = {OPTUNA_PRIVATE, "sweep/study/storage.py", "sweep/search/windowed.py"}


def _sources(*packages: str):
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text()


def _imported_packages(text: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _strings(text: str):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_imports_point_down():
    upward = []
    for floor, package in enumerate(FLOORS):
        above = set(FLOORS[floor + 1 :])
        for path, text in _sources(package):
            upward += [f"{path} imports {name}" for name in _imported_packages(text) & above]
    assert upward == []


def test_architectures_and_layer_names_live_in_the_table():
    table = "merge_core/architectures.py"
    found = []
    for path, text in _sources(*FLOORS):
        if path == table:
            continue
        for line, value in _strings(text):  # names and patterns, not prose (which has spaces)
            if " " not in value and re.search(r"\bblk\\?\.|model\\?\.layers\\?\.|ForCausalLM", value):
                found.append(f"{path}:{line} {value!r}")
    assert found == []


def test_eval_names_live_in_the_registry_and_the_schema():
    names = set(EVALS) | {field for spec in EVALS.values() for field in (*spec.columns, *spec.scores, spec.seconds)}
    found = []
    for path, text in _sources(*FLOORS):
        if path != "evals/schema.py":
            found += [f"{path}:{line} {value!r}" for line, value in _strings(text) if value in names]
    assert found == []


def test_optuna_private_names_are_imported_in_one_module_and_used_under_its_guard():
    imports, uses = [], []
    for path, text in _sources(*FLOORS, "tests", "benchmarks"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna"):
                private = any(part.startswith("_") for part in node.module.split("."))
                private |= any(alias.name.startswith("_") for alias in node.names)
                if private and path != OPTUNA_PRIVATE:
                    imports.append(f"{path}:{node.lineno} {node.module}")
        if path.startswith(("sweep/", "evals/")) and path not in GUARDED:
            pattern = r"\._(storage|study_id|trial_id|get_trials|cached_frozen_trial|backend)\b"
            uses += [f"{path}:{text[: m.start()].count(chr(10)) + 1}" for m in re.finditer(pattern, text)]
    assert imports == [] and uses == []


def test_sweep_is_in_rooms_that_state_their_contract():
    sweep = REPO / "sweep"
    rooms = sorted(p.parent.name for p in sweep.glob("*/__init__.py"))
    assert rooms == sorted(ROOMS)
    assert sorted(p.name for p in sweep.glob("*.py")) == ["__init__.py", "cli.py", "config.py"]
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((sweep / room / "__init__.py").read_text())) or ""
        modules = {p.stem for p in (sweep / room).glob("*.py")} - {"__init__"}
        unnamed = [m for m in modules if f"{m}.py" not in doc]
        assert len(doc) > 200 and unnamed == [], f"sweep/{room}/__init__.py does not name {unnamed}"


def test_tests_mirror_the_package():
    tests = REPO / "tests"
    assert {d.name for d in tests.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))} == {*FLOORS, "data"}
    rooms = {d.name for d in (tests / "sweep").iterdir() if d.is_dir() and not d.name.startswith((".", "_"))}
    assert rooms == set(ROOMS)
    for room in ROOMS:
        assert list((tests / "sweep" / room).glob("test_*.py")), f"tests/sweep/{room} has no tests"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # one basename per test module (pytest's default import mode)


def test_the_tested_optuna_range_is_declared_once_and_ci_runs_its_oldest_release():
    from sweep.study.optuna_private import TESTED_RANGE

    declared = re.search(r'^optuna-tested = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared is not None and declared.group(1) == TESTED_RANGE
    oldest = re.match(r">=([\d.]+),", TESTED_RANGE).group(1)
    assert f"OPTUNA_OLDEST=optuna=={oldest}.0" in (REPO / ".ci" / "run").read_text()
