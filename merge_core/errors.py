"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class SelfMergeError(ValueError):
    """A problem with what the user asked for (a plan, a file, a config value)."""


def read_json(path: Path) -> Any:
    """A JSON file the user gave us (config.json, an index, tokenizer.json): a clear error naming the
    file and where the JSON breaks, never a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SelfMergeError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SelfMergeError(f"cannot read {path}: {err}") from None
