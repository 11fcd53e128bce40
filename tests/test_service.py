"""Self-service: real-shaped Hub webhook payloads in, replies in the discussion out.

Most tests drive the service's duties one step at a time (deterministic); one runs
``python -m bot serve`` as a child process and kills it with SIGKILL mid-job.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from huggingface_hub import HfApi

from bot.errors import UsageError
from bot.service.config import ServiceConfig, parse_requests_repo
from bot.service.commands import CommandError, parse_command
from bot.service.webhook import create_app
from bot.service.worker import Service
from hub_fixtures import ALICE, BOB, CAROL, push_payload, webhook_payload

ROOT = Path(__file__).resolve().parents[1]
BOT = "hf_mergebotTESTtoken000000000000000000005"
SECRET = "s3cret-webhook"
REQUESTS = "merge-bot/requests"


@pytest.fixture(scope="module")
def bot_account(hub, models):
    hub.add_user("merge-bot", BOT)
    if not hub.repo_exists(REQUESTS):  # other modules import this fixture; one requests repo per session
        hub.create_repo(REQUESTS, owner_token=BOT, files={"README.md": b"# Ask for merges here\n"})
    return "merge-bot"


@pytest.fixture
def service(hub, bot_account, tmp_path):
    config = ServiceConfig(token=BOT, webhook_secret=SECRET, requests_repo=REQUESTS, db_path=tmp_path / "q.sqlite",
                           max_queued_per_user=2, max_queue=3)
    return Service(config)


def ask(hub, who: str, token: str, text: str) -> tuple[int, dict]:
    """Open a discussion on the requests repo as ``who``; return (num, a real-shaped webhook payload)."""
    api = HfApi(token=token)
    discussion = api.create_discussion(REQUESTS, title="merge request", description=text)
    first = api.get_discussion_details(REQUESTS, discussion.num).events[0]
    return discussion.num, payload(hub, discussion.num, first.id, who, text, scope="discussion")


def payload(hub, num: int, comment_id: str, who: str, text: str, *, scope: str = "discussion.comment",
            repo: str = REQUESTS) -> dict:
    return webhook_payload(hub, num, comment_id, who, text, scope=scope, repo=repo)


def post(client: TestClient, body, secret: str = SECRET):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/webhooks/merge", content=data, headers={"X-Webhook-Secret": secret,
                                                                  "Content-Type": "application/json"})


def drain(service: Service) -> None:
    """Run the background duties until nothing is left to do."""
    for _ in range(10):
        busy = service.triage_once() + service.send_replies_once() + int(service.work_once())
        if not busy:
            return


def bot_comments(hub, num: int) -> list[str]:
    return [c for c in hub.discussions(REQUESTS)[num - 1]["comments"] if "merge-bot-reply:" in c]


def test_good_request_is_merged_and_answered_with_the_link(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "Hi! Could you merge this?\n\n/merge alice/tiny-lora --dtype bfloat16\n\nThanks")
    started = time.perf_counter()
    response = post(client, body)
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert time.perf_counter() - started < 1.0
    drain(service)
    replies = bot_comments(hub, num)
    assert len(replies) == 2
    assert replies[0].startswith("Accepted") and "Queue position: 1" in replies[0]
    target = "merge-bot/alice-tiny-lora-merged-bfloat16"
    assert replies[1].startswith(f"Done: {hub.url}/{target}")
    files = hub.files(target)
    card = files["README.md"].decode()
    assert "Requested by:** [@alice]" in card and "the work of [@alice]" in card
    assert json.loads(files["merge_report.json"])["requested_by"] == "alice"
    job = service.queue.jobs()[0]
    assert (job.state, job.requester, job.result_url) == ("done", "alice", f"{hub.url}/{target}")


def test_wrong_secret_is_401_and_queues_nothing(hub, service):
    client = TestClient(create_app(service))
    _, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora")
    assert post(client, body, secret="wrong").status_code == 401
    assert post(client, body, secret="").status_code == 401
    assert service.queue.jobs() == []


@pytest.mark.parametrize("body", [b"not json", b"{}", json.dumps({"event": {"action": "create"}}),
                                  json.dumps({"event": {"action": "explode", "scope": "discussion"}})])
def test_malformed_payloads_are_4xx(hub, service, body):
    client = TestClient(create_app(service))
    response = post(client, body)
    assert 400 <= response.status_code < 500
    assert service.queue.jobs() == []


def test_bad_command_gets_a_helpful_reply(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype int3")
    assert post(client, body).json()["status"] == "rejected"
    drain(service)
    (reply,) = bot_comments(hub, num)
    assert "--dtype must be one of" in reply and "/merge owner/adapter[@revision]" in reply
    assert service.queue.jobs() == []


def test_refusals_found_by_preflight_are_explained(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/prompt-tuning")
    post(client, body)
    num2, body2 = ask(hub, "alice", ALICE, "/merge alice/lora-on-gated")
    post(client, body2)
    drain(service)
    assert "PROMPT_TUNING" in bot_comments(hub, num)[0] and "cannot do this merge" in bot_comments(hub, num)[0]
    assert "gated or private" in bot_comments(hub, num2)[0] or "is gated" in bot_comments(hub, num2)[0]
    assert {j.state for j in service.queue.jobs()} == {"failed"}


def test_duplicates_make_one_job_and_everyone_gets_the_link(hub, service):
    client = TestClient(create_app(service))
    num1, body1 = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float16")
    num2, body2 = ask(hub, "carol", CAROL, "/merge Alice/Tiny-Lora --dtype float16")
    assert post(client, body1).json()["status"] == "queued"
    assert post(client, body1).json()["detail"].startswith("already handled")  # Hub redelivery
    assert post(client, body2).json()["status"] == "duplicate"
    drain(service)
    assert len(service.queue.jobs()) == 1
    link = f"Done: {hub.url}/merge-bot/alice-tiny-lora-merged-float16"
    assert any(c.startswith(link) for c in bot_comments(hub, num1))
    assert any(c.startswith(link) for c in bot_comments(hub, num2))
    num3, body3 = ask(hub, "bob", BOB, "/merge alice/tiny-lora --dtype float16")
    assert post(client, body3).json()["status"] == "duplicate"
    drain(service)
    assert any("already done" in c and "alice-tiny-lora-merged-float16" in c for c in bot_comments(hub, num3))
    assert len(service.queue.jobs()) == 1


def test_bot_ignores_its_own_comments_and_unrelated_events(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora")
    own = payload(hub, num, "c0ffee" * 4, "merge-bot", "/merge alice/tiny-lora")
    assert post(client, own).json()["status"] == "ignored"
    other_repo = payload(hub, num, "beef" * 6, "alice", "/merge alice/tiny-lora", repo="alice/tiny-lora")
    assert post(client, other_repo).json()["status"] == "ignored"
    chat = payload(hub, num, "feed" * 6, "alice", "thanks, looks great")
    assert post(client, chat).json()["status"] == "ignored"
    assert service.queue.jobs() == []


def test_per_user_limit_and_queue_cap_are_enforced_with_a_reply(hub, service):
    client = TestClient(create_app(service))
    statuses = []
    for i in range(3):  # limit per user is 2
        num, body = ask(hub, "bob", BOB, f"/merge alice/tiny-lora --base bob/tiny-llama@main --dtype float32 "
                                         f"--pr bob/limit-{i}")
        statuses.append(post(client, body).json()["status"])
    assert statuses == ["queued", "queued", "rejected"]
    num_c, body_c = ask(hub, "carol", CAROL, "/merge alice/tiny-lora --pr carol/one")
    assert post(client, body_c).json()["status"] == "queued"  # 3 queued: the cap
    num_a, body_a = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --pr alice/one")
    assert post(client, body_a).json()["status"] == "rejected"
    service.send_replies_once()
    assert "limit per person" in bot_comments(hub, num)[0]
    assert "queue is full" in bot_comments(hub, num_a)[0]
    assert service.queue.active_count() == 3


def test_pr_on_someone_elses_repo_is_refused(hub, service):
    client = TestClient(create_app(service))
    hub.create_repo("bob/bobs-model", owner_token=BOB, files={"README.md": b"# bob\n"})
    num, body = ask(hub, "carol", CAROL, "/merge alice/tiny-lora --pr bob/bobs-model")
    post(client, body)
    drain(service)
    assert "must be asked for by its owner, bob" in bot_comments(hub, num)[0]
    assert not [d for d in hub.discussions("bob/bobs-model") if d["is_pull_request"]]


def test_command_parsing():
    assert parse_command("/merge a/b@v1 --pr c/d --dtype float16 --base e/f").pr_repo == "c/d"
    for bad in ("/merge", "/merge --pr c/d", "/merge a/b --colour red", "/merge a/b --pr", "/merge ../etc/passwd",
                "/merge a/b --pr c", '/merge "unclosed'):
        with pytest.raises(CommandError):
            parse_command(bad)


def test_config_from_env_names_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match="HF_TOKEN, MERGEBOT_WEBHOOK_SECRET"):
        ServiceConfig.from_env({"MERGEBOT_REQUESTS_REPO": "a/b"})
    with pytest.raises(UsageError, match="MERGEBOT_MAX_QUEUE"):
        ServiceConfig.from_env({"HF_TOKEN": "x", "MERGEBOT_WEBHOOK_SECRET": "y", "MERGEBOT_REQUESTS_REPO": "a/b",
                                "MERGEBOT_MAX_QUEUE": "-1"})
    assert parse_requests_repo("spaces/merge-bot/merge-bot") == ("space", "merge-bot/merge-bot")
    config = ServiceConfig.from_env({"HF_TOKEN": "tok-VALUE-1", "MERGEBOT_WEBHOOK_SECRET": "whsec-VALUE-2",
                                     "MERGEBOT_REQUESTS_REPO": "a/b", "MERGEBOT_DB": str(tmp_path / "db.sqlite")})
    assert "VALUE" not in repr(config) and config.db_path == tmp_path / "db.sqlite"


def test_serve_without_settings_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGEBOT_") and k != "HF_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "bot", "serve"], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: missing setting(s)")
    assert "Traceback" not in proc.stderr


# ---- a real process, killed mid-job ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": BOT, "MERGEBOT_WEBHOOK_SECRET": SECRET,
           "MERGEBOT_REQUESTS_REPO": REQUESTS, "MERGEBOT_DB": str(tmp_path / "queue.sqlite")}
    proc = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(proc.stdout.read())


def wait_for(condition, timeout: float = 90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigkill_mid_job_then_restart_finishes_exactly_once(hub, bot_account, tmp_path):
    target = "merge-bot/alice-tiny-lora-merged"
    port = free_port()
    proc = start_serve(tmp_path, port)
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora")
    # The commit will reach the Hub only after 3 s: the process dies while waiting for the answer,
    # and the Hub still applies the commit. On restart the job must not commit a second time.
    hub.delay_next("POST", rf"/api/models/{target}/commit/", 3.0)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/merge", data=json.dumps(body).encode(),
                                     headers={"X-Webhook-Secret": SECRET, "Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(request, timeout=5).read())["status"] == "queued"
    wait_for(lambda: any(m == "POST" and p.endswith(f"{target}/commit/main") for m, p in hub.requests_log))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    db = sqlite3.connect(tmp_path / "queue.sqlite")
    assert db.execute("SELECT state FROM jobs").fetchall() == [("running",)]
    db.close()

    proc = start_serve(tmp_path, port)
    try:
        wait_for(lambda: any(c.startswith("Done:") for c in bot_comments(hub, num)))
        time.sleep(1.5)  # room for a wrong second reply or commit to show up
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    commits = [c for c in hub.commits(target) if c["title"].startswith("Merge ")]
    assert len(commits) == 1
    replies = bot_comments(hub, num)
    assert sum(c.startswith("Done:") for c in replies) == 1
    assert sum(c.startswith("Accepted") for c in replies) == 1
    db = sqlite3.connect(tmp_path / "queue.sqlite")
    assert db.execute("SELECT state, attempts FROM jobs").fetchall() == [("done", 2)]


def test_space_mounts_the_webhook_and_shows_the_queue_without_private_targets(hub, service, monkeypatch):
    import gradio as gr

    from space.app import build_app

    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.delenv("SPACE_ID", raising=False)
    hub.create_repo("alice/hidden-target", owner_token=ALICE, private=True, files={"README.md": b"# private\n"})
    hub.create_repo("alice/open-target", owner_token=ALICE, files={"README.md": b"# public\n"})
    service.api = HfApi(token=ALICE)  # let the bot see alice's private repo, as if it were a collaborator
    app = gr.mount_gradio_app(create_app(service), build_app(service), path="/")
    client = TestClient(app)
    for target in ("alice/hidden-target", "alice/open-target"):
        _, body = ask(hub, "alice", ALICE, f"/merge alice/tiny-lora --pr {target}")
        assert post(client, body).status_code == 202
    service.triage_once()
    rows = {row[3]: row for row in service.queue.status_rows()}
    assert "(private repo)" in rows and "alice/open-target" in rows
    assert not any("hidden-target" in cell for row in rows.values() for cell in row)
    assert client.get("/").status_code == 200 and "merge-bot" in client.get("/").text


def test_new_adapter_commit_triggers_a_refresh_pr_on_the_merged_repo(hub, service, models):
    from safetensors.torch import load_file, save_file

    from hub_fixtures import adapter_files

    hub.create_repo("alice/evolving-lora", owner_token=ALICE,
                    files=adapter_files(models["adapter"], "bob/tiny-llama"))
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/evolving-lora")
    post(client, body)
    drain(service)
    target = "merge-bot/alice-evolving-lora-merged"
    assert any(c.startswith(f"Done: {hub.url}/{target}") for c in bot_comments(hub, num))

    weights = load_file(models["adapter"] / "adapter_model.safetensors")
    retrained = {k: v * 1.5 if "lora_B" in k else v for k, v in weights.items()}
    path = Path(service.config.db_path.parent / "adapter_model.safetensors")
    save_file(retrained, path)
    head = hub.commit_files("alice/evolving-lora", {"adapter_model.safetensors": path.read_bytes()},
                            message="retrain")
    update = push_payload(hub, "alice/evolving-lora", head)
    assert post(client, update).json()["status"] == "queued"
    assert post(client, update).json()["status"] == "ignored"  # same head again: nothing new
    drain(service)
    prs = [d for d in hub.discussions(target) if d["is_pull_request"]]
    assert len(prs) == 1
    assert any(c.startswith(f"Done: {hub.url}/{target}/discussions/{prs[0]['num']}") for c in bot_comments(hub, num))
    assert len([c for c in hub.commits(target) if c["title"].startswith("Merge ")]) == 1  # main untouched

    # A commit that leaves the adapter's config and weights alone (a README edit) is not re-merged.
    replies_before = len(bot_comments(hub, num))
    head = hub.commit_files("alice/evolving-lora", {"README.md": b"# now with a better description\n"},
                            message="docs")
    update["updatedRefs"] = [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": head}]
    assert post(client, update).json()["status"] == "queued"
    drain(service)
    assert len([d for d in hub.discussions(target) if d["is_pull_request"]]) == 1
    assert len(bot_comments(hub, num)) == replies_before
    assert service.queue.jobs()[0].state == "done"
    head = hub.commit_files("alice/evolving-lora", {"README.md": b"# and a second edit\n"}, message="docs again")
    update["updatedRefs"] = [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": head}]
    post(client, update)
    drain(service)
    assert len([d for d in hub.discussions(target) if d["is_pull_request"]]) == 1  # still no merge for a README edit

    # A tokenizer fix is part of what gets published: that is a real change.
    head = hub.commit_files("alice/evolving-lora", {"tokenizer_config.json": b'{"chat_template": "new"}'},
                            message="chat template")
    update["updatedRefs"] = [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": head}]
    post(client, update)
    drain(service)
    assert len([d for d in hub.discussions(target) if d["is_pull_request"]]) == 2


def test_worker_merges_the_adapter_commit_that_triage_checked(hub, service, models):
    from hub_fixtures import adapter_files

    hub.create_repo("carol/switcheroo", owner_token=CAROL, files=adapter_files(models["adapter"], "bob/tiny-llama"))
    checked_sha = hub.commits("carol/switcheroo")[0]["id"]
    client = TestClient(create_app(service))
    num, body = ask(hub, "carol", CAROL, "/merge carol/switcheroo")
    post(client, body)
    service.triage_once()
    # After "Accepted", the author points the adapter at a gated base the bot account can read.
    hub.grant("bob/gated-llama", "merge-bot")
    config = json.loads(adapter_files(models["adapter"], "bob/gated-llama")["adapter_config.json"])
    hub.commit_files("carol/switcheroo", {"adapter_config.json": json.dumps(config).encode()}, message="switch")
    drain(service)
    report = json.loads(hub.files("merge-bot/carol-switcheroo-merged")["merge_report.json"])
    assert report["adapter"]["revision"] == checked_sha and report["base"]["repo_id"] == "bob/tiny-llama"


def test_undeliverable_replies_do_not_block_the_outbox(hub, service):
    from bot.service.queue import Where

    for i in range(25):
        service.queue.add_reply(f"lost:{i}", Where("model", REQUESTS, 9999), "nobody will read this")
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype not-a-dtype")
    post(TestClient(create_app(service)), body)
    for _ in range(3):
        service.send_replies_once()
    assert bot_comments(hub, num), "a good reply stayed stuck behind undeliverable ones"
    assert not service.triage_once()  # nothing to decide: the courier has no reason to spin


def test_title_command_does_not_refire_on_later_comments(hub, service):
    client = TestClient(create_app(service))
    api = HfApi(token=ALICE)
    discussion = api.create_discussion(REQUESTS, title="/merge alice/tiny-lora --dtype float16", description="pls")
    first = api.get_discussion_details(REQUESTS, discussion.num).events[0]
    assert post(client, payload(hub, discussion.num, first.id, "alice", "pls", scope="discussion")
                | {"discussion": payload(hub, discussion.num, first.id, "alice", "")["discussion"]
                   | {"title": "/merge alice/tiny-lora --dtype float16"}}).json()["status"] in ("queued", "duplicate")
    later = payload(hub, discussion.num, "d" * 24, "carol", "thanks!")
    later["discussion"]["title"] = "/merge alice/tiny-lora --dtype float16"
    assert post(client, later).json()["status"] == "ignored"


def test_forged_reply_marker_does_not_silence_the_bot(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype bfloat16 --base bob/tiny-llama")
    post(client, body)
    HfApi(token=CAROL).comment_discussion(REQUESTS, num, "<!-- merge-bot-reply: accepted:1 -->")
    service.triage_once()
    service.send_replies_once()
    assert any(c.startswith("Accepted") for c in hub.discussions(REQUESTS)[num - 1]["comments"])


def test_overlong_or_hostile_commands_get_a_short_quoted_reply(hub, service):
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge a/b --base " + "x" * 5000)
    assert post(client, body).json()["status"] == "rejected"
    num2, body2 = ask(hub, "alice", ALICE, '/merge "@bob [free](https://evil.example)"')
    post(client, body2)
    service.send_replies_once()
    (reply,) = bot_comments(hub, num)
    assert "longer than 400 characters" in reply and len(reply) < 1000
    (reply2,) = bot_comments(hub, num2)
    quoted = reply2.split("`")[1]  # the echoed text sits inside inline code: no link, no mention
    assert "[free](https://evil.example)" in quoted and reply2.count("evil.example") == 1


def test_refresh_ignores_pr_refs_and_tags(hub, service):
    client = TestClient(create_app(service))
    update = push_payload(hub, "alice/tiny-lora", "1" * 40, ref="refs/pr/3", old=None)
    assert post(client, update).json()["status"] == "ignored"


def test_too_large_is_refused_with_the_limit(hub, bot_account, tmp_path):
    config = ServiceConfig(token=BOT, webhook_secret=SECRET, requests_repo=REQUESTS, db_path=tmp_path / "q.sqlite",
                           max_output_gb=1e-9)
    service = Service(config)
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float16 --base bob/tiny-llama")
    post(TestClient(create_app(service)), body)
    drain(service)
    (reply,) = bot_comments(hub, num)
    assert "over this bot's 0 GB limit" in reply and service.queue.jobs()[0].state == "failed"


def test_new_discussion_without_a_comment_uses_its_title_and_author(hub, service):
    api = HfApi(token=CAROL)
    discussion = api.create_discussion(REQUESTS, title="/merge alice/tiny-lora --dtype float16 --base bob/tiny-llama")
    body = payload(hub, discussion.num, "unused", "carol", "", scope="discussion")
    body["discussion"]["title"] = discussion.title
    body["comment"] = None
    client = TestClient(create_app(service))
    assert post(client, body).json()["status"] == "queued"
    assert post(client, body).json()["status"] == "ignored"  # redelivery of the same event
    service.triage_once()
    assert service.queue.jobs()[0].requester == "carol"
