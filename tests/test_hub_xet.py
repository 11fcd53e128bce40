"""The test Hub speaking Xet, and merge-bot publishing over it; and the server's bandwidth pacing.

Since huggingface_hub 1.20 the client uploads through Xet whenever ``hf_xet`` is installed, so on
the real Hub every byte goes through Xet. The rest of the suite forces LFS (HF_HUB_DISABLE_XET=1);
here the ``xet_hub`` fixture (conftest.py) turns Xet on in the client and in the server, whose CAS is
a ``local://`` folder served by the ``hf_xet`` wheel itself. Each test checks that Xet was really used
(token routes asked, no LFS batch call, the committed files stored in the CAS), not only that the
flow passed.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download

from hub_fixtures import run_cli
from factory import assert_matches_peft
from hub_fixtures import ALICE, BOB
from hub_server import HubServer

LFS_BATCH = ".git/info/lfs/objects/batch"


def paths_since(hub, before: int) -> list[tuple[str, str]]:
    return hub.requests_log[before:]


def assert_uploaded_with_xet(hub, before: int, repo_id: str) -> None:
    log = paths_since(hub, before)
    assert any(p.startswith(f"/api/models/{repo_id}/xet-write-token/") for _, p in log), log
    assert not any(p.endswith(LFS_BATCH) for _, p in log), "an LFS batch upload was made"


def assert_downloaded_with_xet(hub, before: int, repo_id: str) -> None:
    """Weights came through hf_xet: a read token was asked and /resolve never sent a weight's bytes."""
    log = paths_since(hub, before)
    assert any(p.startswith(f"/api/models/{repo_id}/xet-read-token/") for _, p in log), log
    assert not [p for m, p in log if m == "GET" and "/resolve/" in p and p.endswith(".safetensors")], log


@pytest.fixture
def weights_folder(models, tmp_path) -> Path:
    """The tiny base model plus 1.5 MB of incompressible weights, so Xet has chunks to dedupe."""
    folder = tmp_path / "upload"
    folder.mkdir()
    for p in Path(models["base"]).iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    (folder / "extra.safetensors").write_bytes(os.urandom(1_500_000))
    return folder


def test_upload_folder_and_download_over_xet_then_the_same_bytes_add_almost_nothing(xet_hub, weights_folder,
                                                                                      tmp_path):
    hub, api = xet_hub, HfApi(token=ALICE)
    api.create_repo("alice/xet-folder")
    lfs_bytes = sum(p.stat().st_size for p in weights_folder.iterdir() if p.suffix == ".safetensors")
    before, cas_before = len(hub.requests_log), hub.cas_bytes()
    api.upload_folder(repo_id="alice/xet-folder", folder_path=weights_folder, commit_message="Upload weights")
    added = hub.cas_bytes() - cas_before
    assert_uploaded_with_xet(hub, before, "alice/xet-folder")
    stored = hub.xet_files("alice/xet-folder")
    assert set(stored) == {p.name for p in weights_folder.iterdir() if p.suffix == ".safetensors"}
    assert added >= lfs_bytes  # the bytes really went into the CAS folder
    assert [c["title"] for c in hub.commits("alice/xet-folder")][0] == "Upload weights"

    # Back through hf_xet into an empty cache: byte-identical, and the server agrees on every file.
    before = len(hub.requests_log)
    local = Path(snapshot_download("alice/xet-folder", cache_dir=tmp_path / "dl", token=ALICE))
    assert_downloaded_with_xet(hub, before, "alice/xet-folder")
    for p in weights_folder.iterdir():
        assert (local / p.name).read_bytes() == p.read_bytes(), p.name
        assert hub.files("alice/xet-folder")[p.name] == p.read_bytes(), p.name

    # The same bytes again (another repo, create_commit): Xet finds every chunk already stored.
    api.create_repo("alice/xet-again")
    before, cas_before = len(hub.requests_log), hub.cas_bytes()
    api.create_commit("alice/xet-again", [CommitOperationAdd(p.name, p) for p in weights_folder.iterdir()],
                      commit_message="Same weights")
    again = hub.cas_bytes() - cas_before
    assert_uploaded_with_xet(hub, before, "alice/xet-again")
    assert hub.xet_files("alice/xet-again") == stored  # same content, same Xet file hashes
    assert again < 64 * 1024, f"a repeated upload added {again} bytes to the CAS (first: {added})"
    assert hub.files("alice/xet-again") == hub.files("alice/xet-folder") | {
        ".gitattributes": hub.files("alice/xet-again")[".gitattributes"]}


