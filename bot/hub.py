"""Publishing a merged folder to the Hub: a new repo or a pull request, always in one commit.

The steps are safe to repeat. Before every attempt the target is checked for the job's
provenance fingerprint (in ``merge_report.json`` on the branch, or in an open pull
request's description), so a retry after an ambiguous failure, or a second run of the
same job, never makes a second commit or a duplicate PR. Transient Hub errors (5xx, 429,
dropped connections) are retried with backoff; permanent ones become one-line errors
with their own exit codes (see ``bot.errors``); both through ``bot.transport``, as is the
one client (``api``) every function here is handed.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bot.card import CARD_NAME, with_repo_id
from bot.errors import (AccessDeniedError, AuthenticationError, HubUnavailableError, MergeBotError, PublishError,
                        RepoConflictError, SourceNotFoundError, UsageError)
from bot.provenance import has_marker, marker_line
from bot.report import REPORT_NAME, ReportStamp
from bot.spec import parse_source_ref
from bot.transport import (http_status as _status, hub_failure, hub_write_errors, is_network_error, is_transient,
                           read_with_retries, transfer_mode, write_with_retries)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

_EMPTY_REPO_FILES = {".gitattributes"}
TITLE_PREFIX = "Merge "  # every commit and PR title merge-bot writes starts with this


@dataclass(frozen=True)
class PublishTarget:
    repo_id: str
    pr: bool = False
    private: bool = False

    def __post_init__(self) -> None:
        if self.pr and self.private:
            raise UsageError("--private applies to new repos; a pull request keeps the target repo's visibility")


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    action: str  # created | committed | pr-opened | unchanged | pr-exists | pr-closed
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
            "pr-closed": f"the owner of {self.repo_id} closed the pull request that proposed this exact merge, so it "
                         f"is not opened again: {self.url}",
        }[self.action]


def parse_repo_id(text: str) -> str:
    problem = UsageError(f"target repo {str(text)[:100]!r} must be a Hub repo id like owner/name (no @revision)")
    try:
        ref = parse_source_ref(text, what="target repo", allow_local=False)
    except MergeBotError:
        raise problem from None
    if ref.revision or "/" not in ref.name:
        raise problem
    return ref.name


@dataclass(frozen=True)
class Account:
    name: str
    namespaces: frozenset[str]  # lower-cased: the user and orgs where it may create repos
    repos: frozenset[str] = frozenset()  # lower-cased repo ids a fine-grained token may write (beyond namespaces)
    can_open_prs: bool = True


def account_of(api: HfApi) -> Account:
    """Who the API's token is, and where it may write; refuses missing, invalid or read-only tokens."""
    if not api.token:
        raise AuthenticationError("publishing needs a Hub token with write access: pass --token, set HF_TOKEN, "
                                  "or run `hf auth login`")
    try:
        with hub_write_errors("checking the token", "your account"):
            me = read_with_retries(lambda: api.whoami(cache=True))
    except PublishError as e:  # the Hub kept failing or cannot be reached: nothing about the token is known
        cause = hub_failure(e)
        if cause is not None and (is_transient(cause) or is_network_error(cause)):
            why = f"HTTP {_status(cause)}" if _status(cause) else f"no connection: {cause.__class__.__name__}"
            raise HubUnavailableError(f"could not check the token: the Hub is unavailable ({why}); nothing was "
                                      f"committed; retry later") from e
        raise
    access = (me.get("auth") or {}).get("accessToken") or {}
    orgs = {o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)
            and str(o.get("roleInOrg", "write")).lower() not in ("read", "contributor")}
    account = Account(me["name"], frozenset(n.lower() for n in {me["name"], *orgs} if isinstance(n, str)))
    if access.get("role") == "fineGrained":
        account = _fine_grained_account(me["name"], access.get("fineGrained") or {}, account.namespaces)
    if access.get("role") == "read" or not (account.namespaces or account.repos or account.can_open_prs):
        raise AuthenticationError("the token is read-only; publishing needs a token with write access "
                                  "(create one at https://huggingface.co/settings/tokens)")
    return account


