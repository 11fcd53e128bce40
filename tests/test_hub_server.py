"""The test Hub server, exercised through the real huggingface_hub client."""

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# The conftest normally sets these before anything imports huggingface_hub; when this file runs
# on its own (--noconftest) they are set here. Offline mode and Xet are forced per module below.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    BadRequestError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubServer  # noqa: E402

ALICE, BOB = "alice-token", "bob-token"
BIG = b"\x01" * 64 + bytes(range(256)) * 8  # small, but .safetensors => LFS


@pytest.fixture(scope="module", autouse=True)
def _online():
    """huggingface_hub reads these at import time; a conftest may have imported it offline already."""
    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    yield
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


@pytest.fixture(scope="module")
def server():
    hub = HubServer()
    hub.add_user("alice", ALICE, orgs=("acme",))
    hub.add_user("bob", BOB)
    hub.start()
    yield hub
    hub.stop()
    assert not hub.server_errors, hub.server_errors


@pytest.fixture(autouse=True)
def _no_faults(server):
    yield
    server.reset_faults()


@pytest.fixture
def alice(server):
    return HfApi(endpoint=server.url, token=ALICE)


@pytest.fixture
def bob(server):
    return HfApi(endpoint=server.url, token=BOB)


def _seed(server, repo_id, **kwargs):
    files = kwargs.pop("files", {"config.json": b'{"a": 1}', "model.safetensors": BIG, "sub/tok.txt": b"hi"})
    return server.create_repo(repo_id, files=files, **kwargs)


def test_whoami(server, alice):
    me = alice.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["acme"]
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=server.url, token="nope").whoami()
    assert err.value.response.status_code == 401


def test_create_repo(server, alice):
    url = alice.create_repo("alice/new-model")
    assert url.repo_id == "alice/new-model" and server.repo_exists("alice/new-model")
    assert alice.model_info("alice/new-model").sha == server.head("alice/new-model")
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo("alice/new-model")
    assert err.value.response.status_code == 409
    assert alice.create_repo("alice/new-model", exist_ok=True).repo_id == "alice/new-model"
    assert alice.create_repo("acme/org-model", private=True).repo_id == "acme/org-model"
    assert alice.create_repo("data", repo_type="dataset").repo_id == "alice/data"
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo("bob/not-yours")
    assert err.value.response.status_code == 403 and "namespace" in str(err.value)


def test_lfs_and_regular_files_in_one_commit(server, alice, tmp_path):
    alice.create_repo("alice/upload")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(BIG)
    (folder / "big.dat").write_bytes(os.urandom(10 * 1024 * 1024 + 1))  # over 10 MiB => LFS
    (folder / "config.json").write_text('{"x": 1}')
    (folder / "sub" / "notes.txt").write_text("notes")
    before = len(server.commits("alice/upload"))
    info = alice.upload_folder(repo_id="alice/upload", folder_path=folder, commit_message="add weights")
    assert len(server.commits("alice/upload")) == before + 1
    assert info.oid == server.head("alice/upload")
    files = server.files("alice/upload")
    assert files["model.safetensors"] == BIG and files["sub/notes.txt"] == b"notes"
    assert files["big.dat"] == (folder / "big.dat").read_bytes()
    uploads = [p for m, p in server.requests_log if m == "PUT" and p.startswith("/lfs-upload/")]
    assert len(uploads) == 2  # only the LFS files went through the LFS upload

    # the same content again: the client sees unchanged oids and makes no commit
    alice.upload_folder(repo_id="alice/upload", folder_path=folder, commit_message="again")
    assert len(server.commits("alice/upload")) == before + 1

    model = alice.model_info("alice/upload", files_metadata=True)
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes["model.safetensors"] == len(BIG) and sizes["config.json"] == 8
    lfs = {s.rfilename: s.lfs for s in model.siblings}
    assert lfs["big.dat"].size == 10 * 1024 * 1024 + 1 and lfs["config.json"] is None


