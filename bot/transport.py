"""Hub transport: the one client a job uses, the one retry policy, the error mapping, the transfer mode.

Every Hub read and write of a job goes through the ``HfApi`` that ``hub_client`` builds at the top
of the job path (``run_publish_job``, a batch, the service, the Space) and that is passed down as
``api``; nothing below builds another. Every call that may fail transiently runs in ``retrying``:
5xx, 408, 429 and dropped connections are retried with backoff (longer when the Hub asks for it,
up to its 5-minute rate-limit window in all); anything else is raised at once. Failures then become
merge-bot's one-line errors: ``hub_read_errors`` for reading a source, ``hub_write_errors`` for
publishing. ``transfer_mode`` picks Xet or LFS for a job's uploads.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from bot.errors import (AccessDeniedError, AuthenticationError, HubUnavailableError, MergeBotError, PublishError,
                        RepoConflictError, SourceNotFoundError)
from bot.spec import SourceRef

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_RETRY_WAITS = (1.0, 2.0, 4.0)  # seconds between attempts of a read that failed transiently
WRITE_RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)  # seconds between attempts of a publishing step
RATE_LIMIT_MAX_WAIT = 300.0  # the Hub's rate-limit windows are 5 minutes; a longer ask is given up on


def hub_client(*, token: str | bool | None, endpoint: str | None = None) -> HfApi:
    """The job's one Hub client. ``token`` None: huggingface_hub's stored login; False: anonymous.
    ``endpoint`` None: ``HF_ENDPOINT``, else the Hub."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


# --- what a failure is -------------------------------------------------------------------------

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