def _fine_grained_account(name: str, fine: dict, own: frozenset[str]) -> Account:
    """What a fine-grained token may do: ``repo.write`` globally (every namespace of the account) or
    scoped to a user/org or to single repos; ``discussion.write`` (or any write) to open pull requests."""
    granted = set(fine.get("global") or [])
    namespaces: set[str] = set(own) if "repo.write" in granted else set()
    repos: set[str] = set()
    for entry in fine.get("scoped") or []:
        entity = entry.get("entity") if isinstance(entry, dict) else None
        if not isinstance(entity, dict) or not isinstance(entity.get("name"), str):
            continue
        permissions = set(entry.get("permissions") or [])
        granted |= permissions & {"discussion.write"}
        if "repo.write" in permissions:
            granted.add("repo.write")
            (namespaces if entity.get("type") in ("user", "org") else repos).add(entity["name"].lower())
    return Account(name, frozenset(namespaces), frozenset(repos), can_open_prs=bool(granted & {"repo.write",
                                                                                              "discussion.write"}))


def check_can_publish(api: HfApi, target: PublishTarget) -> Account:
    """The token works and may create or write ``target`` (with --pr: may open pull requests)."""
    account = account_of(api)
    owner = target.repo_id.split("/")[0]
    if target.pr and not account.can_open_prs:
        raise AuthenticationError("the token may not open pull requests (it lacks discussion.write); use a token "
                                  "with write access")
    if not target.pr and not (account.namespaces or account.repos):
        raise AuthenticationError("the token is read-only for repos (it may only open pull requests: pass --pr to "
                                  "propose the merge on an existing repo, or use a token with repo.write)")
    if not target.pr and owner.lower() not in account.namespaces and target.repo_id.lower() not in account.repos:
        raise AccessDeniedError(f"the token's account {account.name} cannot write to namespace {owner}; publish "
                                f"under {account.name}/... or an org where you have write access, or pass --pr "
                                f"to propose the merge on an existing repo")
    return account


def _remote_report(api: HfApi, repo_id: str, revision: str | None) -> dict:
    """The merge_report.json at ``revision``, or {} when there is none or it is not a JSON object."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, REPORT_NAME, revision=revision)
    except EntryNotFoundError:
        return {}
    try:
        report = json.loads(Path(path).read_text())
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def main_report(api: HfApi, repo_id: str, state: "RepoState | None") -> ReportStamp:
    """The stamp of the merge report on the target's main branch (empty when there is none)."""
    if state is None or REPORT_NAME not in state.files:
        return ReportStamp()
    return ReportStamp.from_json(_remote_report(api, repo_id, state.sha))


@dataclass(frozen=True)
class RepoState:
    sha: str | None
    files: tuple[str, ...]
    private: bool | None  # None: the server did not say

    @property
    def is_empty(self) -> bool:
        return not set(self.files) - _EMPTY_REPO_FILES