def test_metadata_listing(server, alice):
    sha = _seed(server, "alice/listing", card_data=None, files={
        "README.md": b"---\nlicense: mit\ntags: [merge]\n---\n# hi\n",
        "model.safetensors": BIG, "sub/deep/a.txt": b"a", "sub/b.txt": b"b"})
    info = alice.model_info("alice/listing")
    assert info.sha == sha and info.card_data.license == "mit" and info.tags == ["merge"]
    assert info.gated is False and info.private is False
    assert sorted(alice.list_repo_files("alice/listing")) == sorted(server.files("alice/listing"))
    top = {e.path: type(e).__name__ for e in alice.list_repo_tree("alice/listing")}
    assert top == {"README.md": "RepoFile", "model.safetensors": "RepoFile", "sub": "RepoFolder"}
    deep = [e.path for e in alice.list_repo_tree("alice/listing", "sub", recursive=True, expand=True)]
    assert deep == ["sub/deep", "sub/b.txt", "sub/deep/a.txt"]
    weights = next(e for e in alice.list_repo_tree("alice/listing", expand=True) if e.path == "model.safetensors")
    assert weights.lfs.size == len(BIG) and weights.last_commit.oid == sha
    server.commit_files("alice/listing", {"x.txt": b"x"}, message="second")
    commits = alice.list_repo_commits("alice/listing")
    assert [c.title for c in commits] == ["second", "initial commit"] and commits[1].commit_id == sha
    refs = alice.list_repo_refs("alice/listing", include_pull_requests=True)
    assert [b.name for b in refs.branches] == ["main"] and refs.pull_requests == []
    assert alice.model_info("alice/listing", revision=sha).sha == sha


def test_downloads(server, alice, tmp_path):
    sha = _seed(server, "alice/dl")
    server.commit_files("alice/dl", {"config.json": b'{"a": 2}'})
    path = hf_hub_download("alice/dl", "model.safetensors", endpoint=server.url, token=ALICE, cache_dir=tmp_path)
    assert Path(path).read_bytes() == BIG
    old = hf_hub_download("alice/dl", "config.json", revision=sha, endpoint=server.url, cache_dir=tmp_path)
    assert Path(old).read_bytes() == b'{"a": 1}'
    folder = snapshot_download("alice/dl", revision=sha, allow_patterns=["*.json", "sub/*"],
                               endpoint=server.url, cache_dir=tmp_path / "snap")
    got = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    assert got == ["config.json", "sub/tok.txt"] and sha in folder
    assert alice.file_exists("alice/dl", "sub/tok.txt") and not alice.file_exists("alice/dl", "nope.txt")


def test_not_found_errors(server, alice, tmp_path):
    _seed(server, "alice/errs")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/missing")
    with pytest.raises(RevisionNotFoundError):
        alice.model_info("alice/errs", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/errs", "config.json", revision="nope", endpoint=server.url, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/errs", "nope.json", endpoint=server.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "config.json", endpoint=server.url, cache_dir=tmp_path)
    assert not alice.repo_exists("alice/missing") and alice.repo_exists("alice/errs")