def hub_failure(error: BaseException | None) -> BaseException | None:
    """The Hub HTTP or connection error behind ``error`` (huggingface_hub wraps LFS failures), if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, HfHubHTTPError) or is_network_error(error):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


# --- the one retry loop ------------------------------------------------------------------------

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


def retrying(call: Callable[[], T], *, waits: tuple[float, ...], doing: str = "on a read",
             also_retry: Callable[[BaseException], bool] = lambda _: False) -> T:
    """Run ``call`` until it succeeds, waiting ``waits`` between attempts after a transient Hub failure
    (or one ``also_retry`` accepts); raises the last failure, or any other one at once. A merge-bot
    error is already an answer and is never retried. ``doing``: for the log line."""
    waited = 0.0
    for scheduled in (*waits, None):
        try:
            return call()
        except MergeBotError:
            raise
        except Exception as e:
            cause = hub_failure(e)
            if scheduled is None or cause is None or not (is_transient(cause) or also_retry(cause)):
                raise
            wait = retry_wait(cause, scheduled, waited)
            if wait is None:  # rate-limited for longer than is worth waiting
                raise
            log.warning("transient Hub error %s (%s); retrying in %.1fs",
                        doing, http_status(cause) or cause.__class__.__name__, wait)
            time.sleep(wait)
            waited += wait
    raise AssertionError("unreachable")


def read_with_retries(call: Callable[[], T], waits: tuple[float, ...] | None = None) -> T:
    """A Hub read, retried on transient failures (``READ_RETRY_WAITS`` unless ``waits`` says otherwise)."""
    return retrying(call, waits=READ_RETRY_WAITS if waits is None else waits)


def write_with_retries(attempt: Callable[[], T], *, doing: str, repo_id: str,
                       waits: tuple[float, ...] | None = None) -> T:
    """A publishing step, retried on transient failures and on 412 (the target moved: each attempt
    re-checks it); the last failure becomes a one-line error (``hub_write_errors``)."""
    with hub_write_errors(doing, repo_id):
        return retrying(attempt, waits=WRITE_RETRY_WAITS if waits is None else waits, doing=f"while {doing}",
                        also_retry=lambda cause: http_status(cause) == 412)


# --- failures as merge-bot errors --------------------------------------------------------------

def _server_message(error: BaseException) -> str:
    message = getattr(error, "server_message", None) or ""
    return " ".join(str(message).split())[:300]


def translate_write_error(error: BaseException, doing: str, repo_id: str) -> MergeBotError:
    """A permanent Hub failure while writing, as a one-line error with its own exit code."""
    status, said = http_status(error), _server_message(error)
    detail = f": {said}" if said else ""
    if status == 401:
        return AuthenticationError(f"the Hub rejected the token while {doing} (HTTP 401); pass --token, set HF_TOKEN "
                                   f"or run `hf auth login` with a token that has write access")
    if status == 403:
        return AccessDeniedError(f"the token's account may not write to {repo_id} (HTTP 403){detail}; use a repo in "
                                 f"your own namespace or an org where you have write access")
    if status == 404:
        return SourceNotFoundError(f"{repo_id} was not found while {doing} (HTTP 404){detail}")
    if status in (409, 412):
        return RepoConflictError(f"{repo_id} changed or already exists while {doing} (HTTP {status}){detail}")
    if status is None and is_network_error(error):
        return PublishError(f"could not reach the Hub while {doing} ({error.__class__.__name__}); nothing was "
                            f"committed; check your connection and retry")
    if status == 402:
        return PublishError(f"the Hub refused the upload while {doing} (HTTP 402: payment or storage quota){detail}; "
                            f"nothing was committed")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return PublishError(f"the Hub refused the request while {doing} (HTTP {status}){detail}; nothing was "
                            f"committed")
    return PublishError(f"the Hub failed while {doing} (HTTP {status}){detail}; nothing was committed; retry later")


@contextmanager
def hub_write_errors(doing: str, repo_id: str) -> Iterator[None]:
    try:
        yield
    except MergeBotError:
        raise
    except Exception as e:
        cause = hub_failure(e)
        if cause is None:
            raise
        raise translate_write_error(cause, doing, repo_id) from e


def hub_page(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


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
    from huggingface_hub import errors

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


# --- the transfer mode -------------------------------------------------------------------------

def offers_xet(api: HfApi, repo_id: str) -> bool:
    """Whether ``api``'s server takes Xet uploads for ``repo_id``: it hands out a Xet write token.
    A 401/403 only means this caller gets no token for main (a pull request on someone else's repo
    asks for its own), so that counts as offered; no such route, or no answer, as not offered."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{api.endpoint}/api/models/{repo_id}/xet-write-token/main"
    try:
        response = get_session().get(url, headers=build_hf_headers(token=api.token),
                                     timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:  # noqa: BLE001 - any failure to offer Xet means: upload the other way
        return False
    return response.status_code in (401, 403) or (
        response.status_code == 200 and constants.HUGGINGFACE_HEADER_X_XET_ENDPOINT in response.headers)


# huggingface_hub 2.4 decides Xet or LFS inside ``_upload_files`` with ``is_xet_available()``, which
# reads nothing but the process-wide ``constants.HF_HUB_DISABLE_XET`` (and whether hf_xet is
# installed): neither ``HfApi`` nor ``preupload_lfs_files``/``create_commit`` takes a per-client or
# per-call choice. (Its only per-call way around Xet is to pass files as open binary buffers, which
# it treats as a fallback with a warning on every call.) So the switch stays global, but it is held
# only while a job that needs LFS is uploading, counted so that concurrent jobs (the Space's and the
# bot's) share it, and restored when the last such job ends. Another job uploading meanwhile uses
# LFS too, which the Hub also accepts.
_lfs_jobs = 0
_lfs_lock = threading.Lock()
_xet_setting_before: bool = False


@contextmanager
def transfer_mode(api: HfApi, repo_id: str) -> Iterator[str]:
    """Upload through Xet while uploading to ``repo_id`` when the server offers it, else through LFS;
    yields "xet" or "lfs". huggingface_hub uploads through Xet whenever ``hf_xet`` is installed, with
    no fallback of its own, so every upload to a Hub-compatible server without Xet would fail."""
    global _lfs_jobs, _xet_setting_before
    import importlib.util

    from huggingface_hub import constants

    with _lfs_lock:  # set by the user, not by a job of ours still uploading
        switched_off = constants.HF_HUB_DISABLE_XET and _lfs_jobs == 0
    if switched_off or importlib.util.find_spec("hf_xet") is None:
        yield "lfs"
        return
    if offers_xet(api, repo_id):
        yield "xet"
        return
    log.info("%s offers no Xet upload for %s; uploading with LFS", api.endpoint, repo_id)
    with _lfs_lock:
        if _lfs_jobs == 0:
            _xet_setting_before = constants.HF_HUB_DISABLE_XET
        _lfs_jobs += 1
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield "lfs"
    finally:
        with _lfs_lock:
            _lfs_jobs -= 1
            if _lfs_jobs == 0:
                constants.HF_HUB_DISABLE_XET = _xet_setting_before