def repo_state(api: HfApi, repo_id: str) -> RepoState | None:
    """Head of main, its files and visibility; None when the repo does not exist (or is hidden from us)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = api.model_info(repo_id)
    except HfHubHTTPError as e:  # RepositoryNotFoundError, or a plain 404 from a server that sends no error code
        if _status(e) == 404:
            return None
        raise
    private = info.private if isinstance(info.private, bool) else None
    return RepoState(info.sha, tuple(s.rfilename for s in (info.siblings or [])), private)


def check_target(target: PublishTarget, state: RepoState | None, *, holds_this_merge: bool = False,
                 just_created: bool = False) -> None:
    """Refusals that depend on the target repo, known before anything is merged or uploaded.

    ``holds_this_merge``: main already has this exact merge (same fingerprint), published
    without verification; a verified run may commit over it, since only the report changes.
    ``just_created``: this run created the repo (private when asked), so a server that does not
    report visibility is trusted for it; otherwise --private needs the repo known to be private.
    """
    if target.pr and state is None:
        raise SourceNotFoundError(f"{target.repo_id} does not exist (or your token cannot see it), so no pull "
                                  f"request can be opened; drop --pr to create it")
    if not target.pr and state is not None:
        if not state.is_empty and not holds_this_merge:
            raise RepoConflictError(f"{target.repo_id} already exists and holds other files; pass --pr to propose "
                                    f"this merge as a pull request, or choose another --repo")
        if target.private and state.private is False:
            raise RepoConflictError(f"{target.repo_id} already exists and is public, so --private cannot be honoured; "
                                    f"make it private in its settings first, or choose another --repo")
        if target.private and state.private is None and not just_created:
            raise RepoConflictError(f"{target.repo_id} already exists and the Hub does not say whether it is private, "
                                    f"so --private cannot be honoured; choose a new --repo")


def survey_target(api: HfApi, target: PublishTarget, fps: tuple[str, ...], *, author: str | None = None,
                  verified: bool = False, just_created: bool = False) -> tuple[PublishResult | None, RepoState | None]:
    """What ``target`` holds of this merge, read once: the result when it is already there (on main, or
    with --pr in a pull request opened by ``author``), else None and the repo's state, after the
    refusals of ``check_target``.

    ``fps``: the merge's fingerprint, then older fingerprints the same merge may carry. With
    ``verified``, a merge on main counts only if it was published with its verification numbers:
    a ``--verify`` run after a plain one adds them (over the same merge) instead of doing nothing.
    """
    from huggingface_hub import DiscussionComment

    state = repo_state(api, target.repo_id)
    report = main_report(api, target.repo_id, state)
    on_main = report.fingerprint in fps
    if on_main and (report.verified or not verified):
        return PublishResult(target.repo_id, "unchanged", f"{api.endpoint}/{target.repo_id}", state.sha), state
    if target.pr and state is not None:
        # Only our own account's PRs count: anyone can open a PR carrying the marker. A PR the owner
        # closed is an answer too: it is reported, not opened again (a scheduled batch would nag).
        for discussion in api.get_repo_discussions(target.repo_id, author=author, discussion_type="pull_request"):
            if discussion.status not in ("open", "draft", "closed") or not discussion.title.startswith(TITLE_PREFIX):
                continue  # merged PRs put the fingerprint on main (checked above); others never carry ours
            if author is not None and str(discussion.author).lower() != author.lower():
                continue  # a server that ignores the author filter must not make someone else's PR count
            details = api.get_discussion_details(target.repo_id, discussion.num)
            # The opening post: the first comment with text (status changes, commits and renames have none).
            opening = next((e.content for e in details.events if isinstance(e, DiscussionComment) and e.content),
                           None)
            if opening is not None and any(has_marker(opening, one) for one in fps):
                return PublishResult(target.repo_id, "pr-closed" if discussion.status == "closed" else "pr-exists",
                                     details.url), state
    check_target(target, state, holds_this_merge=on_main, just_created=just_created)
    return None, state


# Files that decide what transformers (or PEFT) loads. A pull request that replaces a model
# deletes the ones the merge does not write, so old shards or adapter files cannot win.
_LOADABLE = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf",
             "*.safetensors.index.json", "*.bin.index.json", "adapter_config.json", "config.json")


def _is_loadable(name: str) -> bool:
    from bot.sources import is_side_file

    return "/" not in name and (is_side_file(name) or any(fnmatch.fnmatch(name, p) for p in _LOADABLE))


def _operations(folder: Path, repo_id: str, replaced: tuple[str, ...] = (), uploaded: tuple = ()):
    """Add every file of ``folder`` (``uploaded``: operations pre-uploaded already, whose files may be gone);
    delete the loadable files of ``replaced`` that the commit does not write."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = sorted(uploaded, key=lambda op: op.path_in_repo)
    names = {op.path_in_repo for op in ops}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file() or rel.startswith(".") or "/." in rel or rel in names:
            continue  # no hidden files (.cache, editor files) and never what a symlink points at
        names.add(rel)
        if rel == CARD_NAME:
            ops.append(CommitOperationAdd(rel, with_repo_id(path.read_text(encoding="utf-8"), repo_id).encode()))
        else:
            ops.append(CommitOperationAdd(rel, str(path)))
    ops += [CommitOperationDelete(name) for name in sorted(replaced) if name not in names and _is_loadable(name)]
    return ops


