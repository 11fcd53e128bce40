"""Publishing a merged folder to the Hub: a new repo or a pull request, always in one commit.

The steps are safe to repeat. Before every attempt the target is checked for the job's
provenance fingerprint (in ``merge_report.json`` on the branch, or in an open pull
request's description), so a retry after an ambiguous failure, or a second run of the
same job, never makes a second commit or a duplicate PR. Transient Hub errors (5xx, 429,
dropped connections) are retried with backoff; permanent ones become one-line errors
with their own exit codes (see ``bot.errors``).
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bot.card import CARD_NAME, with_repo_id
from bot.errors import (AccessDeniedError, AuthenticationError, MergeBotError, PublishError, RepoConflictError,
                        SourceNotFoundError, UsageError)
from bot.provenance import has_marker, marker_line
from bot.sources import is_network_error
from bot.spec import parse_source_ref

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)  # seconds between attempts on transient errors
_EMPTY_REPO_FILES = {".gitattributes"}
TITLE_PREFIX = "Merge "  # every commit and PR title merge-bot writes starts with this


@dataclass(frozen=True)
class PublishTarget:
    repo_id: str
    pr: bool = False
    private: bool = False


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    action: str  # created | committed | pr-opened | unchanged | pr-exists
    url: str  # the repo, commit or pull request page
    commit_sha: str | None = None

    @property
    def changed(self) -> bool:
        return self.action in ("created", "committed", "pr-opened")

    def describe(self) -> str:
        return {
            "created": f"published {self.repo_id} in one commit: {self.url}",
            "committed": f"published into empty repo {self.repo_id} in one commit: {self.url}",
            "pr-opened": f"opened pull request on {self.repo_id}: {self.url}",
            "unchanged": f"{self.repo_id} already holds this exact merge; nothing to do: {self.url}",
            "pr-exists": f"an open pull request on {self.repo_id} already proposes this exact merge: {self.url}",
        }[self.action]


def parse_repo_id(text: str) -> str:
    ref = parse_source_ref(text, what="target repo") if text and not Path(text).exists() else None
    if ref is None or ref.revision or "/" not in ref.name:
        raise UsageError(f"target repo {text!r} must be a Hub repo id like owner/name (no @revision)")
    return ref.name


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def is_transient(error: BaseException) -> bool:
    status = _status(error)
    return (status is not None and (status >= 500 or status == 429)) or (status is None and is_network_error(error))


def _server_message(error: BaseException) -> str:
    message = getattr(error, "server_message", None) or ""
    return " ".join(str(message).split())[:300]


def translate_write_error(error: BaseException, doing: str, repo_id: str) -> MergeBotError:
    """A permanent Hub failure while writing, as a one-line error with its own exit code."""
    status, said = _status(error), _server_message(error)
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
    return PublishError(f"the Hub failed while {doing} (HTTP {status}){detail}; nothing was committed; retry later")


def hub_failure(error: BaseException) -> BaseException | None:
    """The Hub HTTP or connection error behind ``error`` (huggingface_hub wraps LFS failures), if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, HfHubHTTPError) or is_network_error(error):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


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


