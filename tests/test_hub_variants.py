"""merge-bot against Hub behaviours our default test server does not show.

Each ``HubServer.variant`` flag (see ``hub_server.VARIANTS`` for what each one does and where the
real Hub, or huggingface_hub, documents it) switches on one way in which the real Hub, or another
Hub-compatible server, legitimately answers differently. The main flows run against each: ``run``
from a sharded base plus an idempotent re-run, ``--pr`` plus a re-run, and the pre-flight refusal of
a gated base. Dedicated tests cover what needs its own set-up: canonical (case-insensitive) repo ids,
fine-grained tokens, rate limits, and the self-service bot's policy and refresh decisions.

A failing test here is a place where merge-bot depends on a detail of our test server.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from huggingface_hub import CommitOperationAdd, HfApi, constants

from factory import assert_matches_peft, build_base
from hub_fixtures import (ALICE, BOB, adapter_files, error_line, folder_files, our_commits, push_payload,
                          run_cli, webhook_payload)

BOT = "hf_variantbotTESTtoken0000000000000000006"
FINN = "hf_finnTESTfinegrained000000000000000007"  # fine-grained, read only
WREN = "hf_wrenTESTfinegrained000000000000000008"  # fine-grained, may write
SECRET = "variant-secret"
REQUESTS = "variant-bot/requests"

# What each matrix entry switches on. "hub_like" is the real Hub's own download/upload shape.
MATRIX = {
    "cdn_redirect": {"cdn_redirect"},
    "cdn_no_linked_size": {"cdn_redirect", "no_linked_size"},
    "resolve_cache_redirect": {"resolve_cache_redirect"},
    "paginate": {"paginate"},
    "no_file_metadata": {"no_file_metadata"},
    "omit_gated_private": {"omit_gated_private"},
    "no_error_codes": {"no_error_codes"},
    "hub_like": {"cdn_redirect", "resolve_cache_redirect", "lfs_upload_elsewhere", "paginate", "lowercase_headers",
                 "gzip_text", "weak_etag"},
}


def our_prs(hub, repo_id: str) -> list[dict]:
    return [d for d in hub.discussions(repo_id) if d["is_pull_request"] and d["title"].startswith("Merge ")]


def assert_exercised(hub, flags: set[str], before: int, cdn_before: int, repo: str) -> None:
    """The variant's path was really taken (a passing flow means something)."""
    log, cdn = hub.requests_log[before:], hub.cdn_log[cdn_before:]
    if "cdn_redirect" in flags:
        assert any(m == "GET" and p.startswith("/cdn-lfs/") for m, p in cdn), cdn
    if "lfs_upload_elsewhere" in flags:
        assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in cdn), cdn
    if "resolve_cache_redirect" in flags:
        assert any(p.startswith("/api/resolve-cache/") for _, p in log)
    if "paginate" in flags:
        assert len([p for _, p in log if p.startswith(f"/api/models/{repo}/tree/")]) > 1


@pytest.fixture(scope="module")
def seeded(hub, models, cache_dir):
    """A sharded base with an adapter on it, and a gated base (nobody granted) with an adapter on it."""
    sharded = build_base(cache_dir, "llama", shard="30KB")
    assert (sharded / "model.safetensors.index.json").exists()
    hub.create_repo("bob/var-sharded-llama", owner_token=BOB, files=folder_files(sharded))
    hub.create_repo("alice/var-sharded-lora", owner_token=ALICE,
                    files=adapter_files(models["adapter"], "bob/var-sharded-llama"))
    hub.create_repo("bob/var-gated-llama", owner_token=BOB, gated="manual", files=folder_files(models["base"]))
    hub.create_repo("alice/var-lora-on-gated", owner_token=ALICE,
                    files=adapter_files(models["adapter"], "bob/var-gated-llama"))
    return models


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty download cache, so every file really travels through the variant's download path."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def variant(hub, request, fresh_cache):
    name = request.param
    hub.variant = set(MATRIX.get(name, {name}))
    yield name
    hub.variant = set()
    hub.reset_faults()
    assert not hub.server_errors, hub.server_errors


