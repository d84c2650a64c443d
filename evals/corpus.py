"""Text to score perplexity on.

The offline default is the documentation strings of Python's standard library, read from the
source files every CPython installation carries: real English written by people, no download.
The files are read in sorted order with ``ast`` (nothing is imported), so the text is the same
on every machine with the same Python version.

Other sources: a text file path, or ``hf:DATASET[:CONFIG]:SPLIT:COLUMN`` (needs ``datasets`` and
the internet), e.g. ``hf:wikitext:wikitext-2-raw-v1:test:text``.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from merge_core.errors import SelfMergeError

STDLIB_DOCSTRINGS = "stdlib-docstrings"


def stdlib_docstrings(max_chars: int = 2_000_000) -> str:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:-1] or path.name.startswith(("test_", "_")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # one-liners are mostly signatures, not prose
                    pieces.append(doc)
                    total += len(doc) + 2
        if total >= max_chars:
            break
    if not pieces:
        raise SelfMergeError(f"no docstrings found under {stdlib}: pass a text file with eval.ppl.text=PATH")
    return "\n\n".join(pieces)[:max_chars]


def load_text(source: str, max_chars: int = 2_000_000) -> str:
    """Resolve a corpus name, file path or ``hf:`` dataset id to text."""
    if source == STDLIB_DOCSTRINGS:
        return stdlib_docstrings(max_chars)
    if source.startswith("hf:"):
        return _hf_dataset_text(source, max_chars)
    path = Path(source).expanduser()
    if not path.is_file():
        raise SelfMergeError(f"perplexity text not found: {source} (give a file, '{STDLIB_DOCSTRINGS}', or hf:DATASET:SPLIT:COLUMN)")
    text = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
    if not text.strip():
        raise SelfMergeError(f"perplexity text {source} is empty")
    return text


def _hf_dataset_text(source: str, max_chars: int) -> str:
    parts = source[3:].split(":")
    if len(parts) == 3:
        name, split, column = parts
        config = None
    elif len(parts) == 4:
        name, config, split, column = parts
    else:
        raise SelfMergeError(f"bad dataset id {source!r}: use hf:DATASET[:CONFIG]:SPLIT:COLUMN")
    try:
        import datasets
    except ImportError:
        raise SelfMergeError(f"{source} needs the 'datasets' package: pip install datasets") from None
    rows = datasets.load_dataset(name, config, split=split)
    if column not in rows.column_names:
        raise SelfMergeError(f"dataset {name} has no column {column!r}; it has {rows.column_names}")
    text, total = [], 0
    for value in rows[column]:
        text.append(value)
        total += len(value)
        if total >= max_chars:
            break
    return "".join(text)[:max_chars]
