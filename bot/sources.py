"""Turning a SourceRef into a local folder: as is, or downloaded from the Hub at a pinned commit.

Only the files a merge needs are downloaded (configs, safetensors weights named by the
index, tokenizer, chat template, generation and processor configs), into huggingface_hub's
normal cache. The revision is pinned to a commit SHA first, so a branch that moves mid-run
cannot mix two versions.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import IncompatibleBaseError, UsageError
from bot.jsonfile import read_json_object
from bot.spec import SourceRef
from bot.transport import hub_read_errors, read_with_retries

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "*.tiktoken",
)
# Vision-language and speech models: what their processors load besides the tokenizer.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Everything besides weights and config.json that travels into the merged folder (bot/sidefiles.py).
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", *SIDE_FILES)
BASE_CONFIG_FILES = ("config.json", "README.md", *SIDE_FILES)


@dataclass(frozen=True)
class ResolvedSource:
    """A source as a local folder, with the Hub commit it came from when it came from the Hub."""

    ref: SourceRef
    path: Path
    repo_id: str | None = None
    sha: str | None = None
    remote: Any = None  # bot.remote.RemoteWeights: the safetensors weights stay on the Hub (streamed merges)

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.sha[:12]}" if self.repo_id and self.sha else str(self.path)


def is_tokenizer_file(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES)


def is_side_file(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in SIDE_FILES)


def index_weight_names(index: dict, where: str) -> list[str]:
    """The shard file names a weight index maps tensors to: plain names of weight files in the same folder.

    An index comes from whoever made the repo: a path ("../x", "/abs/x") would make the merge
    read, and publish, a file outside the repo; a glob ("*") would download the whole repo.
    """
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise IncompatibleBaseError(f"{where} has no valid weight_map (tensor name -> file name); "
                                    f"fix or re-download the base")
    names = sorted(set(weight_map.values()))
    for name in names:
        if (len(name) > 255 or name.startswith(".") or any(c in name for c in '/\\*?[]\0')
                or not name.endswith((".safetensors", ".bin"))):
            raise IncompatibleBaseError(f"{where} names weight file {name[:80]!r}, which is not a weight file in "
                                        f"the same folder; fix or re-download the base")
    return names


def pick_base_weight_files(files: list[str], index: dict | None, index_name: str = "the weight index") -> list[str]:
    """The weight files transformers would load: the index's shards, else the single file, else .bin."""
    if index is not None:
        names = index_weight_names(index, index_name)
        missing = [n for n in names if n not in files]
        if missing:
            raise IncompatibleBaseError(f"{index_name} names {missing[0]}, which the repo does not have; "
                                        f"fix or re-upload the base")
        return names
    root = [f for f in files if "/" not in f]
    if "model.safetensors" in root:
        return ["model.safetensors"]
    if "pytorch_model.bin" in root:
        return ["pytorch_model.bin"]
    return []


def files_to_download(files: list[str], what: str, read_index: Callable[[str], dict]) -> list[str]:
    """The repo files a merge needs; ``read_index(name)`` fetches a weight index when there is one."""
    if what == "adapter":
        wanted = [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in ADAPTER_FILES)]
        if "adapter_model.safetensors" not in files and "adapter_model.bin" in files:
            wanted.append("adapter_model.bin")
        return sorted(set(wanted))
    wanted = [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in BASE_CONFIG_FILES)]
    index, index_name = None, None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in files:
            index = read_index(index_name)
            wanted.append(index_name)
            break
    return sorted(set(wanted + pick_base_weight_files(files, index, index_name)))


_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")  # huggingface_hub's cache folder names


def check_links_stay_inside(folder: Path, what: str) -> None:
    """Refuse a local folder whose files link outside it (a cloned repo can carry such links): the
    merge would read, and a publish upload, whatever they point at. A huggingface_hub snapshot
    folder (``models--org--name/snapshots/<sha>``) may link into its own ``../../blobs``."""
    folder = folder.resolve()
    roots = [folder]
    repo = folder.parents[1] if len(folder.parents) > 1 else None
    if folder.parent.name == "snapshots" and repo is not None and repo.name.startswith(_CACHE_REPO_PREFIXES):
        roots.append(repo / "blobs")
    for entry in folder.iterdir():
        if entry.is_symlink():
            try:
                target = Path(os.path.realpath(entry, strict=True))
            except OSError:  # a dangling link or a loop
                raise UsageError(f"{entry.name} in {what} folder {folder} is a broken link; remove it or copy the "
                                 f"real file in") from None
            if not any(target.is_relative_to(root) for root in roots):
                raise UsageError(f"{entry.name} in {what} folder {folder} links outside the folder ({target}); "
                                 f"copy the real file in")


def canonical_repo_id(info, asked: str) -> str:
    """The repo id as the Hub spells it (ids match case-insensitively, and renamed repos redirect),
    so one repo gets one fingerprint however it was typed."""
    from huggingface_hub.utils import validate_repo_id

    canonical = getattr(info, "id", None)
    if not isinstance(canonical, str) or "/" not in canonical:
        return asked
    try:
        validate_repo_id(canonical)
    except Exception:  # a server answering with junk: keep what the user typed
        return asked
    return canonical


def resolve_source(ref: SourceRef, *, what: str, api: HfApi, stream_weights: bool = False) -> ResolvedSource:
    """Local folder as is; Hub repo pinned to a SHA and the needed files downloaded, through ``api``.

    ``stream_weights``: leave a base's safetensors weights on the Hub (``ResolvedSource.remote``)
    unless they are all in the local cache already; only the small files are downloaded.
    """
    if ref.local:
        check_links_stay_inside(Path(ref.name), what)
        return ResolvedSource(ref=ref, path=Path(ref.name))
    from huggingface_hub import try_to_load_from_cache

    with hub_read_errors(what, ref):
        info = read_with_retries(lambda: api.model_info(ref.name, revision=ref.revision, files_metadata=False))
        sha = info.sha
        files = [s.rfilename for s in (info.siblings or [])]

        def read_index(name: str) -> dict:
            return read_json_object(Path(api.hf_hub_download(ref.name, name, revision=sha)),
                                    error=IncompatibleBaseError, what=f"{what} {name}", fix="check the repo")

        wanted = files_to_download(files, what, read_index)
        repo_id = canonical_repo_id(info, ref.name)
        weights = [f for f in wanted if f.endswith(".safetensors")]
        remote = None
        if stream_weights and weights and not all(
                isinstance(try_to_load_from_cache(ref.name, f, revision=sha), str) for f in weights):
            from bot.remote import RemoteWeights

            remote = RemoteWeights(repo_id=ref.name, sha=sha, endpoint=api.endpoint, files=tuple(weights),
                                   token=api.token)
            wanted = [f for f in wanted if f not in weights]
        path = read_with_retries(lambda: api.snapshot_download(ref.name, revision=sha, allow_patterns=wanted))
    return ResolvedSource(ref=ref, path=Path(path), repo_id=repo_id, sha=sha, remote=remote)
