"""The house rules, checked on the source: three floors with every import pointing down
(sweep -> evals -> merge_core), one table per concept, Optuna's private attributes in one module."""

import ast
import re

from evals.registry import EVALS

from conftest import REPO

FLOORS = ["merge_core", "evals", "sweep"]  # each may import only the ones before it


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


def test_optuna_private_attributes_stay_in_one_module():
    found = [
        f"{path}:{text[: match.start()].count(chr(10)) + 1}"
        for path, text in _sources("sweep", "evals")
        if path != "sweep/optuna_access.py"
        for match in re.finditer(r"\._(storage|study_id|trial_id)\b", text)
    ]
    assert found == []


def test_tests_mirror_the_package():
    for directory in (REPO / "tests").iterdir():
        if directory.is_dir() and directory.name in FLOORS:
            for test in directory.glob("test_*.py"):
                assert test.is_file()
    assert {d.name for d in (REPO / "tests").iterdir() if d.is_dir() and not d.name.startswith((".", "_"))} == set(FLOORS)