# Files pre-uploading at once. One upload stream rarely fills a link (each file is hashed, announced,
# sent and verified in sequence), so several run, as create_commit's own workers do; each is a
# shard on disk until it is done, so with auto shards (a 16th of the model) this is a quarter of it.
# Measured on the 1.1B pipeline benchmark (200 MB/s): 2 at a time with 8 shards 23.2 s, 4 with 16 21.6 s.
UPLOADS_AT_ONCE = 4


class Publication:
    """One commit being prepared on a target: files are pre-uploaded as they are ready (``upload``, in
    background threads, ``UPLOADS_AT_ONCE`` at a time), then everything lands in one ``commit``.

    Made by ``open_publication``, which surveys the target and creates it when new. Nothing shows
    on the target before the commit except, for a new repo, the empty repo itself: a run that
    fails keeps it (empty), so a rerun finds the blobs it pre-uploaded and does not send them again.
    """

    def __init__(self, api, target: PublishTarget, fps: tuple[str, ...], *, author: str, verified: bool,
                 created: bool, on_uploaded: Callable[[int], None] | None = None):
        import queue
        import threading

        self.api, self.target, self.fps = api, target, fps
        self.author, self.verified, self.created = author, verified, created
        self.on_uploaded = on_uploaded
        self.uploaded: list = []  # CommitOperationAdd, pre-uploaded
        self.uploaded_bytes = 0
        self._queue: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(UPLOADS_AT_ONCE)  # files handed over and not yet uploaded: bounded disk
        self._count = threading.Lock()
        self._error: BaseException | None = None
        self._abandoned = False  # the job failed: files still queued are not sent
        self._closing = ExitStack()  # the job's transfer mode holds until the publication is closed
        self.transfer = self._closing.enter_context(transfer_mode(api, target.repo_id))  # "xet" or "lfs"
        self._threads = [threading.Thread(target=self._run, name=f"merge-bot-upload-{i}", daemon=True)
                         for i in range(UPLOADS_AT_ONCE)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        from huggingface_hub import CommitOperationAdd

        while True:
            path = self._queue.get()
            if path is None:
                return
            try:
                if self._error is None and not self._abandoned:
                    op = CommitOperationAdd(path.name, str(path))
                    write_with_retries(lambda: self.api.preupload_lfs_files(
                        self.target.repo_id, additions=[op], create_pr=self.target.pr, free_memory=True),
                        doing=f"uploading {path.name} to {self.target.repo_id}", repo_id=self.target.repo_id)
                    if op._is_uploaded:  # an LFS/Xet blob now; a small regular file stays and is committed
                        with self._count:
                            self.uploaded.append(op)
                            self.uploaded_bytes += op.upload_info.size
                        path.unlink(missing_ok=True)
                        if self.on_uploaded:
                            self.on_uploaded(op.upload_info.size)
            except BaseException as e:  # raised in the caller's thread by the next upload() or commit()
                self._error = e
            finally:
                self._slot.release()

    def _raise_error(self) -> None:
        if self._error is not None:  # sticky: files queued behind a failure are not sent either
            raise self._error

    def upload(self, path: Path) -> None:
        """Pre-upload ``path`` (a file named as in the repo) in the background, then delete it; waits while
        ``UPLOADS_AT_ONCE`` earlier files are still uploading."""
        self._raise_error()
        self._slot.acquire()
        self._queue.put(Path(path))

    def wait_uploads(self) -> None:
        for _ in range(UPLOADS_AT_ONCE):
            self._slot.acquire()
        for _ in range(UPLOADS_AT_ONCE):
            self._slot.release()
        self._raise_error()

    def close(self, *, abandon: bool = False) -> None:
        """Stop the upload threads once the files handed over are sent (``abandon``: files not yet
        started are dropped, as when the job failed); waits 30 s at most in all."""
        import time

        if abandon:
            self._abandoned = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + 30
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._closing.close()

    def __enter__(self) -> "Publication":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abandon=exc_type is not None)

    def commit(self, folder: Path, *, title: str, description: str) -> PublishResult:
        """One commit (or pull request) of the pre-uploaded files and every other file of ``folder``;
        each attempt re-checks the target, so a retry never commits twice."""
        self.wait_uploads()
        target, api = self.target, self.api
        description = f"{description}\n\n{marker_line(self.fps[0])}\n"

        def attempt() -> PublishResult:
            existing, state = survey_target(api, target, self.fps, author=self.author, verified=self.verified,
                                            just_created=self.created)
            if existing is not None:
                return existing
            if target.pr:
                info = api.create_commit(target.repo_id, _operations(folder, target.repo_id, state.files,
                                                                     tuple(self.uploaded)),
                                         commit_message=title, commit_description=description, create_pr=True,
                                         parent_commit=state.sha)
                return PublishResult(target.repo_id, "pr-opened", info.pr_url or info.commit_url, info.oid)
            info = api.create_commit(target.repo_id, _operations(folder, target.repo_id, (), tuple(self.uploaded)),
                                     commit_message=title, commit_description=description,
                                     parent_commit=state.sha if state else None)
            action = "created" if self.created else "committed"
            return PublishResult(target.repo_id, action, f"{api.endpoint}/{target.repo_id}", info.oid)

        return write_with_retries(attempt, doing=f"publishing to {target.repo_id}", repo_id=target.repo_id)