# --------------------------------------------------------------------------------------------
# The main flows, once per variant
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(MATRIX), indirect=True)
def test_run_from_a_sharded_base_then_rerun(hub, seeded, variant, capsys, tmp_path):
    target = f"alice/v-{variant.replace('_', '-')}-run"
    before, cdn_before = len(hub.requests_log), len(hub.cdn_log)
    code, out, err = run_cli(capsys, "run", "alice/var-sharded-lora", "--repo", target)
    assert code == 0, err
    assert f"published {target} in one commit" in out
    assert_exercised(hub, hub.variant, before, cdn_before, "bob/var-sharded-llama")
    files = hub.files(target)
    report = json.loads(files["merge_report.json"])
    assert report["base"]["repo_id"] == "bob/var-sharded-llama"
    assert report["base"]["revision"] == hub.head("bob/var-sharded-llama")
    merged = tmp_path / "merged"
    merged.mkdir()
    for name, data in files.items():
        (merged / name).write_bytes(data)
    assert_matches_peft(merged, seeded["base"], seeded["adapter"])

    code, out, err = run_cli(capsys, "run", "alice/var-sharded-lora", "--repo", target)
    assert code == 0, err
    assert "already holds this exact merge; nothing to do" in out
    assert len(our_commits(hub, target)) == 1


@pytest.mark.parametrize("variant", list(MATRIX), indirect=True)
def test_pr_then_rerun_finds_the_open_pr(hub, seeded, variant, capsys):
    target = f"bob/v-{variant.replace('_', '-')}-pr"
    hub.create_repo(target, owner_token=BOB, files={"README.md": b"# bob's model\n", "notes.txt": b"x"})
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", target, "--pr")
    assert code == 0, err
    assert f"opened pull request on {target}" in out
    (pr,) = our_prs(hub, target)
    # Newer PRs by the same account push ours off the first page where a server pages discussions.
    for n in (1, 2):
        HfApi(token=ALICE).create_commit(target, [CommitOperationAdd(f"fix{n}.txt", b"y")],
                                         commit_message=f"Fix notes {n}", create_pr=True)
    before = len(hub.requests_log)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", target, "--pr")
    assert code == 0, err
    assert "already proposes this exact merge" in out and f"/discussions/{pr['num']}" in out
    if "paginate" in hub.variant:
        assert len([p for _, p in hub.requests_log[before:] if p == f"/api/models/{target}/discussions"]) > 1
    assert len(our_prs(hub, target)) == 1 and len([d for d in hub.discussions(target) if d["is_pull_request"]]) == 3
    assert "model.safetensors" not in hub.files(target)


@pytest.mark.parametrize("variant", list(MATRIX), indirect=True)
def test_gated_base_without_access_is_refused_in_preflight(hub, seeded, variant, capsys):
    target = f"alice/v-{variant.replace('_', '-')}-gated"
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/var-lora-on-gated", "--repo", target)
    assert code == 4, err
    line = error_line(err)
    assert "bob/var-gated-llama is gated" in line and "request access" in line
    assert not hub.repo_exists(target)
    # metadata (HEAD, for sizes a listing left out) may be asked; no weights are downloaded
    assert not [r for r in hub.requests_log[before:] if r[0] == "GET" and r[1].endswith(".safetensors")]


# --------------------------------------------------------------------------------------------
# Canonical repo ids (the real Hub matches repo ids case-insensitively)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["canonical_names"], indirect=True)
def test_target_spelled_differently_is_the_same_repo(hub, seeded, variant, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-canon-target")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "Alice/V-Canon-Target")
    assert code == 0 and "nothing to do" in out, err
    assert len(our_commits(hub, "alice/v-canon-target")) == 1


@pytest.mark.parametrize("variant", ["canonical_names"], indirect=True)
def test_adapter_spelled_differently_is_the_same_merge(hub, seeded, variant, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-canon-run")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "Alice/Tiny-Lora", "--repo", "alice/v-canon-run")
    assert code == 0, err
    assert "nothing to do" in out
    assert len(our_commits(hub, "alice/v-canon-run")) == 1


@pytest.mark.parametrize("variant", ["canonical_names"], indirect=True)
def test_pr_for_an_adapter_spelled_differently_is_not_opened_twice(hub, seeded, variant, capsys):
    hub.create_repo("bob/v-canon-pr", owner_token=BOB, files={"README.md": b"# bob's model\n"})
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "bob/v-canon-pr", "--pr")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "ALICE/tiny-lora", "--repo", "bob/v-canon-pr", "--pr")
    assert code == 0, err
    assert "already proposes this exact merge" in out
    assert len(our_prs(hub, "bob/v-canon-pr")) == 1


