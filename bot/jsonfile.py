"""Reading a small JSON file that must hold an object, with a one-line error of the caller's choosing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.errors import MergeBotError


MAX_JSON_BYTES = 32 * 1024 * 1024  # configs and weight indexes of real models are far smaller


def read_json_object(path: Path, *, error: type[MergeBotError], what: str, fix: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object; otherwise ``error("<what> is not valid JSON ...; <fix>")``."""
    size = Path(path).stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{what} is {size / 2**20:.0f} MiB, too large for a JSON config; {fix}")
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        where = f" near line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        kind = "nested too deeply" if isinstance(e, RecursionError) else e.__class__.__name__
        raise error(f"{what} is not valid JSON ({kind}{where}); {fix}") from e
    if not isinstance(value, dict):
        raise error(f"{what} must hold a JSON object, found {type(value).__name__}; {fix}")
    return value
