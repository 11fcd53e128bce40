"""Reading a small JSON file that must hold an object, with a one-line error of the caller's choosing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.errors import MergeBotError


def read_json_object(path: Path, *, error: type[MergeBotError], what: str, fix: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object; otherwise ``error("<what> is not valid JSON ...; <fix>")``."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        where = f" near line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise error(f"{what} is not valid JSON ({e.__class__.__name__}{where}); {fix}") from e
    if not isinstance(value, dict):
        raise error(f"{what} must hold a JSON object, found {type(value).__name__}; {fix}")
    return value