# --------------------------------------------------------------------------------------------
# Fine-grained tokens (whoami: accessToken.role == "fineGrained")
# --------------------------------------------------------------------------------------------
def test_fine_grained_token_that_may_write_publishes(hub, seeded, capsys, fresh_cache):
    hub.add_user("wren", WREN, fine_grained=True)
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "wren/v-fine-merged", token=WREN)
    assert code == 0, err
    assert len(our_commits(hub, "wren/v-fine-merged")) == 1


def test_fine_grained_read_only_token_is_refused_before_any_download(hub, seeded, capsys, fresh_cache):
    hub.add_user("finn", FINN, role="read", fine_grained=True)
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "finn/v-fine-merged", token=FINN)
    assert code == 11 and "read-only" in error_line(err), err
    assert not [r for r in hub.requests_log[before:] if "/resolve/" in r[1]]
    assert not hub.repo_exists("finn/v-fine-merged")


# --------------------------------------------------------------------------------------------
# Rate limits: the real Hub answers 429 with RateLimit: "api";r=0;t=<seconds> over 5-minute windows
# --------------------------------------------------------------------------------------------
def test_rate_limit_on_the_token_check_is_waited_out(hub, seeded, capsys, fresh_cache):
    hub.rate_limit(1, r"^/api/whoami")
    code, out, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-rate-whoami")
    hub.reset_faults()
    assert code == 0, err
    assert len(our_commits(hub, "alice/v-rate-whoami")) == 1


def test_rate_limit_on_reads_is_waited_out_as_the_hub_asks(hub, seeded, capsys, monkeypatch, tmp_path, fresh_cache):
    import bot.transport

    # merge-bot's own schedule, scaled 1/10 (real: 1+2+4 s); the Hub asks for 2 s (scaled: 20 s; real windows
    # are 5 minutes, so t can be up to 300 s).
    monkeypatch.setattr(bot.transport, "READ_RETRY_WAITS", (0.1, 0.2, 0.4))
    hub.rate_limit(2, r"^/api/models/")
    code, _, err = run_cli(capsys, "merge", "alice/tiny-lora", "--out", str(tmp_path / "m"), "--quiet")
    hub.reset_faults()
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# --private when the Hub's model_info leaves out optional fields
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["omit_gated_private"], indirect=True)
def test_private_publish_when_model_info_omits_private(hub, seeded, variant, capsys):
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-omit-private", "--private")
    assert code == 0, err
    assert len(our_commits(hub, "alice/v-omit-private")) == 1


# --------------------------------------------------------------------------------------------
# The self-service bot's decisions (triage: policy; refresh: did the adapter change?)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bot_account(hub, seeded):
    hub.add_user("variant-bot", BOT)
    hub.create_repo(REQUESTS, owner_token=BOT, files={"README.md": b"# Ask for merges here\n"})
    hub.grant("bob/var-gated-llama", "variant-bot")  # the bot may read it; it must still not republish it
    return "variant-bot"


def make_service(tmp_path, **config):
    from bot.service.config import ServiceConfig
    from bot.service.worker import Service

    return Service(ServiceConfig(token=BOT, webhook_secret=SECRET, requests_repo=REQUESTS,
                                 db_path=tmp_path / "q.sqlite", **config))


def payload(hub, num: int, comment_id: str, who: str, text: str, repo: str = REQUESTS) -> dict:
    return webhook_payload(hub, num, comment_id, who, text, scope="discussion.comment", repo=repo)


def ask(hub, client, who: str, token: str, text: str) -> int:
    api = HfApi(token=token)
    discussion = api.create_discussion(REQUESTS, title="merge request", description=text)
    first = api.get_discussion_details(REQUESTS, discussion.num).events[0]
    body = payload(hub, discussion.num, first.id, who, text)
    response = client.post("/webhooks/merge", content=json.dumps(body),
                           headers={"X-Webhook-Secret": SECRET, "Content-Type": "application/json"})
    assert response.status_code == 202 and response.json()["status"] == "queued", response.text
    return discussion.num