def open_publication(api: HfApi, target: PublishTarget, fps: tuple[str, ...], *, author: str, verified: bool = False,
                     on_uploaded: Callable[[int], None] | None = None) -> PublishResult | Publication:
    """The result when ``target`` already has this merge; else a ``Publication`` on it (a new repo is
    created now: files can only be pre-uploaded into a repo that exists)."""
    def attempt():
        existing, state = survey_target(api, target, fps, author=author, verified=verified)
        if existing is not None:
            return existing, False
        created = False
        if state is None and not target.pr:
            # private=None lets an org's default visibility apply; a 409 (someone else was faster) is re-checked.
            api.create_repo(target.repo_id, private=True if target.private else None, exist_ok=True)
            check_target(PublishTarget(target.repo_id, private=target.private), repo_state(api, target.repo_id),
                         just_created=True)
            created = True
        return None, created

    existing, created = write_with_retries(attempt, doing=f"preparing {target.repo_id}", repo_id=target.repo_id)
    if existing is not None:
        return existing
    return Publication(api, target, fps, author=author, verified=verified, created=created, on_uploaded=on_uploaded)


def publish_folder(folder: Path, target: PublishTarget, *, api: HfApi, title: str, description: str, fingerprint: str,
                   verified: bool = False, aliases: tuple[str, ...] = ()) -> PublishResult:
    """Create ``target`` and commit ``folder`` to it through the job's client ``api``, or open one PR;
    idempotent by ``fingerprint``.

    ``verified``: the folder's report carries verification numbers (see ``survey_target``);
    ``aliases``: older fingerprints of the same merge (see ``Preflight.fingerprints``).
    """
    account = check_can_publish(api, target)
    opened = open_publication(api, target, (fingerprint, *aliases), author=account.name, verified=verified)
    if isinstance(opened, PublishResult):
        return opened
    with opened:
        return opened.commit(Path(folder), title=title, description=description)