def test_private_repo_is_hidden(server, alice, bob, tmp_path):
    _seed(server, "acme/secret", private=True)
    assert alice.model_info("acme/secret").private is True  # org member
    for api in (bob, HfApi(endpoint=server.url, token=False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("acme/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/secret", "config.json", endpoint=server.url, token=BOB, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/secret", endpoint=server.url, token=False, cache_dir=tmp_path)


def test_gated_repo(server, bob, tmp_path):
    _seed(server, "alice/gated", gated="manual")
    assert bob.model_info("alice/gated").gated == "manual"
    assert "config.json" in bob.list_repo_files("alice/gated")
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download("alice/gated", "config.json", endpoint=server.url, token=BOB, cache_dir=tmp_path)
    assert err.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "config.json", endpoint=server.url, token=False, cache_dir=tmp_path)
    server.grant("alice/gated", "bob")
    path = hf_hub_download("alice/gated", "config.json", endpoint=server.url, token=BOB, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b'{"a": 1}'


def test_pull_request_flow(server, alice, bob):
    main = _seed(server, "alice/pr")
    info = bob.create_commit("alice/pr", [CommitOperationAdd("model.safetensors", BIG[::-1]),
                                          CommitOperationDelete("sub/tok.txt")],
                             commit_message="Better weights", commit_description="please merge", create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1" and info.pr_url.endswith("/discussions/1")
    assert server.head("alice/pr") == main  # main unchanged
    assert server.files("alice/pr", "refs/pr/1")["model.safetensors"] == BIG[::-1]
    assert server.commits("alice/pr", "refs/pr/1")[0]["parents"] == [main]
    [listed] = list(alice.get_repo_discussions("alice/pr"))
    assert listed.is_pull_request and listed.author == "bob" and listed.status == "open"
    assert list(alice.get_repo_discussions("alice/pr", discussion_type="discussion")) == []

    bob.upload_file(path_or_fileobj=b"more", path_in_repo="extra.txt", repo_id="alice/pr",
                    revision="refs/pr/1", commit_message="Add extra")
    assert server.files("alice/pr", "refs/pr/1")["extra.txt"] == b"more"
    alice.comment_discussion("alice/pr", 1, "Looks good")
    details = alice.get_discussion_details("alice/pr", 1)
    assert details.target_branch == "refs/heads/main" and details.conflicting_files == []
    assert [e.type for e in details.events] == ["comment", "commit", "commit", "comment"]
    assert details.events[0].content == "please merge" and "extra.txt" in details.diff
    alice.change_discussion_status("alice/pr", 1, "closed", comment="Closing")
    d = server.discussions("alice/pr")[0]
    assert d["status"] == "closed" and d["comments"] == ["please merge", "Looks good", "Closing"]
    assert server.head("alice/pr") == main

    pr = bob.create_pull_request("alice/pr", "Empty PR")
    assert pr.num == 2 and pr.status == "draft" and server.head("alice/pr", "refs/pr/2") == main
    bob.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id="alice/pr", revision="refs/pr/2",
                    commit_message="First change")
    assert server.discussions("alice/pr")[1]["status"] == "open"  # pushing turns a draft into an open PR


def test_write_permissions(server, bob):
    _seed(server, "alice/locked")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/locked")
    assert err.value.response.status_code == 403


def test_fault_on_commit_is_not_retried_and_changes_nothing(server, alice):
    _seed(server, "alice/faulty")
    before = server.commits("alice/faulty")
    server.fail_next("POST", r"/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as err:
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/faulty")
    assert err.value.response.status_code == 500
    assert server.commits("alice/faulty") == before
    assert sum(1 for m, p in server.requests_log if m == "POST" and p == "/api/models/alice/faulty/commit/main") == 1
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/faulty")  # next one works
    assert server.files("alice/faulty")["x.txt"] == b"x"


def test_commit_conflicts_and_missing_lfs(server, alice):
    base = _seed(server, "alice/atomic")
    server.commit_files("alice/atomic", {"other.txt": b"someone else"})
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_commit("alice/atomic", [CommitOperationAdd("a.txt", b"a")], commit_message="stale",
                            parent_commit=base)
    assert err.value.response.status_code == 412
    assert len(server.commits("alice/atomic")) == 2


def test_commit_referencing_unknown_lfs_oid(server, alice):
    _seed(server, "alice/ghost")
    op = CommitOperationAdd("ghost.safetensors", b"never uploaded")
    op._upload_mode, op._is_uploaded = "lfs", True  # pretend preupload + upload already happened
    op._should_ignore = False
    ok = CommitOperationAdd("ok.txt", b"ok")
    ok._upload_mode, ok._should_ignore = "regular", False
    before = server.commits("alice/ghost")
    from huggingface_hub._commit_api import _send_commit

    with pytest.raises(BadRequestError) as err:
        _send_commit(operations=[op, ok], files_to_copy={},
                     commit_message="ghost", commit_description="", repo_type="model", repo_id="alice/ghost",
                     headers=alice._build_hf_headers(), revision="main", endpoint=server.url)
    assert "LFS" in str(err.value)
    assert server.commits("alice/ghost") == before


def test_transient_5xx_on_preupload_is_retried_by_the_client(server, alice):
    """http_backoff retries 408/429/5xx on preupload, LFS batch/upload/verify and paginated GETs (~1 s)."""
    _seed(server, "alice/flaky")
    server.fail_next("POST", r"/preupload/", status=503)
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/flaky")
    assert sum(1 for m, p in server.requests_log if "/alice/flaky/preupload/" in p) == 2
    assert server.files("alice/flaky")["x.txt"] == b"x"


def test_resolve_headers_and_range(server):
    sha = _seed(server, "alice/raw")
    url = f"{server.url}/alice/raw/resolve/main/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["X-Repo-Commit"] == sha and r.headers["X-Linked-Size"] == str(len(BIG))
        assert r.headers["Content-Length"] == str(len(BIG)) and r.read() == b""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as r:
        assert r.status == 206 and r.read() == BIG[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(BIG)}"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server.url}/alice/raw/resolve/main/nope.txt")
    assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "EntryNotFound"
    assert err.value.headers["X-Repo-Commit"] == sha