def triaged(hub, tmp_path, request: str, **config):
    """Alice asks the bot for ``request``; the one job after triage, and the replies it queued."""
    from bot.service.webhook import create_app

    service = make_service(tmp_path, **config)
    ask(hub, TestClient(create_app(service)), "alice", ALICE, request)
    service.triage_once()
    (job,) = service.queue.jobs()
    return job, [r.body for r in service.queue.pending_replies()]


@pytest.mark.parametrize("variant", ["omit_gated_private"], indirect=True)
def test_bot_refuses_a_gated_base_when_model_info_omits_gated(hub, bot_account, variant, tmp_path):
    job, replies = triaged(hub, tmp_path, "/merge alice/var-lora-on-gated")
    assert job.state == "failed" and "gated or private" in (job.error or ""), replies


@pytest.mark.parametrize("variant", ["no_file_metadata"], indirect=True)
def test_bot_size_limit_holds_when_siblings_have_no_size(hub, bot_account, variant, tmp_path):
    job, replies = triaged(hub, tmp_path, "/merge alice/tiny-lora --dtype float16", max_output_gb=1e-9)
    assert job.state == "failed" and "limit" in (job.error or ""), replies


@pytest.mark.parametrize("variant", ["no_file_metadata"], indirect=True)
def test_bot_refresh_sees_new_adapter_weights_when_siblings_have_no_blob_ids(hub, bot_account, seeded, variant,
                                                                             tmp_path):
    from safetensors.torch import load_file, save_file

    from bot.service.webhook import create_app

    hub.create_repo("alice/v-evolving-lora", owner_token=ALICE,
                    files=adapter_files(seeded["adapter"], "bob/tiny-llama"))
    service = make_service(tmp_path)
    client = TestClient(create_app(service))
    ask(hub, client, "alice", ALICE, "/merge alice/v-evolving-lora")
    for _ in range(5):
        if not (service.triage_once() + int(service.work_once())):
            break
    assert service.queue.jobs()[0].state == "done"

    weights = load_file(seeded["adapter"] / "adapter_model.safetensors")
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in weights.items()}, path)
    head = hub.commit_files("alice/v-evolving-lora", {"adapter_model.safetensors": path.read_bytes()},
                            message="retrain")
    update = push_payload(hub, "alice/v-evolving-lora", head)
    response = client.post("/webhooks/merge", content=json.dumps(update),
                           headers={"X-Webhook-Secret": SECRET, "Content-Type": "application/json"})
    assert response.json()["status"] == "queued"
    service.triage_once()
    refresh = [j for j in service.queue.jobs() if "|refresh:" in j.key]
    assert len(refresh) == 1
    # New weights: the refresh must be accepted for a merge, not closed as "unchanged".
    assert refresh[0].state not in ("done", "failed"), refresh[0].state


# --------------------------------------------------------------------------------------------
# Found in review: fine-grained scopes, unknown visibility, older fingerprints, outages at the token check
# --------------------------------------------------------------------------------------------
class _WhoamiOnly:
    """An HfApi stand-in whose whoami answers as the Hub does for a fine-grained token."""

    token = "hf_fine"

    def __init__(self, global_permissions: list[str], scoped: list[dict]):
        self._me = {"name": "finn", "orgs": [], "auth": {"accessToken": {
            "role": "fineGrained", "fineGrained": {"global": global_permissions, "scoped": scoped}}}}

    def whoami(self, cache: bool = False) -> dict:
        return self._me


@pytest.mark.parametrize("global_permissions, scoped, target, pr, allowed", [
    # "Open pull requests on external repos" (global discussion.write) is enough for --pr
    (["discussion.write"], [{"entity": {"type": "user", "name": "finn"}, "permissions": ["repo.content.read"]}],
     "bob/model", True, True),
    # ... but not for publishing a new repo
    (["discussion.write"], [], "finn/new", False, False),
    # repo.write scoped to exactly one repo: that repo, not its neighbours
    ([], [{"entity": {"type": "model", "name": "finn/merged"}, "permissions": ["repo.write"]}], "finn/merged", False,
     True),
    ([], [{"entity": {"type": "model", "name": "finn/merged"}, "permissions": ["repo.write"]}], "finn/other", False,
     False),
    # repo.write on an org entity
    ([], [{"entity": {"type": "org", "name": "team"}, "permissions": ["repo.write"]}], "team/merged", False, True),
    # nothing that writes at all
    ([], [{"entity": {"type": "user", "name": "finn"}, "permissions": ["repo.content.read"]}], "bob/model", True,
     False),
])
def test_fine_grained_scopes_decide_what_may_be_published(global_permissions, scoped, target, pr, allowed):
    from bot.errors import AccessDeniedError, AuthenticationError
    from bot.hub import PublishTarget, check_can_publish

    api = _WhoamiOnly(global_permissions, scoped)
    if allowed:
        check_can_publish(api, PublishTarget(target, pr=pr))
    else:
        with pytest.raises((AccessDeniedError, AuthenticationError)):
            check_can_publish(api, PublishTarget(target, pr=pr))