def test_an_lfs_file_is_served_through_xet_too(xet_hub, models, tmp_path):
    """Files stored before Xet (seeded, or uploaded with LFS) are Xet files on the real Hub: /resolve names
    their Xet hash, and hf_hub_download gets them through hf_xet."""
    hub = xet_hub
    before = len(hub.requests_log)
    path = hf_hub_download("bob/tiny-llama", "model.safetensors", cache_dir=tmp_path / "dl", token=ALICE)
    assert Path(path).read_bytes() == (Path(models["base"]) / "model.safetensors").read_bytes()
    assert_downloaded_with_xet(hub, before, "bob/tiny-llama")
    assert "model.safetensors" in hub.xet_files("bob/tiny-llama")


def test_write_token_needs_write_access_except_for_a_pull_request(xet_hub):
    hub = xet_hub
    base = f"{hub.url}/api/models/bob/tiny-llama"

    def status(url: str, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, {**json.loads(response.read()), **dict(response.headers)}
        except urllib.error.HTTPError as err:
            return err.code, {}

    code, answer = status(f"{base}/xet-write-token/main", BOB)
    assert code == 200 and answer["casUrl"].startswith("local:///") and answer["exp"] > time.time()
    assert answer["X-Xet-Cas-Url"] == answer["casUrl"] and answer["X-Xet-Access-Token"] == answer["accessToken"]
    assert int(answer["X-Xet-Token-Expiration"]) == answer["exp"]
    assert status(f"{base}/xet-write-token/main", ALICE)[0] == 403
    assert status(f"{base}/xet-write-token/main?create_pr=1", ALICE)[0] == 200
    assert status(f"{base}/xet-write-token/main", None)[0] == 401
    assert status(f"{base}/xet-read-token/main", None)[0] == 200  # a public repo
    hub.disable_xet()
    assert status(f"{base}/xet-write-token/main", BOB)[0] == 404  # what a server without Xet answers


def test_bot_run_publishes_over_xet_and_a_rerun_finds_it(xet_hub, models, capsys, tmp_path):
    hub = xet_hub
    before = len(hub.requests_log)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/xet-run")
    assert code == 0, err
    assert "published alice/xet-run in one commit" in out
    assert constants.HF_HUB_DISABLE_XET is False  # upload_with_xet_only_if_offered found Xet offered
    assert_uploaded_with_xet(hub, before, "alice/xet-run")
    assert "model.safetensors" in hub.xet_files("alice/xet-run")
    assert len([c for c in hub.commits("alice/xet-run") if c["title"].startswith("Merge ")]) == 1
    local = snapshot_download("alice/xet-run", cache_dir=tmp_path / "dl", token=ALICE)
    assert_matches_peft(Path(local), models["base"], models["adapter"])

    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/xet-run")
    assert code == 0 and "already holds this exact merge; nothing to do" in out, err


def test_bot_pr_over_xet_on_someone_elses_repo(xet_hub, models, capsys):
    """A PR author without write access gets no write token for main (403), asks with create_pr=1."""
    hub = xet_hub
    hub.create_repo("bob/xet-pr-target", owner_token=BOB, files={"README.md": b"# bob's model\n"})
    before = len(hub.requests_log)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/xet-pr-target", "--pr")
    assert code == 0, err
    assert "opened pull request on bob/xet-pr-target" in out
    assert constants.HF_HUB_DISABLE_XET is False
    assert_uploaded_with_xet(hub, before, "bob/xet-pr-target")
    (pr,) = [d for d in hub.discussions("bob/xet-pr-target") if d["is_pull_request"]]
    assert "model.safetensors" in hub.xet_files("bob/xet-pr-target", pr["git_reference"])
    assert "model.safetensors" not in hub.files("bob/xet-pr-target")


def test_merge_then_push_over_xet_and_a_second_push_uploads_almost_nothing(xet_hub, models, capsys, tmp_path):
    hub = xet_hub
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(out), "--quiet")
    assert code == 0, err
    weights = (out / "model.safetensors").read_bytes()
    before, cas_before = len(hub.requests_log), hub.cas_bytes()
    code, text, err = run_cli(capsys, "push", str(out), "--repo", "alice/xet-pushed")
    assert code == 0 and "published alice/xet-pushed" in text, err
    first = hub.cas_bytes() - cas_before
    assert_uploaded_with_xet(hub, before, "alice/xet-pushed")
    assert hub.files("alice/xet-pushed")["model.safetensors"] == weights
    assert first > 0  # less than the file: chunks it shares with the base (resolved through Xet) dedupe

    # The same folder to another repo: its shards are already in the CAS.
    before, cas_before = len(hub.requests_log), hub.cas_bytes()
    code, text, err = run_cli(capsys, "push", str(out), "--repo", "alice/xet-pushed-again")
    assert code == 0, err
    assert_uploaded_with_xet(hub, before, "alice/xet-pushed-again")
    assert hub.cas_bytes() - cas_before < 64 * 1024
    assert hub.xet_files("alice/xet-pushed-again")["model.safetensors"] == \
        hub.xet_files("alice/xet-pushed")["model.safetensors"]


