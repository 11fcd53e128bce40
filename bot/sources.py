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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bot.errors import (AccessDeniedError, AuthenticationError, HubUnavailableError, IncompatibleBaseError,
                        SourceNotFoundError, UsageError)
from bot.jsonfile import read_json_object
from bot.spec import SourceRef

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def hub_page(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def _hub_errors():
    from huggingface_hub import errors

    return errors


# hf_xet: the Hub's default upload/download transport; its failures are transport failures too.
_NETWORK_MODULES = frozenset({"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "hf_xet"})


def is_network_error(error: BaseException) -> bool:
    """Connection-level failures, whichever HTTP client huggingface_hub is built on."""
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(error).__mro__)


def http_status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: 5xx, 408, 429, or the connection itself."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):  # a setting, not a passing failure
        return False
    status = http_status(error)
    return (status is not None and (status >= 500 or status in (408, 429))) or (status is None and is_network_error(error))


def hub_failure(error: BaseException) -> BaseException | None:
    """The Hub HTTP or connection error behind ``error`` (huggingface_hub wraps LFS failures), if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, HfHubHTTPError) or is_network_error(error):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


READ_RETRY_WAITS = (1.0, 2.0, 4.0)  # seconds between attempts of a read that failed transiently
RATE_LIMIT_MAX_WAIT = 300.0  # the Hub's rate-limit windows are 5 minutes; a longer ask is given up on


def requested_wait(error: BaseException) -> float | None:
    """Seconds a rate-limited (429) client is asked to wait: the ``RateLimit`` header's ``t``
    (what the Hub sends), else ``Retry-After`` in seconds; None when the answer says nothing."""
    response = getattr(error, "response", None)
    if http_status(error) != 429 or response is None:
        return None
    headers = {str(k).lower(): str(v) for k, v in dict(response.headers).items()}
    try:
        from huggingface_hub.utils import parse_ratelimit_headers
    except ImportError:  # older huggingface_hub: Retry-After only
        parse_ratelimit_headers = None
    info = parse_ratelimit_headers(headers) if parse_ratelimit_headers else None
    if info is not None and info.remaining == 0:  # as huggingface_hub reads it: t counts only when r=0
        return float(info.reset_in_seconds)
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None


def retry_wait(cause: BaseException, scheduled: float, waited: float = 0.0) -> float | None:
    """How long to wait before retrying after ``cause``: our backoff, or longer if the Hub asks;
    None to give up now: one operation waits ``RATE_LIMIT_MAX_WAIT`` at most in all (``waited``
    so far), the length of the Hub's rate-limit window."""
    asked = requested_wait(cause)
    wait = scheduled if asked is None else max(scheduled, asked)
    return None if waited + wait > RATE_LIMIT_MAX_WAIT else wait


def read_with_retries(call: Callable[[], T], waits: tuple[float, ...] | None = None) -> T:
    """Run a Hub read, retrying transient failures (the Hub's 5xx/429, dropped connections) with backoff."""
    import time

    waited = 0.0
    for scheduled in (*(READ_RETRY_WAITS if waits is None else waits), None):
        try:
            return call()
        except Exception as e:
            cause = hub_failure(e)
            if scheduled is None or cause is None or not is_transient(cause):
                raise
            wait = retry_wait(cause, scheduled, waited)
            if wait is None:
                raise
            log.warning("transient Hub error on a read (%s); retrying in %.0fs",
                        http_status(cause) or cause.__class__.__name__, wait)
            time.sleep(wait)
            waited += wait
    raise AssertionError("unreachable")


def is_bare_name(ref: SourceRef) -> bool:
    """A slashless name typed where a folder would do ("demo-adapter"): most likely a mistyped
    folder, so an unreachable Hub is neither retried nor blamed (see ``hub_read_errors``)."""
    return ref.folder_candidate and "/" not in ref.name


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _no_folder_nor_repo(ref: SourceRef) -> SourceNotFoundError:
    return SourceNotFoundError(f"no folder ./{ref.name} and no Hub repo {ref.name} (or it is private and your token "
                               f"cannot see it); check the spelling")


@contextmanager
def hub_read_errors(what: str, ref: SourceRef, *, gated: bool | None = None) -> Iterator[None]:
    """Turn huggingface_hub's read failures into one-line merge-bot errors naming the repo.

    ``gated``: what the repo's listing said, for servers that refuse a gated file with a bare
    401/403 rather than the ``GatedRepo`` error code."""
    errors = _hub_errors()
    gated_message = (f"{what} repo {ref.name} is gated and your token's account has no access; "
                     f"request access at {hub_page(ref.name)}, then retry with that account's token")
    try:
        yield
    except errors.GatedRepoError as e:
        raise AccessDeniedError(gated_message) from e
    except errors.RevisionNotFoundError as e:
        raise SourceNotFoundError(f"{what} revision {ref.revision!r} does not exist in {ref.name}") from e
    except errors.RepositoryNotFoundError as e:
        if is_bare_name(ref):  # typed where a folder would do: say both places were looked at
            raise _no_folder_nor_repo(ref) from e
        raise SourceNotFoundError(
            f"{what} repo {ref.name} not found on the Hub (or it is private and your token cannot see it)"
        ) from e
    except errors.LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: the download failed, offline
        raise HubUnavailableError(
            f"could not reach the Hub to download {what} {ref.name}; check your connection (or HF_HUB_OFFLINE)"
        ) from e
    except errors.EntryNotFoundError as e:
        raise SourceNotFoundError(f"{what} repo {ref.name} lacks a file it needs: {e.__class__.__name__}") from e
    except errors.HfHubHTTPError as e:
        status = http_status(e)
        if gated and status in (401, 403):
            raise AccessDeniedError(gated_message) from e
        if status == 401:
            raise AuthenticationError(f"the Hub rejected the token while reading {what} repo {ref.name} (HTTP 401); "
                                      f"pass a valid --token, set HF_TOKEN, or run `hf auth login`") from e
        if status == 403:
            raise AccessDeniedError(f"the Hub refused to read {what} repo {ref.name} (HTTP 403); check your token") from e
        if status == 404 and is_bare_name(ref):
            raise _no_folder_nor_repo(ref) from e
        if status == 404:
            raise SourceNotFoundError(f"{what} repo {ref.name} or a file in it was not found on the Hub (HTTP 404)") from e
        if is_transient(e):
            busy = "rate-limited the reads" if status == 429 else "kept failing"
            raise HubUnavailableError(f"the Hub {busy} while reading {what} repo {ref.name} (HTTP {status}); "
                                      f"retry later") from e
        raise SourceNotFoundError(f"could not download {what} {ref.name} from the Hub (HTTP {status})") from e
    except Exception as e:
        if is_bare_name(ref) and (isinstance(e, errors.LocalEntryNotFoundError) or is_network_error(e)):
            why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
            raise SourceNotFoundError(f"no folder ./{ref.name}, and no Hub repo {ref.name} was looked up ({why}); "
                                      f"check the folder's path") from e
        if isinstance(e, errors.LocalEntryNotFoundError) or is_network_error(e):
            raise HubUnavailableError(
                f"could not reach the Hub to download {what} {ref.name}; check your connection (or HF_HUB_OFFLINE)"
            ) from e
        raise


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


def resolve_source(ref: SourceRef, *, what: str, token: str | None = None, endpoint: str | None = None,
                   stream_weights: bool = False) -> ResolvedSource:
    """Local folder as is; Hub repo pinned to a SHA and the needed files downloaded.

    ``stream_weights``: leave a base's safetensors weights on the Hub (``ResolvedSource.remote``)
    unless they are all in the local cache already; only the small files are downloaded.
    """
    if ref.local:
        check_links_stay_inside(Path(ref.name), what)
        return ResolvedSource(ref=ref, path=Path(ref.name))
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache

    api = HfApi(endpoint=endpoint, token=token)
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
                                   token=token)
            wanted = [f for f in wanted if f not in weights]
        path = read_with_retries(lambda: snapshot_download(ref.name, revision=sha, allow_patterns=wanted, token=token,
                                                           endpoint=endpoint))
    return ResolvedSource(ref=ref, path=Path(path), repo_id=repo_id, sha=sha, remote=remote)