def with_retries(attempt: Callable[[], PublishResult], *, doing: str, repo_id: str,
                 waits: tuple[float, ...] | None = None) -> PublishResult:
    """Run ``attempt`` until it succeeds, retrying transient failures; each attempt re-checks the target."""
    waits = RETRY_WAITS if waits is None else waits
    for wait in (*waits, None):
        with hub_write_errors(doing, repo_id):
            try:
                return attempt()
            except MergeBotError:
                raise
            except Exception as e:
                cause = hub_failure(e)
                if wait is None or cause is None or not (is_transient(cause) or _status(cause) == 412):
                    raise
                log.warning("transient Hub error while %s (%s); retrying in %.1fs",
                            doing, _status(cause) or cause.__class__.__name__, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def account_of(api) -> tuple[str, set[str]]:
    """(user name, namespaces it can write to) for the API's token; 401 → AuthenticationError."""
    if not api.token:
        raise AuthenticationError("publishing needs a Hub token with write access: pass --token, set HF_TOKEN, "
                                  "or run `hf auth login`")
    with hub_write_errors("checking the token", "your account"):
        me = api.whoami()
    orgs = {o.get("name") for o in me.get("orgs", []) if isinstance(o, dict)}
    return me["name"], {me["name"], *orgs}


def check_can_publish(api, target: PublishTarget) -> str:
    """The token works, and a new repo would be in one of its namespaces (anyone may open a PR)."""
    user, namespaces = account_of(api)
    owner = target.repo_id.split("/")[0]
    if not target.pr and owner not in namespaces:
        raise AccessDeniedError(f"the token's account {user} cannot write to namespace {owner}; publish under "
                                f"{user}/... or an org you belong to")
    return user


def _remote_fingerprint(api, repo_id: str, revision: str) -> str | None:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, REPORT_NAME, revision=revision)
    except EntryNotFoundError:
        return None
    try:
        return json.loads(Path(path).read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        return None


def _repo_state(api, repo_id: str) -> tuple[str, list[str]] | None:
    """(head SHA of main, files on main), or None when the repo does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(repo_id)
    except RepositoryNotFoundError:
        return None
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def find_existing(api, target: PublishTarget, fp: str) -> PublishResult | None:
    """This exact merge already on main, or (with --pr) in an open pull request."""
    state = _repo_state(api, target.repo_id)
    if state is None:
        return None
    sha, files = state
    if REPORT_NAME in files and _remote_fingerprint(api, target.repo_id, sha) == fp:
        return PublishResult(target.repo_id, "unchanged", f"{api.endpoint}/{target.repo_id}", sha)
    if target.pr:
        for discussion in api.get_repo_discussions(target.repo_id, discussion_type="pull_request",
                                                   discussion_status="open"):
            if not discussion.title.startswith(TITLE_PREFIX):
                continue  # only merge-bot's own titles can carry the marker; skip the details call
            details = api.get_discussion_details(target.repo_id, discussion.num)
            opening = next((e for e in details.events if getattr(e, "content", None)), None)
            if opening is not None and has_marker(opening.content, fp):
                return PublishResult(target.repo_id, "pr-exists", details.url)
    return None


def _operations(folder: Path, repo_id: str):
    from huggingface_hub import CommitOperationAdd

    ops = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden files (.cache from local_dir downloads, editor files) are not part of the model
        if rel == CARD_NAME:
            ops.append(CommitOperationAdd(rel, with_repo_id(path.read_text(encoding="utf-8"), repo_id).encode()))
        else:
            ops.append(CommitOperationAdd(rel, str(path)))
    return ops


def read_folder_fingerprint(folder: Path) -> str:
    report = Path(folder) / REPORT_NAME
    if not report.is_file():
        raise UsageError(f"{folder} has no {REPORT_NAME}; publish a folder written by `python -m bot merge`")
    try:
        fp = json.loads(report.read_text()).get("fingerprint")
    except ValueError as e:
        raise UsageError(f"{report} is not valid JSON; re-run the merge") from e
    if not fp:
        raise UsageError(f"{report} has no fingerprint; re-run the merge with this merge-bot version")
    return fp


def publish_folder(folder: Path, target: PublishTarget, *, title: str, description: str, fingerprint: str,
                   token: str | None, endpoint: str | None = None) -> PublishResult:
    """Create ``target`` and commit ``folder`` to it, or open one PR; idempotent by ``fingerprint``."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    check_can_publish(api, target)
    folder = Path(folder)
    description = f"{description}\n\n{marker_line(fingerprint)}\n"

    def attempt() -> PublishResult:
        existing = find_existing(api, target, fingerprint)
        if existing is not None:
            return existing
        state = _repo_state(api, target.repo_id)
        if target.pr:
            if state is None:
                raise SourceNotFoundError(f"{target.repo_id} does not exist, so no pull request can be opened; "
                                          f"drop --pr to create it")
            info = api.create_commit(target.repo_id, _operations(folder, target.repo_id), commit_message=title,
                                     commit_description=description, create_pr=True, parent_commit=state[0])
            return PublishResult(target.repo_id, "pr-opened", info.pr_url or info.commit_url, info.oid)
        action = "committed"
        if state is None:
            api.create_repo(target.repo_id, private=target.private, exist_ok=True)
            state, action = _repo_state(api, target.repo_id), "created"
        elif set(state[1]) - _EMPTY_REPO_FILES:
            raise RepoConflictError(f"{target.repo_id} already exists and holds other files; pass --pr to propose "
                                    f"this merge as a pull request, or choose another --repo")
        info = api.create_commit(target.repo_id, _operations(folder, target.repo_id), commit_message=title,
                                 commit_description=description, parent_commit=state[0] if state else None)
        return PublishResult(target.repo_id, action, f"{api.endpoint}/{target.repo_id}", info.oid)

    return with_retries(attempt, doing=f"publishing to {target.repo_id}", repo_id=target.repo_id)
