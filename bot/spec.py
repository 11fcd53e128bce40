"""What the user asked for, validated once at the edge (CLI, Space, YAML, webhook)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bot.errors import SourceNotFoundError, UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
# --max-shard-size auto: an eighth of the output, between these bounds. Eight or more shards let a
# streamed publish upload while it merges (wall time near the slower of download and upload, not
# their sum) and keep scratch disk at two shards; 2 GiB keeps a 70B model at ~70 files.
AUTO_SHARD_MIN = 128 * 2**20
AUTO_SHARD_MAX = 2 * 2**30


def auto_shard_bytes(output_bytes: int) -> int:
    """The output shard size ``--max-shard-size auto`` picks for a model of ``output_bytes``."""
    return min(AUTO_SHARD_MAX, max(AUTO_SHARD_MIN, -(-output_bytes // 8)))

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

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


def parse_source_ref(text: str, *, what: str = "adapter", allow_local: bool = True) -> SourceRef:
    """``./folder`` or ``/abs/folder`` (must exist) or ``owner/name[@revision]``.

    ``allow_local=False`` is for names read from files that came from the Hub (an adapter's
    ``base_model_name_or_path``): those must never reach into this machine's folders.
    """
    text = (text or "").strip()
    if not text:
        raise UsageError(f"{what} is empty; give a local folder or a Hub repo id such as owner/name")
    shown = text if len(text) <= 100 else text[:100] + "..."
    if len(text) > _MAX_REF_CHARS or "\0" in text:
        raise UsageError(f"{what} {shown!r} is not a folder or Hub repo id (too long, or a NUL character)")
    name, _, revision = text.partition("@")
    looks_local = text.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in text
    if allow_local:
        path = Path(text).expanduser()
        try:
            exists = path.exists()
        except OSError:  # a name the file system cannot even look up
            exists = False
        if exists:
            if not path.is_dir():
                raise UsageError(f"{what} {shown} is a file; give the folder that holds it")
            return SourceRef(name=str(path.resolve()), local=True)
        if looks_local:
            raise SourceNotFoundError(f"{what} folder {shown} does not exist; check the path")
    elif looks_local:
        raise UsageError(f"{what} is the local path {shown!r}, which a Hub adapter cannot use; pass --base with the "
                         f"base model's Hub id or folder")
    if not _REPO_ID.match(name) or ".." in name or (revision and not is_valid_revision(revision)) \
            or not _valid_for_hub(name):
        raise UsageError(f"{what} {shown!r} is neither an existing folder nor a Hub repo id like owner/name[@revision]")
    return SourceRef(name=name, revision=revision or None)


def _valid_for_hub(repo_id: str) -> bool:
    """huggingface_hub's own repo-id rules (no trailing '-' or '.', no '--', no '.git', ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def parse_shard_size(text: str | int | None) -> int | None:
    """``--max-shard-size``: "auto" (or None) -> None, else ``parse_size``."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    return parse_size(text)


def parse_size(text: str | int) -> int:
    """"5GB", "500MB", "2GiB" or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise UsageError(f"size {text!r} is not like 5GB or 500MB")
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
