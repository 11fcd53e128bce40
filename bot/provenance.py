"""Provenance: which exact inputs and options made a merged model, as one fingerprint.

The fingerprint hashes (adapter at its commit, base at its commit, the options that change
the output, merge-bot's version). It is stored in the published repo (``merge_report.json``
and the card's metadata) and in pull-request descriptions, so re-running the same job can
see that it is already done. Local folders have no commit; they are identified by a digest
of their files (whole content for small files; size, mtime and first MiB for large ones).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bot import __version__

FINGERPRINT_MARKER = "merge-bot-fingerprint:"
LOCAL_FOLDER = "a local folder"  # how published files name a local input: never its path
_SMALL_FILE = 8 * 1024 * 1024  # above this, size + mtime + head: small weight shards add up
_HEAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Pinned:
    """One input at an exact version: a Hub repo at a commit SHA, or a local folder at a content digest."""

    name: str  # Hub repo id, or the folder's name for local folders
    revision: str  # commit SHA, or "local-<digest>"
    hub: bool

    def as_dict(self) -> dict:
        return {"name": self.name, "revision": self.revision, "hub": self.hub}


def folder_digest(folder: Path) -> str:
    """Stable digest of a folder's top-level files (names, sizes, and content or its head)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        stat = path.stat()
        size = stat.st_size
        # Large files are identified by size, modification time and their first MiB (hashing
        # gigabytes on every merge would cost more than the merge); small ones by content.
        stamp = stat.st_mtime_ns if size > _SMALL_FILE else 0
        h.update(f"{path.name}\0{size}\0{stamp}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(size if size <= _SMALL_FILE else _HEAD_BYTES))
    return h.hexdigest()[:16]


def pin_local(folder: Path) -> Pinned:
    return Pinned(name=Path(folder).name, revision=f"local-{folder_digest(folder)}", hub=False)


def pin_source(source) -> Pinned:
    """A resolved source (``repo_id``/``sha`` from the Hub, else ``path``) as a Pinned input."""
    if getattr(source, "repo_id", None) and getattr(source, "sha", None):
        return Pinned(name=source.repo_id, revision=source.sha, hub=True)
    return pin_local(source.path)


def output_options(dtype: str, max_shard_bytes: int | None) -> dict:
    """The options that change the published files (the device does not: arithmetic is float32)."""
    return {"dtype": dtype, "max_shard_bytes": "auto" if max_shard_bytes is None else int(max_shard_bytes)}


def fingerprint(adapter: Pinned, base: Pinned, options: dict, version: str = __version__) -> str:
    payload = {"adapter": adapter.as_dict(), "base": base.as_dict(), "options": options, "merge_bot": version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def marker_line(fp: str) -> str:
    """The line a pull request description carries so a later run can find the PR."""
    return f"<!-- {FINGERPRINT_MARKER} {fp} -->"


def has_marker(text: str | None, fp: str) -> bool:
    return bool(text) and marker_line(fp) in text
