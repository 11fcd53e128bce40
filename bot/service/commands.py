"""The one-line request language: ``/merge owner/adapter[@rev] [--pr owner/repo] [--dtype D] [--base B]``."""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from bot.errors import MergeBotError
from bot.spec import DTYPES, parse_source_ref

SYNTAX = "/merge owner/adapter[@revision] [--pr owner/repo] [--dtype auto|bfloat16|float16|float32] [--base owner/base]"
_OPTIONS = {"--pr": "pr_repo", "--dtype": "dtype", "--base": "base"}


@dataclass(frozen=True)
class MergeRequest:
    adapter: str
    pr_repo: str | None = None
    dtype: str = "auto"
    base: str | None = None

    @property
    def key(self) -> str:
        """Identical requests share this key (case-insensitive repo ids)."""
        return "|".join([self.adapter.lower(), (self.pr_repo or "").lower(), self.dtype, (self.base or "").lower()])


class CommandError(ValueError):
    """A /merge line that does not parse; the message says what is wrong (the reply adds the syntax)."""


def find_command(text: str | None) -> str | None:
    """The first line starting with /merge, or None when the text is not a request at all."""
    for line in (text or "").splitlines():
        stripped = line.strip().strip("`").strip()
        if stripped == "/merge" or stripped.startswith("/merge "):
            return stripped
    return None


MAX_COMMAND_CHARS = 400


def parse_command(line: str) -> MergeRequest:
    if len(line) > MAX_COMMAND_CHARS:
        raise CommandError(f"the command is longer than {MAX_COMMAND_CHARS} characters")
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise CommandError(f"could not read the command ({e})") from e
    if not words or words[0] != "/merge":
        raise CommandError("a request starts with /merge")
    if len(words) < 2 or words[1].startswith("--"):
        raise CommandError("name the adapter to merge")
    values: dict[str, str] = {"adapter": words[1]}
    rest = words[2:]
    while rest:
        option = rest.pop(0)
        if option not in _OPTIONS:
            raise CommandError(f"unknown option {option[:40]!r}")
        if not rest or rest[0].startswith("--"):
            raise CommandError(f"{option} needs a value")
        values[_OPTIONS[option]] = rest.pop(0)
    if values.get("dtype", "auto") not in DTYPES:
        raise CommandError(f"--dtype must be one of {', '.join(DTYPES)}")
    try:
        parse_source_ref(values["adapter"], what="adapter", allow_local=False)
        if values.get("base"):
            parse_source_ref(values["base"], what="--base", allow_local=False)
        if values.get("pr_repo"):
            ref = parse_source_ref(values["pr_repo"], what="--pr repo", allow_local=False)
            if ref.revision or "/" not in ref.name:
                raise CommandError("--pr takes a repo id like owner/name")
    except MergeBotError as e:
        raise CommandError(str(e)) from e
    return MergeRequest(**values)