def test_private_into_an_existing_repo_of_unknown_visibility_is_refused(hub, seeded, capsys):
    from huggingface_hub import HfApi

    HfApi(token=ALICE).create_repo("alice/v-unknown-visibility", private=False)  # public and empty
    hub.variant = {"omit_gated_private"}
    try:
        code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-unknown-visibility", "--private")
    finally:
        hub.variant = set()
    assert code == 12 and "does not say whether it is private" in error_line(err)
    assert not our_commits(hub, "alice/v-unknown-visibility")


def test_a_merge_published_under_the_typed_spelling_is_still_found(hub, seeded, capsys):
    """Before repo ids were pinned as the Hub spells them, the fingerprint used the name as typed."""
    from bot.jobs import PublishJob
    from bot.preflight import preflight

    hub.variant = {"canonical_names"}
    try:
        hub.create_repo("alice/v-typed-lora", owner_token=ALICE, files=adapter_files(seeded["adapter"], "BOB/Tiny-Llama"))
        code, _, err = run_cli(capsys, "run", "alice/v-typed-lora", "--repo", "alice/v-typed-merged")
        assert code == 0, err
        job = PublishJob(adapter="alice/v-typed-lora", repo="alice/v-typed-merged")
        spec = job.merge_spec(Path("unused"), ALICE)
        new, old = preflight(spec, check_disk=False).fingerprints(spec)
        report = json.loads(hub.files("alice/v-typed-merged")["merge_report.json"])
        assert report["fingerprint"] == new != old
        report["fingerprint"] = old  # as an earlier merge-bot wrote it
        hub.commit_files("alice/v-typed-merged", {"merge_report.json": json.dumps(report).encode()})
        code, out, err = run_cli(capsys, "run", "alice/v-typed-lora", "--repo", "alice/v-typed-merged")
    finally:
        hub.variant = set()
    assert code == 0 and "nothing to do" in out, err


@pytest.mark.parametrize("outage", ["rate-limited for an hour", "no connection"])
def test_an_outage_at_the_token_check_is_hub_unavailable(hub, seeded, capsys, monkeypatch, outage):
    import bot.transport

    monkeypatch.setattr(bot.transport, "READ_RETRY_WAITS", (0.01,))
    if outage == "no connection":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    else:
        hub.rate_limit(3600, r"^/api/whoami")
    try:
        code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-outage")
    finally:
        hub.reset_faults()
    assert code == 13 and "retry later" in error_line(err)


def test_upload_falls_back_to_lfs_on_a_server_without_xet(hub, seeded, capsys, monkeypatch):
    """huggingface_hub uploads through Xet whenever hf_xet is installed (no fallback of its own); this
    server, like many Hub-compatible ones, offers no Xet write token, so merge-bot must upload with LFS;
    only while the job uploads: huggingface_hub's switch is global, and it is given back afterwards."""
    import importlib.util

    if importlib.util.find_spec("hf_xet") is None:  # huggingface_hub installs it on every platform CI uses
        pytest.fail("hf_xet is not installed, so this test cannot show the fallback")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # what a user's machine has by default
    before = len(hub.requests_log)
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", "alice/v-no-xet")
    assert code == 0, err
    assert len(our_commits(hub, "alice/v-no-xet")) == 1
    log = hub.requests_log[before:]
    assert any(path.endswith("/xet-write-token/main") for _, path in log)
    assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in log)  # the shards went by LFS
    assert constants.HF_HUB_DISABLE_XET is False  # the job's transfer mode ended with the job