# --------------------------------------------------------------------------------------------
# Bandwidth pacing (its own server: the session Hub stays unpaced)
# --------------------------------------------------------------------------------------------
RATE = 1_000_000  # bytes/s each way


@pytest.fixture(scope="module")
def paced():
    with HubServer(bandwidth=RATE) as server:
        server.add_user("alice", ALICE)
        server.create_repo("alice/blob", files={"a.safetensors": os.urandom(800_000),
                                                "b.safetensors": os.urandom(400_000),
                                                "c.safetensors": os.urandom(400_000)})
        yield server


def _get(server, path: str) -> bytes:
    with urllib.request.urlopen(f"{server.url}/alice/blob/resolve/main/{path}") as response:
        return response.read()


def test_a_paced_download_takes_size_over_bandwidth(paced):
    start = time.monotonic()
    data = _get(paced, "a.safetensors")
    took = time.monotonic() - start
    assert data == paced.files("alice/blob")["a.safetensors"]
    assert 0.75 <= took <= 1.3, took  # 800 kB at 1 MB/s


def test_concurrent_downloads_share_one_link(paced):
    took: list[float] = []
    start = time.monotonic()
    threads = [threading.Thread(target=lambda p=p: (_get(paced, p), took.append(time.monotonic() - start)))
               for p in ("b.safetensors", "c.safetensors")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(took) == 2 and 0.75 <= max(took) <= 1.3, took  # 2 x 400 kB on one 1 MB/s link


def test_a_paced_upload_takes_size_over_bandwidth(paced):
    body = os.urandom(400_000)
    request = urllib.request.Request(f"{paced.url}/api/validate-yaml", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    start = time.monotonic()
    try:
        urllib.request.urlopen(request).read()
    except urllib.error.HTTPError:
        pass  # not JSON: refused, but only once the whole body was read
    took = time.monotonic() - start
    assert 0.35 <= took <= 0.8, took  # 400 kB at 1 MB/s
