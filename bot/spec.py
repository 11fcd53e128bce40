"""What the user asked for, validated once at the edge (CLI, Space, YAML, webhook)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bot.errors import SourceNotFoundError, UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
# --max-shard-size auto: a sixteenth of the output, between these bounds. Many shards let a
# streamed publish upload while it merges (wall time near the slower of download and upload, not
# their sum): the first upload starts after 1/16 of the merge, the last one's tail is 1/16 of the
# upload, and the ``UPLOADS_AT_ONCE`` shards in flight stay a quarter of the model on disk;
# 2 GiB keeps a 70B model at ~70 files.
AUTO_SHARD_MIN = 128 * 2**20
AUTO_SHARD_MAX = 2 * 2**30


def auto_shard_bytes(output_bytes: int) -> int:
    """The output shard size ``--max-shard-size auto`` picks for a model of ``output_bytes``."""
    return min(AUTO_SHARD_MAX, max(AUTO_SHARD_MIN, -(-output_bytes // 16)))

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_MAX_REF_CHARS = 4096  # PATH_MAX; no folder or repo id is longer


def is_valid_revision(revision: object) -> bool:
    """A branch, tag or commit name the Hub could have (no '..', no odd characters)."""
    return isinstance(revision, str) and bool(_REVISION.match(revision)) and ".." not in revision


@dataclass(frozen=True)
class SourceRef:
    """A local folder, or a Hub model repo id with an optional revision (``owner/name@rev``)."""

    name: str
    revision: str | None = None
    local: bool = False
    # Typed where a folder would do too (a bare name, no URL, no @revision): a Hub miss then says
    # "no folder ./x and no Hub repo x", and a slashless one never waits on an offline Hub.
    folder_candidate: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


# What users paste from a browser: https://huggingface.co/owner/name[/tree/rev | /blob/rev/file | /resolve/rev/file],
# hf.co/owner/name, with or without the scheme or www; and the same pages of the Hub-compatible server
# HF_ENDPOINT names, when one is configured (its users paste its addresses).
_HUB_HOSTS = r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)"
_URL_TAILS = ("tree", "blob", "resolve", "commit")


def _hub_url_pattern() -> re.Pattern:
    hosts = _HUB_HOSTS
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if re.match(r"^https?://[^/?#]+", endpoint):
        hosts = f"(?:{hosts}|{re.escape(endpoint)})"
    return re.compile(rf"^{hosts}/(?P<path>[^?#]*)(?:[?#].*)?$", re.IGNORECASE)


def _from_hub_url(text: str, what: str) -> str | None:
    """``owner/name[@revision]`` for a pasted Hub URL; None when ``text`` is no Hub URL."""
    from urllib.parse import unquote

    match = _hub_url_pattern().match(text)
    if match is None:
        if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
            raise UsageError(f"{what} {text[:100]!r} is a web address but not a Hugging Face Hub one; give owner/name "
                             f"or https://huggingface.co/owner/name")
        return None
    parts = [unquote(p) for p in match.group("path").strip("/").split("/") if p]
    if parts and parts[0] in ("datasets", "spaces"):
        raise UsageError(f"{what} {text[:100]!r} is a {parts[0][:-1]}, not a model; give a model repo")
    if parts and parts[0] == "models":
        parts = parts[1:]
    if len(parts) >= 4 and parts[2] in _URL_TAILS:
        return f"{parts[0]}/{parts[1]}@{parts[3]}"
    if len(parts) in (1, 2):
        return "/".join(parts)
    raise UsageError(f"{what} {text[:100]!r} is not a model page address like https://huggingface.co/owner/name")


def parse_source_ref(text: str, *, what: str = "adapter", allow_local: bool = True) -> SourceRef:
    """``./folder`` or ``/abs/folder`` (must exist) or ``owner/name[@revision]``, or a pasted Hub URL.

    Accepted URLs: ``https://huggingface.co/owner/name`` with optional ``/tree/<rev>``,
    ``/blob/<rev>/...`` or ``/resolve/<rev>/...``, and ``hf.co/owner/name``; they normalise to
    the repo id and revision. ``allow_local=False`` is for names read from files that came from
    the Hub (an adapter's ``base_model_name_or_path``) and web forms: those must never reach into
    this machine's folders.
    """
    text = (text or "").strip()
    if not text:
        raise UsageError(f"{what} is empty; give a local folder or a Hub repo id such as owner/name")
    shown = text if len(text) <= 100 else text[:100] + "..."
    if len(text) > _MAX_REF_CHARS or "\0" in text:
        raise UsageError(f"{what} {shown!r} is not a folder or Hub repo id (too long, or a NUL character)")
    if allow_local and _exists(Path(text).expanduser()):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise UsageError(f"{what} {shown} is a file; give the folder that holds it")
        return SourceRef(name=str(path.resolve()), local=True)
    from_url = _from_hub_url(text, what)
    name, _, revision = (from_url or text).partition("@")
    looks_local = from_url is None and (text.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in text)
    if looks_local:
        if allow_local:
            raise SourceNotFoundError(f"{what} folder {shown} does not exist; check the path")
        raise UsageError(f"{what} is the local path {shown!r}, which a Hub adapter cannot use; pass --base with the "
                         f"base model's Hub id or folder")
    if not _REPO_ID.match(name) or ".." in name or (revision and not is_valid_revision(revision)) \
            or not _valid_for_hub(name):
        if allow_local and from_url is None:
            raise UsageError(f"no {what} folder ./{shown}, and {shown!r} is not a Hub repo id like owner/name[@revision]; "
                             f"check the spelling")
        raise UsageError(f"{what} {shown!r} is neither an existing folder nor a Hub repo id like owner/name[@revision]")
    return SourceRef(name=name, revision=revision or None,
                     folder_candidate=allow_local and from_url is None and not revision)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name the file system cannot even look up
        return False


def _valid_for_hub(repo_id: str) -> bool:
    """huggingface_hub's own repo-id rules (no trailing '-' or '.', no '--', no '.git', ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


MIN_SHARD_BYTES = 1000  # 1KB: anything smaller is a typo (a bare "5" once meant 5 bytes and 21 shards)


def parse_shard_size(text: str | int | None) -> int | None:
    """``--max-shard-size``: "auto" (or None) -> None, else a size with a unit, at least 1KB."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    value = parse_size(text)
    if value < MIN_SHARD_BYTES:
        raise UsageError(f"max shard size {text!r} is {value} bytes, below the 1KB minimum; give a size like 2GB "
                         f"or 500MB, or auto")
    return value


def parse_size(text: str | int) -> int:
    """"5GB", "500MB", "2GiB", "64KB" -> bytes. A unit is required: a bare number is ambiguous."""
    if isinstance(text, int):  # from code, already in bytes
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B?|B)?\s*", str(text).upper())
    if not m:
        raise UsageError(f"size {str(text)[:40]!r} is not like 2GB, 500MB or 64KiB")
    if not m.group(2):
        raise UsageError(f"size {str(text)[:40]!r} has no unit; write {m.group(1)}GB, {m.group(1)}MB or "
                         f"{m.group(1)}KB (KiB, MiB, GiB for powers of 1024)")
    unit = m.group(2).rstrip("B") or ""
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class MergeSpec:
    adapter: SourceRef
    out: Path
    base: SourceRef | None = None
    dtype: str = "auto"
    device: str = "auto"
    verify: bool = False
    overwrite: bool = False
    max_shard_bytes: int | None = None  # None: auto (auto_shard_bytes)
    token: str | None = field(default=None, repr=False)
    base_note: str | None = None  # why the base is not the one adapter_config.json names (pre-flight)
    requested_by: str | None = None  # Hub user who asked for this merge (self-service), credited in the card

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise UsageError(f"unsupported device {self.device!r}; choose one of {', '.join(DEVICES)}")
