"""Reading a JSON object a user or another tool wrote (config.json, tokenizer_config.json, ...): the
object, or one K2Error naming the file, what is wrong with it and `fix`."""

from __future__ import annotations

import json
from pathlib import Path

from k2cli.errors import K2Error


def read_object(path: str | Path, fix: str) -> dict:
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"cannot read {path}: {e}", fix) from None
    if not isinstance(value, dict):
        raise K2Error(f"{path} is not a JSON object", fix)
    return value
